"""LOZO and LOZO-M: zeroth-order SGD with low-rank perturbations (Chen et al., 2024).

For each matrix W (m x n, higher-rank tensors are viewed as m x prod(rest)) the direction is Z = U V^T / sqrt(r):
V (n x r) is resampled only every `nu` steps and kept in memory; U (m x r) is drawn fresh each step from the step
seed. 1-D parameters get a dense Gaussian z as in MeZO. The 1/sqrt(r) keeps E[Z_ij^2] = 1, so eps and lr mean the
same as in MeZO. Z is never materialised: W.addmm_(U, V^T) applies it in place.

Perturbing through the forward pass (given the model, `forward_perturbation`): a low-rank Z need not be written into
W to be measured. For a matrix used only as the weight of nn.Linear (y = x W^T + b) or nn.Embedding (y = W[ids]),
    x (W + c Z)^T = y + c (x V) U^T / sqrt(r),      (W + c Z)[ids] = y + c U[ids] V^T / sqrt(r),
so a forward hook adds the rank-r term to the output and W moves once per step (the update) instead of four times
(+eps Z, -2 eps Z, +eps Z, -lr g Z): on full-parameter LOZO the weight sweeps, not the RNG, are what a step costs
beyond its two forwards. Restoring is then exact (W is never perturbed), and the directions are the same draws from
the same generators, so the trajectory equals the in-place one up to float rounding. Matrices used any other way
(or through subclasses that may redefine forward) keep the in-place sweeps.

U and V come from separate generators (V from a seed derived from the resample block), so regenerating U for the
update reproduces exactly the U used for the measurement, resample step or not.

LOZO-M keeps the momentum of each matrix compressed as N (m x r) with M = N V^T; N <- beta N + (g / sqrt(r)) U and
W -= lr N V^T. When V changes, N is projected onto the new V by least squares: N <- N (V_old^T V_new)(V_new^T V_new)^-1.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.optim.base import mix_seed
from slimtune.zo import precision
from slimtune.zo.mezo import MeZOConfig, ZOOptimizer

V_STREAM = 0x5EED_0F_5


@dataclass
class LOZOConfig(MeZOConfig):
    rank: int = 2
    nu: int = 50  # resample V every nu steps
    momentum: float = 0.0  # > 0 gives LOZO-M
    forward_perturbation: bool = True  # perturb nn.Linear / nn.Embedding weights through forward hooks (see above)


class LOZO(ZOOptimizer):
    name = "lozo"

    def __init__(self, named_params, config: LOZOConfig, estimator=None, model: nn.Module | None = None):
        super().__init__(named_params, config, estimator)
        if config.rank < 1 or config.nu < 1:
            raise ValueError("LOZO needs rank >= 1 and nu >= 1")
        self.name = "lozo-m" if config.momentum else "lozo"
        self.v_block: int | None = None
        self.V: dict[int, torch.Tensor] = {}
        self.momentum: dict[int, torch.Tensor] = {}
        self._draws: tuple[int, list[torch.Tensor]] | None = None  # (seed, U or z per parameter) of the current step
        self._shift = 0.0  # c: the multiple of Z the hooks add to their outputs (hooked matrices are never moved)
        self._shift_seed: int | None = None
        self._hooks: list = []
        self.hooked: set[int] = set()  # indices into self.params perturbed through forward hooks
        if model is not None and config.forward_perturbation:
            self._attach(model)

    # -- perturbing through the forward pass ------------------------------------------------------------------------
    def _attach(self, model: nn.Module) -> None:
        """Hook every 2-D parameter whose only users are nn.Linear / nn.Embedding modules holding it as `weight`."""
        users: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for pname, q in module._parameters.items():
                if q is not None:
                    users.setdefault(id(q), []).append((module, pname))
        for idx, (_, p, _) in enumerate(self.params):
            found = users.get(id(p), [])
            if p.ndim != 2 or not found or any(pname != "weight" or type(m) not in (nn.Linear, nn.Embedding)
                                               or getattr(m, "max_norm", None) is not None for m, pname in found):
                continue
            for module, _ in found:
                method = LOZO._linear_hook if type(module) is nn.Linear else LOZO._embedding_hook
                self._hooks.append(module.register_forward_hook(partial(_hook, weakref.ref(self), method, idx)))
            self.hooked.add(idx)
        # the hooks hold the optimizer weakly and leave with it (a client builds one optimizer per round on one model)
        weakref.finalize(self, _remove, self._hooks)

    def remove_hooks(self) -> None:
        _remove(self._hooks)
        self.hooked = set()

    def _linear_hook(self, idx: int, x: torch.Tensor, out: torch.Tensor):
        """y + c (x V) U^T / sqrt(r)."""
        u, v = self._draws[1][idx], self.V[idx]
        left = x.reshape(-1, x.shape[-1]) @ (v if v.dtype == x.dtype else v.to(x.dtype))
        return _add_low_rank(out, left, u.T, self._shift / math.sqrt(u.shape[1]))

    def _embedding_hook(self, idx: int, ids: torch.Tensor, out: torch.Tensor):
        """y + c U[ids] V^T / sqrt(r)."""
        u = self._draws[1][idx]
        return _add_low_rank(out, F.embedding(ids.reshape(-1), u), self.V[idx].T, self._shift / math.sqrt(u.shape[1]))

    def _drop_transients(self) -> None:
        """The hooked matrices are never written: with the shift dropped, their forward is exactly theta's."""
        self._shift = 0.0

    def _move_shift(self, seed: int, alpha: float) -> None:
        if self._shift and self._shift_seed != seed:
            raise RuntimeError("LOZO: a new direction was applied before the previous one was removed")
        shift = self._shift + alpha
        self._shift = 0.0 if abs(shift) <= 1e-9 * abs(alpha) else shift  # +eps, -2 eps, +eps returns exactly to 0
        self._shift_seed = seed

    def _directions(self, seed: int) -> list[torch.Tensor]:
        """U (m x r) per matrix and dense z per other parameter, drawn in parameter order from one generator seeded by
        `seed`; kept for the step, so every sweep of the step (and the hooks) uses the very same draws."""
        if self._draws is None or self._draws[0] != seed:
            gen = torch.Generator(device=self.params[0][1].device).manual_seed(seed)
            draws = []
            for _, p, _ in self.params:
                shape = (p.shape[0], self._rank(p)) if self.is_matrix(p) else p.shape
                draws.append(torch.randn(shape, generator=gen, device=p.device, dtype=p.dtype))
            self._draws = (seed, draws)
        return self._draws[1]

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
        draws = self._directions(seed)
        if self.hooked and op in ("add", "restore_update"):
            self._move_shift(seed, alpha if op == "add" else eps)  # hooked matrices: the forward adds the shift
        offset, new_offset = self._begin_sweep(op, alpha)
        for idx, (name, p, p_decays) in enumerate(self.params):
            matrix, hooked, u = self.is_matrix(p), idx in self.hooked, draws[idx]
            if precision.is_low_precision(p):
                self._low_precision_param(seed, idx, p, p_decays, u, op, offset, new_offset, coef, decay, last)
                continue
            if matrix:
                w, vt, scale = p.data.view(p.shape[0], -1), self.V[idx].T, 1 / math.sqrt(u.shape[1])
            else:
                w, scale = p.data, 1.0

            def add(direction, a):
                if matrix:
                    w.addmm_(direction, vt, alpha=a)
                else:
                    w.add_(direction, alpha=a)

            if op == "add":
                if not hooked:
                    add(u, alpha * scale)
                continue
            if op == "restore_update" and not hooked:
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

        self._offset = new_offset

    def _low_precision_param(self, seed, idx, p, p_decays, u, op, offset, new_offset, coef, decay, last) -> None:
        """bf16 / fp16 weights (zo/precision.py): the direction U V^T / sqrt(r) (or z) in blocks of whole rows of at
        most ~chunk_size values, in fp32; perturbed states one rounding from theta, the update stochastically rounded.
        Hooked matrices are never perturbed (their offset is 0)."""
        cfg = self.config
        scratch = self.__dict__.setdefault("_scratch", precision.Scratch())
        if idx in self.hooked:
            offset = new_offset = 0.0
            if op == "add":
                return
        matrix = self.is_matrix(p)
        w = p.data.view(p.shape[0], -1) if matrix else p.data.view(1, -1)
        scale = 1 / math.sqrt(u.shape[1]) if matrix else 1.0
        plain = op != "add" and not cfg.momentum  # LOZO: restore and step along the same direction
        momentum_step = None  # LOZO-M: M V^T, applied on the step's last update sweep
        if op != "add" and cfg.momentum:
            m = self.momentum.get(idx)
            m = torch.zeros_like(u) if m is None else (m.mul_(cfg.momentum) if decay else m)
            self.momentum[idx] = m.add_(u, alpha=coef * scale)
            momentum_step = m if last else None
        shrink = 1 - cfg.lr * cfg.weight_decay if op != "add" and decay and p_decays and cfg.weight_decay else 1.0
        if op != "add" and not plain and momentum_step is None and shrink == 1.0:
            if not offset:
                return
            op, new_offset = "add", 0.0  # LOZO-M between its update sweeps: restore only
        rows = max(1, cfg.chunk_size // max(w.shape[1], 1))
        gen = None if op == "add" else precision.rounding_generator(mix_seed(seed, idx), p.device)
        vt = self.V[idx].T.float() if matrix else None
        for r0 in range(0, w.shape[0], rows):
            part = w[r0:r0 + rows]
            d = u[r0:r0 + rows].float() @ vt * scale if matrix else u.float().view(1, -1)
            if op == "add":
                precision.move_(part, d, offset, new_offset, scratch)
            elif plain:
                precision.update_(part, d, offset, shrink, -cfg.lr * coef, gen, scratch)
            else:
                if offset:
                    precision.move_(part, d, offset, 0.0, scratch)
                if momentum_step is None:
                    precision.update_(part, d, 0.0, shrink, 0.0, gen, scratch)
                else:
                    ms = momentum_step[r0:r0 + rows].float() @ vt if matrix else momentum_step.float().view(1, -1)
                    precision.update_(part, ms, 0.0, shrink, -cfg.lr, gen, scratch)

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


def _hook(optimizer_ref, method, idx: int, module: nn.Module, args: tuple, out: torch.Tensor):
    """The registered forward hook: `method` (LOZO._linear_hook or _embedding_hook) while a perturbation is applied."""
    optimizer = optimizer_ref()
    if optimizer is None or not optimizer._shift:
        return None
    return method(optimizer, idx, args[0], out)


def _remove(handles: list) -> None:
    while handles:
        handles.pop().remove()


def _add_low_rank(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float):
    """out + alpha left @ right (left: N x r, right: r x d, out: (..., d) with N rows): in place when no autograd
    graph is being recorded (ZO measures under inference mode), so no output-sized temporary is made."""
    if left.dtype != out.dtype:  # autocast: the layer's output dtype wins
        left, right = left.to(out.dtype), right.to(out.dtype)
    if not torch.is_grad_enabled() and out.is_contiguous():
        out.view(-1, out.shape[-1]).addmm_(left, right, alpha=alpha)
        return None
    return out + alpha * (left @ right).view(out.shape)
