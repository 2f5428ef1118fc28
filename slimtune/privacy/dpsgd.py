"""First-order DP baseline: DP-SGD / DP-AdamW through Opacus (per-example clipping + Gaussian noise on gradients).

Uses the same Poisson sampler and the same dp-accounting accountant as DPZero, so epsilon is comparable.
"""

from __future__ import annotations

import torch

from slimtune.optim.base import SlimOptimizer, StepOutput
from slimtune.optim.first_order import FirstOrder, FirstOrderConfig


class DPFirstOrder(SlimOptimizer):
    def __init__(self, model: torch.nn.Module, config: FirstOrderConfig, kind: str, clip: float,
                 noise_multiplier: float, expected_batch_size: int, noise_seed: int | None = None):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.name = f"dp-{kind}"
        self.grad_sample_module = GradSampleModule(model, loss_reduction="mean")  # hooks live on model's layers
        self.inner = FirstOrder(model.named_parameters(), config, kind)
        self.generator = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
        self.torch_optimizer = DPOptimizer(self.inner.torch_optimizer, noise_multiplier=noise_multiplier,
                                           max_grad_norm=clip, expected_batch_size=expected_batch_size,
                                           loss_reduction="mean", generator=self.generator)

    def step(self, closure) -> StepOutput:
        self.torch_optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            losses = closure()
            if losses.numel() == 0:  # empty Poisson batch: nothing touched, nothing released
                return StepOutput(float("nan"), {"batch_size": 0})
            loss = losses.mean()
            loss.backward()
        self.torch_optimizer.step()
        return StepOutput(loss.item(), {"batch_size": int(losses.numel())})

    def state_dict(self) -> dict:
        state = {"optimizer": self.torch_optimizer.original_optimizer.state_dict()}
        if self.generator is not None:
            state["noise_generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.torch_optimizer.original_optimizer.load_state_dict(state["optimizer"])
        if self.generator is not None and "noise_generator" in state:
            self.generator.set_state(state["noise_generator"])
