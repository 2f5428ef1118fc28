"""HiZOO and HiZOO-L: zeroth-order SGD preconditioned by a diagonal Hessian estimate (Zhao et al., ICLR 2025,
"Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order Optimizer", arXiv 2402.15173).

State per trainable tensor: a positive diagonal H (initialised to 1, kept in fp32). One step on one batch, with z from
the step seed (the seed trick: z is regenerated chunk by chunk from the seed, never stored):

    u = H^{-1/2} z
    l_0 = L(theta),   l_+ = L(theta + eps u),   l_- = L(theta - eps u)        3 forward passes (MeZO's 2, plus l_0)
    kappa = |l_+ + l_- - 2 l_0| / (2 eps^2)                                   ~ |u^T A u| / 2, A = Hessian of L
    H <- (1 - alpha) H + alpha kappa H z^2                                    elementwise (the paper's update)
    g = (l_+ - l_-) / (2 eps)                                                  ~ u^T grad L
    theta <- theta (1 - lr wd) - lr g H^{-1/2} z                               (H after its update)

E[g H^{-1/2} z] = H^{-1/2} E[z z^T] H^{-1/2} grad = H^{-1} grad: a diagonally preconditioned gradient step.

What the curvature update learns. kappa is one scalar for all coordinates, so H_i moves multiplicatively,
H_i <- H_i (1 - alpha + alpha kappa z_i^2); for a quadratic, with B = H^{-1/2} A H^{-1/2},
E[kappa z_i^2] = (tr B + 2 B_ii) / 2 (Gaussian z, A positive semi-definite), and H drifts to H_i = (d/2 + 1) A_ii:
the diagonal Hessian times the dimension factor that makes lr H^{-1} the stable ZO-SGD step. Two time scales: the
common scale of H adapts at rate ~ alpha kappa per step (fast), the shape across coordinates at rate ~ alpha / d
(d = trainable values: slow on an LLM), with log-spread noise ~ alpha kappa sqrt(2 t) after t steps. On LoRA
(SmolLM2, d = 460,800, eps 1e-2) kappa measured 5..50 per batch at the start, with both signs before the abs (LoRA's
Hessian at B = 0 is indefinite), so within a few thousand steps HiZOO mostly learns a curvature-normalised step
size: alpha must be ~1e-4 to act at all in 2,000 steps (the paper's 1e-6..1e-8 are for 10^8..10^10 values).

HiZOO-L (`factored=True`): for a matrix (higher-rank tensors viewed as rows x prod(rest)) H is kept as a rank-1 factor
pair, H_ij = R_i C_j / mean(R) (Adafactor's factorisation), m + n values instead of m n; each step R and C move
toward the row and column means of the same estimate D = kappa H z^2. Vectors keep a full diagonal. The factors are
updated after the step's update sweep, so the update uses H from the start of the step (one step of lag, against
HiZOO's H after its update: the difference is O(alpha)).

Sweeps: +eps u, -2 eps u, then one fused sweep: restore with the old H, update H, update theta (3, as MeZO's).
Restore: the same H^{-1/2} z is added and subtracted, so the drift bound is MeZO's (a few ulp).

Privacy (`dphizoo`, estimators from slimtune.privacy.dpzero): both scalars that depend on the batch are released
through DPZero's mechanism, on the same batch, and counted as two releases per step by the accountant:
- g: per example (l_+,i - l_-,i) / (2 eps), clipped to [-C, C], summed, + N(0, (sigma C)^2), / expected batch size;
- kappa: per example (l_+,i + l_-,i - 2 l_0,i) / (2 eps^2), clipped to [-C_k, C_k], summed, + N(0, (sigma C_k)^2),
  / expected batch size, then |.|; C_k has its own adaptive clipping (with its own noisy count) when g's has.
H, the update and the logged values are functions of these releases and of public seeds only (post-processing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.optim.base import StepOutput, mix_seed
from slimtune.optim.methods import METHOD_CONSTANTS
from slimtune.zo import precision
from slimtune.zo.mezo import MeZOConfig, ZOOptimizer



@dataclass
class HiZOOConfig(MeZOConfig):
    hessian_smooth: float = METHOD_CONSTANTS["hessian_smooth"]  # alpha: the step of the diagonal Hessian's average
    factored: bool = False  # HiZOO-L: rank-1 factors per matrix instead of a full diagonal


class MeanCurvature:
    """kappa = |mean_i(l_+,i + l_-,i - 2 l_0,i)| / (2 eps^2)."""

    def __call__(self, l0: torch.Tensor, lp: torch.Tensor, lm: torch.Tensor, eps: float) -> tuple[float, dict]:
        if lp.numel() == 0:
            return 0.0, {}
        second = (lp.double() + lm.double() - 2 * l0.double()).mean().item()
        return abs(second) / (2 * eps * eps), {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PrivateCurvature:
    """kappa through a DPZero scalar mechanism (`inner`, a PrivateDifference): its per-example value
    (a_i - b_i) / (2 e) with a_i = l_+,i + l_-,i - 2 l_0,i, b_i = 0, e = eps^2 is the per-example curvature,
    clipped, summed and noised like DPZero's scalar; the abs is post-processing."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, l0, lp, lm, eps):
        second = lp.double() + lm.double() - 2 * l0.double()
        released, info = self.inner(second, torch.zeros_like(second), eps * eps)
        return abs(released), {"curvature_" + k: v for k, v in info.items()}

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class DiagonalHessian:
    """H as a fp32 tensor of the parameter's shape, viewed rows x cols."""

    def __init__(self, p: torch.Tensor):
        self.rows = p.shape[0] if p.ndim >= 2 else 1
        self.cols = p.numel() // max(self.rows, 1)
        self.h = torch.ones(self.rows, self.cols, device=p.device, dtype=torch.float32)

    def block(self, r0: int, r1: int) -> torch.Tensor:
        return self.h[r0:r1]

    def begin_update(self) -> None:
        pass

    def update(self, r0: int, r1: int, z: torch.Tensor, kappa: float, alpha: float) -> torch.Tensor:
        """H <- H (1 - alpha + alpha kappa z^2) on rows r0:r1; returns the new H there."""
        h = self.h[r0:r1]
        return h.mul_(z.float().square().mul_(alpha * kappa).add_(1 - alpha))

    def finish_update(self, alpha: float) -> None:
        pass

    def state(self) -> dict:
        return {"h": self.h}

    def load(self, state: dict) -> None:
        self.h = state["h"].to(self.h.device, torch.float32).reshape(self.rows, self.cols)

    @property
    def numel(self) -> int:
        return self.h.numel()


class FactoredHessian(DiagonalHessian):
    """HiZOO-L: H_ij = R_i C_j / mean(R) for a rows x cols view (m + n values)."""

    def __init__(self, p: torch.Tensor):
        self.rows = p.shape[0] if p.ndim >= 2 else 1
        self.cols = p.numel() // max(self.rows, 1)
        self.r = torch.ones(self.rows, device=p.device, dtype=torch.float32)
        self.c = torch.ones(self.cols, device=p.device, dtype=torch.float32)
        self._new_r = self._col_sum = None

    def block(self, r0, r1):
        return self.r[r0:r1, None] * (self.c[None, :] / self.r.mean())

    def begin_update(self):
        self._new_r, self._col_sum = torch.empty_like(self.r), torch.zeros_like(self.c)

    def update(self, r0, r1, z, kappa, alpha):
        """Accumulate the row means and column sums of D = kappa H z^2; returns the H of the start of the step."""
        h = self.block(r0, r1)
        d = h * z.float().square() * kappa
        self._new_r[r0:r1] = self.r[r0:r1] * (1 - alpha) + alpha * d.mean(1)
        self._col_sum += d.sum(0)
        return h

    def finish_update(self, alpha):
        self.c.mul_(1 - alpha).add_(self._col_sum, alpha=alpha / self.rows)
        self.r.copy_(self._new_r)  # in place, as c: a state_dict taken before the step stays one step's state
        self._new_r = self._col_sum = None

    def state(self):
        return {"r": self.r, "c": self.c}

    def load(self, state):
        self.r = state["r"].to(self.r.device, torch.float32)
        self.c = state["c"].to(self.c.device, torch.float32)

    @property
    def numel(self) -> int:
        return self.r.numel() + self.c.numel()


class HiZOO(ZOOptimizer):
    name = "hizoo"

    def __init__(self, named_params, config: HiZOOConfig, estimator=None, curvature=None):
        super().__init__(named_params, config, estimator)
        if config.n_spsa != 1:
            raise ValueError("HiZOO takes one direction per step (n_spsa 1): its Hessian update follows each one")
        if not 0 < config.hessian_smooth < 1:
            raise ValueError(f"HiZOO's hessian_smooth must be in (0, 1), got {config.hessian_smooth}")
        self.name = "hizoo-l" if config.factored else "hizoo"
        self.curvature = curvature or MeanCurvature()
        kind = FactoredHessian if config.factored else DiagonalHessian
        self.hessian = [kind(p) if p.ndim >= 2 else DiagonalHessian(p) for _, p, _ in self.params]
        self._block_rows = [max(1, config.chunk_size // h.cols) for h in self.hessian]

    @property
    def forwards_per_step(self) -> int:
        return 3

    @property
    def hessian_values(self) -> int:
        """Values of curvature state kept (the memory HiZOO adds to MeZO)."""
        return sum(h.numel for h in self.hessian)

    def _step(self, closure) -> StepOutput:
        eps = self.config.eps
        seed = mix_seed(self.config.seed, self.step_count, 0)
        with torch.inference_mode():
            l0 = closure().detach()
        lp = self._measure(closure, seed, eps)
        lm = self._measure(closure, seed, -2 * eps)
        g, info = self.estimator(lp, lm, eps)
        kappa, curvature_info = self.curvature(l0, lp, lm, eps)
        with self._updating():
            self._sweep(seed, "restore_update", eps=eps, coef=g, decay=True, kappa=kappa)
            getattr(self.estimator, "end_step", lambda: None)()  # private: the (shared) noise moves to the next step
        loss = l0.float().mean().item() if l0.numel() else float("nan")
        return StepOutput(loss, {"projected_grad": g, "curvature": kappa, **info, **curvature_info})

    def _stateful(self) -> list:
        return [*super()._stateful(), self.curvature]  # DP-HiZOO: the curvature release's adaptive clip

    @torch.no_grad()
    def _sweep(self, seed: int, op: str, alpha: float = 0.0, eps: float = 0.0, coef: float = 0.0,
               decay: bool = False, last: bool = True, kappa: float = 0.0) -> None:
        """op "add": theta += alpha H^{-1/2} z. op "restore_update": theta += eps H^{-1/2} z (H of the step's start),
        H <- H (1 - a + a kappa z^2), theta *= (1 - lr wd), theta -= lr coef H^{-1/2} z (H after its update;
        HiZOO-L: of the step's start). Blocks of whole rows, at most ~chunk_size values (one row if longer)."""
        cfg = self.config
        generators: dict = {}
        offset, new_offset = self._begin_sweep(op, alpha)
        for (name, p, p_decays), hess, rows in zip(self.params, self.hessian, self._block_rows):
            gen = generators.get(p.device)
            if gen is None:
                gen = generators[p.device] = self.source.generator(seed, p.device)
            w = p.data.view(hess.rows, hess.cols)
            buf = self._block_buffer(p)
            if op != "add":
                hess.begin_update()
            low = precision.is_low_precision(p)
            for r0 in range(0, hess.rows, rows):
                r1 = min(r0 + rows, hess.rows)
                part = w[r0:r1]
                z, sign = self.source.draw(gen, buf, part.numel())
                z = z.view(part.shape)
                if low:
                    self._low_precision_block(seed, p, part, z, sign, hess, r0, r1, op, offset, new_offset, coef,
                                              kappa, decay and p_decays and cfg.weight_decay)
                    continue
                step = z * hess.block(r0, r1).rsqrt().to(part.dtype)
                if op == "add":
                    part.add_(step, alpha=alpha * sign)
                    continue
                part.add_(step, alpha=eps * sign)  # back to theta, with the very values added before
                new_h = hess.update(r0, r1, z, kappa, cfg.hessian_smooth)
                if decay and p_decays and cfg.weight_decay:
                    part.mul_(1 - cfg.lr * cfg.weight_decay)
                part.add_(z * new_h.rsqrt().to(part.dtype), alpha=-cfg.lr * coef * sign)
            if op != "add":
                hess.finish_update(cfg.hessian_smooth)
        self._offset = new_offset

    def _low_precision_block(self, seed, p, part, z, sign, hess, r0, r1, op, offset, new_offset, coef, kappa,
                             decays_here) -> None:
        """bf16 / fp16 weights (zo/precision.py): `part` holds rd(theta + offset d), d = sign z H^-1/2 with H of the
        step's start. "add": rd(theta + new_offset d). "restore_update": theta recovered from d, H updated, then
        theta' = SR(theta (1 - lr wd) - lr coef sign z H'^-1/2) (H': after its update; HiZOO-L: of the step's
        start), with the stochastic-rounding bits from the step seed (per parameter, in sweep order)."""
        scratch = self.__dict__.setdefault("_scratch", precision.Scratch())
        direction = z.float() * hess.block(r0, r1).rsqrt()
        if op == "add":
            precision.move_(part, direction, offset * sign, new_offset * sign, scratch)
            return
        precision.move_(part, direction, offset * sign, 0.0, scratch)  # theta, exactly (see precision.py)
        new_h = hess.update(r0, r1, z.float(), kappa, self.config.hessian_smooth)
        gen = self.__dict__.setdefault("_rounding", precision.RoundingStreams()).get(seed, p.device)
        lr = self.config.lr
        decay = 1 - lr * self.config.weight_decay if decays_here else 1.0
        precision.update_(part, z.float() * new_h.rsqrt(), 0.0, decay, -lr * coef * sign, gen, scratch)

    def _block_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """One reusable z buffer per (device, dtype), as large as the largest block drawn."""
        key = (p.device, p.dtype)
        buffers = self.__dict__.setdefault("_buffers", {})
        if key not in buffers:
            largest = max(min(h.rows, r) * h.cols for (_, q, _), h, r in zip(self.params, self.hessian,
                                                                              self._block_rows)
                          if (q.device, q.dtype) == key)
            buffers[key] = torch.empty(largest, device=p.device, dtype=p.dtype)
        return buffers[key]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "curvature": self.curvature.state_dict(),
                "hessian": {i: h.state() for i, h in enumerate(self.hessian)}}  # references, as torch's optimizers
        # give them: a checkpoint saves them at once, and a clone was a second whole Hessian (81 GB at 7B)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.curvature.load_state_dict(state.get("curvature", {}))
        for i, h in enumerate(self.hessian):
            h.load(state["hessian"][i])


__all__ = ["HiZOO", "HiZOOConfig", "MeanCurvature", "PrivateCurvature"]
