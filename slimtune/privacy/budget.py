"""The accountant in one call: the epsilon a private run spends, or the noise a budget needs.

    slimtune.privacy.epsilon(noise_multiplier=1.1, dataset_size=60_000, batch_size=256, steps=10_000)
    slimtune.privacy.noise_multiplier(epsilon=3, dataset_size=60_000, batch_size=256, steps=10_000)

Both use the same accountant as `slimtune train` and `slimtune.DPZero` (privacy/accountant.py, Google's
dp-accounting): each step is one Poisson-subsampled Gaussian mechanism (sampling rate batch_size / dataset_size)
under add/remove-one neighbours, or, with `sampling="shuffle"`, fixed-size batches drawn without replacement under
replace-one neighbours. A step that releases k noisy scalars on its batch (n-SPSA with k directions; DP-HiZOO: 2) is
one Gaussian mechanism with noise multiplier sigma / sqrt(k); adaptive clipping's count (noise `quantile_noise`)
joins each scalar as 1/sigma_pair^2 = 1/sigma^2 + 1/sigma_b^2.
"""

from __future__ import annotations

from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec, calibrate_noise, check_releases, check_spec


def _spec(target: float | None, delta: float, sampling: str, mechanism: str, accountant: str) -> PrivacySpec:
    from slimtune.privacy.accountant import check_names
    spec = PrivacySpec(target_epsilon=target, delta=delta, sampling=sampling, mechanism=mechanism,
                       accountant=accountant)
    check_names(spec)
    return spec


def epsilon(*, noise_multiplier: float, dataset_size: int, batch_size: int, steps: int, delta: float = 1e-5,
            releases: int = 1, quantile_noise: float = 0.0, sampling: str = "poisson", mechanism: str = "gaussian",
            accountant: str = "rdp") -> float:
    """Epsilon (at `delta`) after `steps` steps with noise multiplier sigma = `noise_multiplier`, on batches of
    expected size `batch_size` out of `dataset_size` examples.

    Args:
        noise_multiplier: sigma, the noise standard deviation on one released scalar (or gradient) divided by the
            clipped sum's sensitivity.
        dataset_size: N, the number of training examples.
        batch_size: the (expected, for Poisson sampling) batch size B; the sampling rate is B / N.
        steps: the number of steps composed.
        delta: the delta of the (epsilon, delta) guarantee; must be below 1 / N.
        releases: noisy scalars released per step on the same batch (n-SPSA's n; DP-HiZOO: 2 per direction).
        quantile_noise: sigma_b of adaptive clipping's noisy count released with each scalar (0: fixed clipping).
        sampling: `poisson` (exact) or `shuffle` (fixed-size batches, accounted as sampling without replacement).
        mechanism: `gaussian` or `laplace` (Laplace: accounted with PLD).
        accountant: `rdp` or `pld` (tighter).
    """
    spec = _spec(None, delta, sampling, mechanism, accountant)
    check_spec(spec, dataset_size)
    check_releases(spec, releases)
    return PrivacyAccountant(spec, dataset_size, batch_size, noise_multiplier, releases,
                             quantile_noise=quantile_noise).epsilon(steps)


def noise_multiplier(*, epsilon: float, dataset_size: int, batch_size: int, steps: int, delta: float = 1e-5,
                     releases: int = 1, sampling: str = "poisson", mechanism: str = "gaussian",
                     accountant: str = "rdp") -> float:
    """The smallest noise multiplier sigma whose epsilon after `steps` steps is at most `epsilon` (bisection on the
    accountant; arguments as `epsilon()`)."""
    spec = _spec(epsilon, delta, sampling, mechanism, accountant)
    return calibrate_noise(spec, dataset_size, batch_size, steps, releases)


__all__ = ["epsilon", "noise_multiplier"]
