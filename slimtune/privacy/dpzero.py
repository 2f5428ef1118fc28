"""DPZero (Zhang et al., ICML 2024): privatize the scalar finite difference, not a gradient vector.

Per example i: g_i = (l_i(theta + eps z) - l_i(theta - eps z)) / (2 eps), clipped to [-C, C]. The released scalar is
    g_hat = (sum_i clip(g_i) + noise) / B_expected,
with noise ~ N(0, (sigma * Delta)^2) (or Laplace with scale b * Delta), Delta the sensitivity of the clipped sum:
Delta = C under Poisson sampling (add/remove one example), Delta = 2C for fixed-size batches (replace one example).
Dividing by the *expected* batch size q*N keeps the realised batch size (which is private) out of the release.
The direction z is public (a seed), so the update theta -= lr * g_hat * z is post-processing.
An empty Poisson batch releases noise alone: the accounted mechanism runs on every step.

The noise generator is seeded from OS entropy unless a seed is given (the trainer passes one derived from the run's
secret, see privacy/secret.py); never pass a seed derived from public settings.
"""

from __future__ import annotations

import math

import torch

from slimtune.privacy.accountant import PrivacySpec, sensitivity
from slimtune.privacy.secret import fresh_secret


class PrivateDifference:
    def __init__(self, spec: PrivacySpec, noise_multiplier: float, expected_batch_size: float,
                 noise_seed: int | None = None):
        self.spec, self.noise_multiplier, self.expected_batch_size = spec, noise_multiplier, expected_batch_size
        seed = noise_seed if noise_seed is not None else fresh_secret()
        self.generator = torch.Generator().manual_seed(seed)

    def clipped_sum(self, losses_plus: torch.Tensor, losses_minus: torch.Tensor, eps: float) -> tuple[float, float]:
        """Sum of per-example clipped differences, and the fraction of examples that were clipped."""
        per_example = (losses_plus.double() - losses_minus.double()) / (2 * eps)
        clipped = per_example.clamp(-self.spec.clip, self.spec.clip)
        frac = (per_example.abs() > self.spec.clip).double().mean().item() if per_example.numel() else 0.0
        return clipped.sum().item(), frac

    def noise(self) -> float:
        scale = self.noise_multiplier * sensitivity(self.spec)
        if self.spec.mechanism == "laplace":
            u = torch.rand((), generator=self.generator, dtype=torch.float64).item() - 0.5  # inverse CDF
            return -scale * math.copysign(1.0, u) * math.log1p(-2 * abs(u))
        return scale * torch.randn((), generator=self.generator, dtype=torch.float64).item()

    def __call__(self, losses_plus, losses_minus, eps) -> tuple[float, dict]:
        total, frac = self.clipped_sum(losses_plus, losses_minus, eps)
        return (total + self.noise()) / self.expected_batch_size, {"clipped_fraction": frac,
                                                                   "batch_size": int(losses_plus.numel())}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
