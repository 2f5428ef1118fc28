"""FZOO: batched one-sided zeroth-order steps scaled by the spread of the perturbed losses (Dang et al., 2025,
"FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models towards Adam-Scale Speed").

Per step, on one batch: l_0 = L(theta), and for N Rademacher directions u_i (from the step seed, the seed trick as in
MeZO) l_i = L(theta + eps u_i). Then

    g = (1/N) sum_i (l_i - l_0) / eps * u_i,        sigma = std(l_1, ..., l_N),
    theta <- theta - (lr / sigma) g.

N + 1 forward passes per step instead of MeZO's 2 per estimate, and the division by sigma (which is ~ eps |grad|)
normalises the step like normalised SGD: large steps where the loss is flat, small ones where it is steep. The lr is
therefore on a different scale from MeZO's (see optim/defaults.py). Sweeps: +eps u_i and -eps u_i per direction, then
one update sweep per direction once sigma is known (3N sweeps, as N MeZO estimates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimtune.optim.base import StepOutput, mix_seed
from slimtune.zo.mezo import MeZOConfig, ZOOptimizer


@dataclass
class FZOOConfig(MeZOConfig):
    n_perturbations: int = 8  # N one-sided directions per step (>= 2: sigma needs a spread)
    perturbation: str = "rademacher"


class FZOO(ZOOptimizer):
    name = "fzoo"

    def __init__(self, named_params, config: FZOOConfig, estimator=None):
        if config.n_perturbations < 2:
            raise ValueError("FZOO needs at least 2 perturbations per step (sigma is their losses' spread)")
        super().__init__(named_params, config, estimator)

    @property
    def forwards_per_step(self) -> int:
        return self.config.n_perturbations + 1  # l_0 and one per direction

    def _step(self, closure) -> StepOutput:
        eps, n = self.config.eps, self.config.n_perturbations
        with torch.inference_mode():
            base = closure().detach()
        if base.numel() == 0:
            with self._updating():
                pass
            return StepOutput(float("nan"), {"projected_grad": 0.0})
        l0 = base.float().mean().item()
        seeds, losses = [], []
        for i in range(n):
            seed = mix_seed(self.config.seed, self.step_count, i)
            lp = self._measure(closure, seed, eps)
            self._perturb(seed, -eps)  # back to theta (restore, a few ulp as in MeZO)
            seeds.append(seed)
            losses.append(lp.float().mean().item())
        sigma = float(torch.tensor(losses).std())
        slopes = [(l - l0) / eps for l in losses]
        with self._updating():
            if sigma > 0 and math.isfinite(sigma):
                for i, (seed, slope) in enumerate(zip(seeds, slopes)):
                    self._sweep(seed, "update", coef=slope / (n * sigma), decay=i == 0, last=i == n - 1)
        return StepOutput(l0, {"projected_grad": sum(slopes) / n, "loss_std": sigma})
