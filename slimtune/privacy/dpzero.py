"""DPZero (Zhang et al., ICML 2024): privatize the scalar finite difference, not a gradient vector.

Per example i: g_i = (l_i(theta + eps z) - l_i(theta - eps z)) / (2 eps), clipped to [-C, C]. The released scalar is
    g_hat = (sum_i clip(g_i) + noise) / B_expected,
with noise ~ N(0, (sigma * Delta)^2) (or Laplace with scale b * Delta), Delta the sensitivity of the clipped sum:
Delta = C under Poisson sampling (add/remove one example), Delta = 2C for fixed-size batches (replace one example).
Dividing by the *expected* batch size q*N keeps the realised batch size (which is private) out of the release.
The direction z is public (a seed), so the update theta -= lr * g_hat * z is post-processing.
An empty Poisson batch releases noise alone: the accounted mechanism runs on every step.

Adaptive clipping (default; Andrew et al., NeurIPS 2021, for a scalar per example): with each g_hat the estimator
releases the noisy fraction of examples it left unclipped,
    f = (sum_i 1[|g_i| <= C] + N(0, sigma_b^2)) / B_expected,
and moves the tracked quantile Q geometrically toward the target quantile gamma of |g_i|: Q <- Q exp(-eta (f - gamma)),
f counted at Q. The scalar is clipped at C = m Q (`clip_multiplier` m): on SST-2 the |g_i| are heavy-tailed, so
clipping at the 0.9 quantile itself still removes much of the signal, while tracking a higher quantile directly is
unstable (the counts are too noisy near 1, C runs away and the noise sigma C / B with it). The count has sensitivity 1;
the accountant composes it with the scalar (privacy/accountant.py). Q and C are functions of released values only, so
they are public and logged. The scale of the finite differences never needs to be known: a hand-set C does.

Exact arithmetic on a grid (Mironov, CCS 2012): a release computed in floating point, clipped sum + float noise, can
take values whose set depends on the sum (the noise's doubles are unevenly spaced: for Laplace noise from
log1p(-2|u|), one release told an empty batch from its neighbour with probability ~0.8). So each clipped g_i is
rounded to the grid gamma = 2^(floor(log2 C) - 30) (|round(g_i / gamma)| <= floor(C / gamma): the sensitivity stays
<= C), the sum is an exact integer, the noise is drawn as an integer on the same grid (discrete Laplace; a rounded
Gaussian), and the release is gamma (sum + noise) / B_expected: neighbouring batches give the same set of outputs,
shifted by exactly their difference. The grid is 2^-30 of C, far below the noise (sigma C), so accuracy is unchanged.

The noise comes from a `KeyedNoise` (privacy/secret.py): the trainer passes the run's, keyed by its 256-bit secret key
and the step; without one, a fresh in-memory key is drawn from the OS. No generator state is kept or saved.
"""

from __future__ import annotations

import math

import torch

from slimtune.privacy.accountant import PrivacySpec, sensitivity
from slimtune.privacy.secret import KeyedNoise, RunKey


GRID_BITS = 30  # the grid is 2^-30 of the clip (rounded to a power of two)


class PrivateDifference:
    def __init__(self, spec: PrivacySpec, noise_multiplier: float, expected_batch_size: float,
                 noise: KeyedNoise | None = None, quantile_noise: float = 0.0):
        self.spec, self.noise_multiplier, self.expected_batch_size = spec, noise_multiplier, expected_batch_size
        self.quantile_noise = quantile_noise  # sigma_b > 0: adaptive clipping
        self.quantile = spec.clip  # adaptive: the tracked quantile Q of |g_i| (starts at --clip)
        self.clip = spec.clip * (spec.clip_multiplier if quantile_noise > 0 else 1.0)  # the C the scalar is clipped at
        self.keyed_noise = noise if noise is not None else KeyedNoise(RunKey.fresh())

    @property
    def adaptive(self) -> bool:
        return self.quantile_noise > 0

    def per_example(self, losses_plus: torch.Tensor, losses_minus: torch.Tensor, eps: float) -> torch.Tensor:
        """g_i; a non-finite difference (both losses overflowed, nan) counts as 0 and +-inf as +-C's side, so one row
        can never make the release non-finite (clamp keeps nan: that would be a per-example signal)."""
        g = (losses_plus.double() - losses_minus.double()) / (2 * eps)
        return torch.nan_to_num(g, nan=0.0, posinf=float("inf"), neginf=float("-inf"))

    @property
    def grid(self) -> float:
        """gamma: the power of two 2^-30 of C (rounded down) that clipped values, their sum and the noise live on."""
        return 2.0 ** (math.floor(math.log2(self.clip)) - GRID_BITS)

    def clipped_units(self, losses_plus: torch.Tensor, losses_minus: torch.Tensor, eps: float) -> tuple[int, float]:
        """Sum of per-example clipped differences in grid units (an exact integer), and the fraction of examples
        that were clipped."""
        g = self.per_example(losses_plus, losses_minus, eps)
        frac = (g.abs() > self.clip).double().mean().item() if g.numel() else 0.0
        limit = math.floor(self.clip / self.grid)
        units = torch.round(g.clamp(-self.clip, self.clip) / self.grid).clamp(-limit, limit).to(torch.int64)
        return int(units.sum()), frac

    def clipped_sum(self, losses_plus: torch.Tensor, losses_minus: torch.Tensor, eps: float) -> tuple[float, float]:
        """`clipped_units` in the losses' units (exact: an integer times a power of two)."""
        units, frac = self.clipped_units(losses_plus, losses_minus, eps)
        return units * self.grid, frac

    def noise_units(self) -> int:
        """The noise in grid units: discrete Laplace of scale b Delta / gamma, or round(sigma Delta / gamma x N(0, 1))."""
        scale = self.noise_multiplier * sensitivity(self.spec, self.clip) / self.grid
        if self.spec.mechanism == "laplace":
            return self.keyed_noise.discrete_laplace(scale)
        return self.keyed_noise.rounded_normal(scale)

    def noise(self) -> float:
        """One noise draw in the losses' units (`noise_units` x gamma)."""
        return self.noise_units() * self.grid

    def __call__(self, losses_plus, losses_minus, eps) -> tuple[float, dict]:
        """The released scalar and diagnostics: `clip` (public) and the private clipped_fraction/batch_size."""
        clip, grid = self.clip, self.grid
        total, frac = self.clipped_units(losses_plus, losses_minus, eps)
        released = (total + self.noise_units()) * grid / self.expected_batch_size  # an exact integer x a power of two
        if self.adaptive:
            below = (self.per_example(losses_plus, losses_minus, eps).abs() <= self.quantile).double().sum().item()
            count_grid = 2.0 ** -GRID_BITS  # the count (sensitivity 1) on its own exact grid, as the scalar
            units = round(below) * 2 ** GRID_BITS + self.keyed_noise.rounded_normal(self.quantile_noise / count_grid)
            noisy_fraction = units * count_grid / self.expected_batch_size
            self.quantile *= math.exp(-self.spec.clip_lr * (noisy_fraction - self.spec.target_quantile))
            self.clip = self.quantile * self.spec.clip_multiplier
        return released, {"clip": clip, "clipped_fraction": frac, "batch_size": int(losses_plus.numel())}

    def end_step(self) -> None:
        """Called by the optimizer after each step (a user's own loop numbers its steps this way)."""
        self.keyed_noise.end_step()

    def state_dict(self) -> dict:
        """Public values only (C and Q follow from released counts); the noise has no state to save."""
        return {"clip": self.clip, "quantile": self.quantile}

    def load_state_dict(self, state: dict) -> None:
        self.clip = state.get("clip", self.clip)
        self.quantile = state.get("quantile", self.quantile)
