"""SVFit: fine-tune only the top-r singular values of each targeted weight (Sun et al., 2024).

W = U S V^T. Keep U_r, V_r (top-r singular vectors) and the residual R = W - U_r diag(S_r) V_r^T frozen; train the r
values s (initialised to S_r), optionally times a learnable per-value scale. Forward: y = x R^T + ((x V_r) * s) U_r^T.
R overwrites the base weight in place, so the model holds no second dense copy. At init the layer computes exactly W
up to fp32 rounding. Trainable parameters per matrix: r (2r with scales).

Relative parametrisation (`relative=True`; slimtune's default for every optimizer, `--svfit-absolute` for the
values themselves): s is frozen at S_r and only multiplicative scales m (initialised to 1) are trained,
values = s * m. Singular values are O(1-10) while ZO moves a parameter by O(lr * eps)-sized steps whatever its
magnitude, so under ZO the raw values barely move; on m every trainable number is O(1), a perturbation eps changes
every singular value by the same *relative* amount, and the finite difference dL/dm_j = S_j dL/ds_j is scaled up by
the value it moves. (A diagonal preconditioner diag(S_r^2) on the ZO update, in other words.) Adam's step is ~lr per
coordinate whatever the gradient's scale, so on m it moves each singular value by ~lr of itself instead of by ~lr:
on the SST-2 train split (benchmarks/defaults_sweep.py) AdamW reached 0.81 with relative scales against 0.73 on the
values. Trainable parameters per matrix: r.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LAYER_TYPES = (nn.Linear, Conv1D)


@dataclass
class SVFitConfig:
    r: int = 8
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])
    learn_scale: bool = False
    relative: bool = False  # train only the scales m (values = S_r * m); implies learn_scale
    randomized_svd_above: int = 4096  # use torch.svd_lowrank when min(W.shape) exceeds this
    method: str = "svfit"


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features): GPT-2's Conv1D stores it transposed."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def top_singular_triplets(w: torch.Tensor, r: int, randomized_above: int):
    w32 = w.detach().float()
    if min(w32.shape) > randomized_above:
        u, s, v = torch.svd_lowrank(w32, q=r + 8, niter=4)
        return u[:, :r], s[:r], v[:, :r].T
    u, s, vh = torch.linalg.svd(w32, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


class SVFitLinear(nn.Module):
    def __init__(self, base: nn.Module, config: SVFitConfig, state: dict | None = None):
        super().__init__()
        self.base = base
        w = dense_weight(base)
        r = min(config.r, *w.shape)
        if state is None:  # fresh: SVD of the pretrained weight
            u, s, vh = top_singular_triplets(w, r, config.randomized_svd_above)
            s0, values = s, s.clone()
        else:  # loading: vectors and initial values come from the file
            u, vh, s0, values = state["U"], state["Vh"], state["S0"], state["sv"]
        self.register_buffer("U", u.to(w.dtype).contiguous())
        self.register_buffer("Vh", vh.to(w.dtype).contiguous())
        self.register_buffer("S0", s0.to(w.dtype).clone())
        with torch.no_grad():
            w.sub_((self.U * self.S0) @ self.Vh)  # base weight becomes the frozen residual R
        for p in base.parameters():
            p.requires_grad_(False)
        self.sv = nn.Parameter(values.to(w.dtype).clone(), requires_grad=not config.relative)
        self.scale = None
        if config.learn_scale or config.relative:
            self.scale = nn.Parameter(state["scale"].to(w.dtype) if state and "scale" in state
                                      else torch.ones(r, dtype=w.dtype))

    def values(self) -> torch.Tensor:
        return self.sv * self.scale if self.scale is not None else self.sv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + ((x @ self.Vh.T) * self.values()) @ self.U.T

    def delta_weight(self) -> torch.Tensor:
        return (self.U * self.values()) @ self.Vh

    def merged(self) -> nn.Module:
        with torch.no_grad():
            dense_weight(self.base).add_(self.delta_weight())
        return self.base

    def extra_state(self) -> dict:
        state = {"U": self.U, "Vh": self.Vh, "S0": self.S0, "sv": self.sv.data}
        if self.scale is not None:
            state["scale"] = self.scale.data
        return state
