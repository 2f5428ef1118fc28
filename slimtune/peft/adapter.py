"""Bottleneck adapters (Houlsby et al., 2019) after each targeted layer: y + W_up act(W_down y).

peft has no bottleneck adapter tuner, so this one is ours. W_up starts at zero: the model is unchanged at init.
Merging is impossible in general (the adapter is non-linear): `slimtune merge` refuses it with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass
class AdapterConfig:
    bottleneck: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["down_proj", "o_proj"])
    activation: str = "relu"
    method: str = "adapter"


def out_features(layer: nn.Module) -> int:
    return layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.out_features


class BottleneckAdapter(nn.Module):
    def __init__(self, base: nn.Module, config: AdapterConfig, state: dict | None = None):
        super().__init__()
        self.base = base
        d = out_features(base)
        dtype, device = base.weight.dtype, base.weight.device
        self.down = nn.Linear(d, config.bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(config.bottleneck, d, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[config.activation]
        if state is not None:  # strict: every adapter tensor, and nothing else (the base stays as loaded)
            self.down.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("down.")})
            self.up.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("up.")})
            unexpected = [k for k in state if not k.startswith(("down.", "up."))]
            if unexpected:
                raise KeyError(f"unexpected adapter tensor {unexpected[0]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.up(self.act(self.down(y)))

    def merged(self) -> nn.Module:
        return self  # non-linear: deploy with the adapter in place

    def extra_state(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}
