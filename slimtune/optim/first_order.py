"""Backprop baselines (AdamW, SGD) behind the slimtune optimizer interface."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


class FirstOrder(SlimOptimizer):
    """Mean loss, backward, torch optimizer step."""

    def __init__(self, named_params, config: FirstOrderConfig, kind: str = "adamw"):
        self.name, self.config = kind, config
        groups = param_groups(named_params, config.weight_decay)
        if kind == "adamw":
            self.torch_optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
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
