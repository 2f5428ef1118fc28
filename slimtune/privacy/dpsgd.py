"""First-order DP baseline: DP-SGD / DP-AdamW through Opacus (per-example clipping + Gaussian noise on gradients).

Uses the same sampler and the same dp-accounting accountant as DPZero, so epsilon is comparable. Opacus adds noise of
std `noise_multiplier * max_grad_norm` to the sum of per-example gradients clipped to norm C. The accountant's sigma
is relative to the sensitivity Delta of that sum (C under Poisson / add-remove, 2C for fixed-size batches /
replace-one), so Opacus is given noise_multiplier = sigma * Delta / C: the std is sigma * Delta in both cases.
The noise generator is seeded from the run's secret (OS entropy), never from public settings. An empty Poisson batch
still takes a step: zero clipped sum plus noise, as the accounted mechanism requires.
"""

from __future__ import annotations

import torch

from slimtune.optim.base import SlimOptimizer, StepOutput
from slimtune.optim.first_order import FirstOrder, FirstOrderConfig
from slimtune.privacy.accountant import PrivacySpec, sensitivity
from slimtune.privacy.secret import fresh_secret


class DPFirstOrder(SlimOptimizer):
    def __init__(self, model: torch.nn.Module, config: FirstOrderConfig, kind: str, spec: PrivacySpec,
                 noise_multiplier: float, expected_batch_size: int, noise_seed: int | None = None):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.name = f"dp-{kind}"
        self.grad_sample_module = GradSampleModule(model, loss_reduction="mean")  # hooks live on model's layers
        self.inner = FirstOrder(model.named_parameters(), config, kind)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.generator = torch.Generator().manual_seed(noise_seed if noise_seed is not None else fresh_secret())
        self.torch_optimizer = DPOptimizer(self.inner.torch_optimizer,
                                           noise_multiplier=noise_multiplier * sensitivity(spec) / spec.clip,
                                           max_grad_norm=spec.clip, expected_batch_size=expected_batch_size,
                                           loss_reduction="mean", generator=self.generator)

    def step(self, closure) -> StepOutput:
        self.torch_optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            losses = closure()
            if losses.numel() == 0:  # empty Poisson batch: no per-example gradients, the noise is still released
                for p in self.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                loss = float("nan")
            else:
                mean = losses.mean()
                mean.backward()
                loss = mean.item()
        self.torch_optimizer.step()
        return StepOutput(loss, {"batch_size": int(losses.numel())})

    def set_lr(self, lr: float) -> None:
        self.inner.set_lr(lr)  # DPOptimizer shares the wrapped optimizer's param groups

    def state_dict(self) -> dict:
        return {"optimizer": self.torch_optimizer.original_optimizer.state_dict(),
                "noise_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.torch_optimizer.original_optimizer.load_state_dict(state["optimizer"])
        if "noise_generator" in state:
            self.generator.set_state(state["noise_generator"])
