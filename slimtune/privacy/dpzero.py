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

The noise comes from a `KeyedNoise` (privacy/secret.py): the trainer passes the run's, keyed by its 256-bit secret key
and the step; without one, a fresh in-memory key is drawn from the OS. No generator state is kept or saved.
"""

from __future__ import annotations

import math

import torch

from slimtune.privacy.accountant import PrivacySpec, sensitivity
from slimtune.privacy.secret import KeyedNoise, RunKey


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

    def clipped_sum(self, losses_plus: torch.Tensor, losses_minus: torch.Tensor, eps: float) -> tuple[float, float]:
        """Sum of per-example clipped differences, and the fraction of examples that were clipped."""
        g = self.per_example(losses_plus, losses_minus, eps)
        frac = (g.abs() > self.clip).double().mean().item() if g.numel() else 0.0
        return g.clamp(-self.clip, self.clip).sum().item(), frac

    def _gaussian(self) -> float:
        return self.keyed_noise.normal()

    def noise(self) -> float:
        scale = self.noise_multiplier * sensitivity(self.spec, self.clip)
        if self.spec.mechanism == "laplace":
            u = self.keyed_noise.uniform() - 0.5  # inverse CDF
            return -scale * math.copysign(1.0, u) * math.log1p(-2 * abs(u))
        return scale * self._gaussian()

    def __call__(self, losses_plus, losses_minus, eps) -> tuple[float, dict]:
        """The released scalar and diagnostics: `clip` (public) and the private clipped_fraction/batch_size."""
        clip = self.clip
        total, frac = self.clipped_sum(losses_plus, losses_minus, eps)
        released = (total + self.noise()) / self.expected_batch_size
        if self.adaptive:
            below = (self.per_example(losses_plus, losses_minus, eps).abs() <= self.quantile).double().sum().item()
            noisy_fraction = (below + self.quantile_noise * self._gaussian()) / self.expected_batch_size
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
