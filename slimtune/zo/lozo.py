"""LOZO and LOZO-M: zeroth-order SGD with low-rank perturbations (Chen et al., 2024).

For each matrix W (m x n, higher-rank tensors are viewed as m x prod(rest)) the direction is Z = U V^T / sqrt(r):
V (n x r) is resampled only every `nu` steps and kept in memory; U (m x r) is drawn fresh each step from the step
seed. 1-D parameters get a dense Gaussian z as in MeZO. The 1/sqrt(r) keeps E[Z_ij^2] = 1, so eps and lr mean the
same as in MeZO. Z is never materialised: W.addmm_(U, V^T) applies it in place.

U and V come from separate generators (V from a seed derived from the resample block), so regenerating U for the
update reproduces exactly the U used for the measurement, resample step or not.

LOZO-M keeps the momentum of each matrix compressed as N (m x r) with M = N V^T; N <- beta N + (g / sqrt(r)) U and
W -= lr N V^T. When V changes, N is projected onto the new V by least squares: N <- N (V_old^T V_new)(V_new^T V_new)^-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimtune.optim.base import mix_seed
from slimtune.zo.mezo import MeZOConfig, ZOOptimizer

V_STREAM = 0x5EED_0F_5


@dataclass
class LOZOConfig(MeZOConfig):
    rank: int = 2
    nu: int = 50  # resample V every nu steps
    momentum: float = 0.0  # > 0 gives LOZO-M


class LOZO(ZOOptimizer):
    name = "lozo"

    def __init__(self, named_params, config: LOZOConfig, estimator=None):
        super().__init__(named_params, config, estimator)
        if config.rank < 1 or config.nu < 1:
            raise ValueError("LOZO needs rank >= 1 and nu >= 1")
        self.name = "lozo-m" if config.momentum else "lozo"
        self.v_block: int | None = None
        self.V: dict[int, torch.Tensor] = {}
        self.momentum: dict[int, torch.Tensor] = {}

    @staticmethod
    def is_matrix(p: torch.Tensor) -> bool:
        return p.ndim >= 2

    def _rank(self, p) -> int:
        return min(self.config.rank, p.shape[0], p[0].numel())

    def _draw_v(self, idx: int, p: torch.Tensor, block: int) -> torch.Tensor:
        gen = torch.Generator(device=p.device).manual_seed(mix_seed(self.config.seed, V_STREAM, block, idx))
        return torch.randn(p[0].numel(), self._rank(p), generator=gen, device=p.device, dtype=p.dtype)

    def _begin_step(self) -> None:
        block = self.step_count // self.config.nu
        if block == self.v_block:
            return
        for idx, (_, p, _) in enumerate(self.params):
            if not self.is_matrix(p):
                continue
            new_v = self._draw_v(idx, p, block)
            if idx in self.momentum and idx in self.V:
                old_v = self.V[idx].float()
                nv = new_v.float()
                proj = torch.linalg.solve(nv.T @ nv, (old_v.T @ nv).T).T  # (V_old^T V_new)(V_new^T V_new)^-1
                self.momentum[idx] = (self.momentum[idx].float() @ proj).to(p.dtype)
            self.V[idx] = new_v
        self.v_block = block

    @torch.no_grad()
    def _sweep(self, seed, op, alpha=0.0, eps=0.0, coef=0.0, decay=False, last=True) -> None:
        """As ZOOptimizer._sweep. LOZO-M with n-SPSA: N <- beta N + sum_i (g_i / n) U_i / sqrt(r) over the step's update
        sweeps (beta applied on the first), and W -= lr N V^T once, on the last."""
        cfg = self.config
        gen = None
        for idx, (name, p, p_decays) in enumerate(self.params):
            if gen is None:
                gen = torch.Generator(device=p.device).manual_seed(seed)
            matrix = self.is_matrix(p)
            if matrix:
                r = self._rank(p)
                u = torch.randn(p.shape[0], r, generator=gen, device=p.device, dtype=p.dtype)
                w, vt, scale = p.data.view(p.shape[0], -1), self.V[idx].T, 1 / math.sqrt(r)
            else:
                u = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
                w, scale = p.data, 1.0

            def add(direction, a):
                if matrix:
                    w.addmm_(direction, vt, alpha=a)
                else:
                    w.add_(direction, alpha=a)

            if op == "add":
                add(u, alpha * scale)
                continue
            if op == "restore_update":
                add(u, eps * scale)
            if decay and p_decays and cfg.weight_decay:
                w.mul_(1 - cfg.lr * cfg.weight_decay)
            if cfg.momentum:
                m = self.momentum.get(idx)
                m = torch.zeros_like(u) if m is None else (m.mul_(cfg.momentum) if decay else m)
                self.momentum[idx] = m.add_(u, alpha=coef * scale)
                if last:
                    add(m, -cfg.lr)
            else:
                add(u, -cfg.lr * coef * scale)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "v_block": self.v_block,
                "momentum": {i: m.clone() for i, m in self.momentum.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.momentum = {int(i): m for i, m in state.get("momentum", {}).items()}
        self.v_block = state.get("v_block")
        if self.v_block is not None:
            self.V = {idx: self._draw_v(idx, p, self.v_block) for idx, (_, p, _) in enumerate(self.params)
                      if self.is_matrix(p)}
