"""Backprop baselines (AdamW, SGD) behind the slimtune optimizer interface."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune import SlimtuneError

from slimtune.optim.base import SlimOptimizer, StepOutput, decays, trainable


@dataclass
class FirstOrderConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.0  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only


def param_groups(named_params, weight_decay: float) -> list[dict]:
    params = trainable(named_params)
    return [{"params": [p for n, p in params if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """torch's AdamW, with the fused kernel when every parameter is on CUDA. torch's default there (foreach) builds
    sqrt(v) as a temporary as large as the trainable weights: a 7B-shaped fp32 AdamW step on an H200 peaked at 128.6
    GB against the planner's 104.4 GB (weights, gradients, two moments). The fused kernel needs no such temporary and
    is torch's fastest; on CPU the default (a per-tensor loop) is kept."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if fused else None)


def check_full_precision(named_params, optimizer: str) -> None:
    """Backprop trains float32 weights. torch's optimizers write each update to a 16-bit weight rounded to nearest,
    and an update below half its spacing (~|w| 2^-9 in bfloat16) is lost: at full-parameter lr 1e-5 most weights never
    move (a review measured 13% of a bf16 model's weights moved in 5 AdamW steps, against 87% in float32). 16-bit
    weights are for the zeroth-order optimizers, which round their updates stochastically (zo/precision.py); LoRA's
    weights train in float32 on a 16-bit base."""
    from slimtune.zo.precision import is_low_precision
    low = sorted({str(p.dtype).removeprefix("torch.") for _, p in named_params
                  if p.requires_grad and is_low_precision(p)})
    if low:
        raise SlimtuneError(f"--optimizer {optimizer} on {low[0]} trainable weights: backprop's updates would be "
                            f"rounded to the nearest {low[0]} value and most would be lost; use --dtype float32, or "
                            "--peft lora / pissa (their weights train in float32 on a 16-bit base); 16-bit weights "
                            "are for the zeroth-order optimizers")


FLOAT32_ADAPTERS = ("lora", "pissa")  # PEFT methods whose weights peft keeps in float32 on a 16-bit base


def dtype_refusal(optimizer: str, peft: str, dtype: str) -> str | None:
    """Why `slimtune train` refuses this pair at this dtype before loading anything (check_full_precision's rule,
    from the settings alone), or None: backprop (the first-order optimizers, the hybrids' top blocks) on 16-bit
    trainable weights, which every PEFT method but LoRA / PiSSA (float32 adapters) and full training give."""
    from slimtune.optim.methods import FIRST_ORDER, HYBRID

    if dtype == "float32" or peft in FLOAT32_ADAPTERS or optimizer not in (*FIRST_ORDER, *HYBRID):
        return None
    return (f"--optimizer {optimizer} --peft {peft} --dtype {dtype}: backprop trains float32 weights (16-bit updates "
            "round to the nearest value and most are lost); use --dtype float32, or --peft lora / pissa (float32 "
            "adapters on a 16-bit base)")


class FirstOrder(SlimOptimizer):
    """Mean loss, backward, torch optimizer step."""

    def __init__(self, named_params, config: FirstOrderConfig, kind: str = "adamw"):
        named_params = list(named_params)
        check_full_precision(named_params, kind)
        self.name, self.config = kind, config
        groups = param_groups(named_params, config.weight_decay)
        if kind == "adamw":
            self.torch_optimizer = adamw(groups, config.lr, config.betas)
        elif kind == "sgd":
            self.torch_optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
        else:
            raise ValueError(f"unknown first-order optimizer {kind!r}")

    def step(self, closure) -> StepOutput:
        self.torch_optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure().mean()
            loss.backward()
        self.torch_optimizer.step()
        return StepOutput(loss.item())

    def set_lr(self, lr: float) -> None:
        for group in self.torch_optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return self.torch_optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.torch_optimizer.load_state_dict(state)
