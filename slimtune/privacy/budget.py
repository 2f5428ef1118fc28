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

from slimtune import SlimtuneError
from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec, calibrate_noise, check_releases, check_spec
from slimtune.settings.train import MIN_NOISE_MULTIPLIER

CONTEXT = {"optimizer": "dpzero"}  # the settings' applicability rules: these are a private run's settings
ALIASES = {"releases": "n_spsa"}  # keyword -> the train setting it is checked as (its rule, its CLI flag's name)


def _arguments(owner: str, values: dict, extra: tuple) -> dict:
    """Every argument checked up front, by the rules of the train setting it is (settings/python.py: type, range,
    choices), or by its own (`extra`); then B <= N. One line naming the keyword, never an answer for nonsense (a NaN
    sigma priced as epsilon 0) or a library's traceback."""
    from slimtune.settings.python import argument, check_keywords

    extra = dict((argument("dataset_size", "int", low=1), argument("batch_size", "int", low=1),
                  argument("steps", "int", low=1), *extra))
    checked = check_keywords(owner, values, CONTEXT, ALIASES, extra=extra)
    if checked["batch_size"] > checked["dataset_size"]:  # as slimtune.DPZero: a sampling rate above 1 is no rate
        raise SlimtuneError(f"{owner}: batch_size={checked['batch_size']} is larger than dataset_size="
                            f"{checked['dataset_size']}: the sampling rate is batch_size / dataset_size")
    return checked


def _spec(target: float | None, delta: float, sampling: str, mechanism: str, accountant: str,
          pld_discretization: float) -> PrivacySpec:
    return PrivacySpec(target_epsilon=target, delta=delta, sampling=sampling, mechanism=mechanism,
                       accountant=accountant, pld_discretization=pld_discretization)


def epsilon(*, noise_multiplier: float, dataset_size: int, batch_size: int, steps: int, delta: float = 1e-5,
            releases: int = 1, quantile_noise: float = 0.0, sampling: str = "poisson", mechanism: str = "gaussian",
            accountant: str = "rdp", pld_discretization: float = 1e-3) -> float:
    """Epsilon (at `delta`) after `steps` steps with noise multiplier sigma = `noise_multiplier`, on batches of
    expected size `batch_size` out of `dataset_size` examples.

    Args:
        noise_multiplier: sigma, the noise standard deviation on one released scalar (or gradient) divided by the
            clipped sum's sensitivity; at least 1e-3 (with the PLD accountant, 0.1 on the step's effective noise).
        dataset_size: N, the number of training examples.
        batch_size: the (expected, for Poisson sampling) batch size B; the sampling rate is B / N.
        steps: the number of steps composed.
        delta: the delta of the (epsilon, delta) guarantee; must be below 1 / N.
        releases: noisy scalars released per step on the same batch (n-SPSA's n; DP-HiZOO: 2 per direction).
        quantile_noise: sigma_b of adaptive clipping's noisy count released with each scalar (0: fixed clipping).
        sampling: `poisson` (exact) or `shuffle` (fixed-size batches, accounted as sampling without replacement).
        mechanism: `gaussian` or `laplace` (Laplace: accounted with PLD).
        accountant: `rdp` or `pld` (tighter).
        pld_discretization: the PLD accountant's value discretisation (pessimistic; finer is tighter and slower).
    """
    from slimtune.settings.python import argument, python_terms

    owner = "slimtune.privacy.epsilon"
    a = _arguments(owner, dict(noise_multiplier=noise_multiplier, dataset_size=dataset_size, batch_size=batch_size,
                               steps=steps, delta=delta, releases=releases, quantile_noise=quantile_noise,
                               sampling=sampling, mechanism=mechanism, accountant=accountant,
                               pld_discretization=pld_discretization),
                   (argument("noise_multiplier", "float", low=MIN_NOISE_MULTIPLIER),
                    argument("quantile_noise", "float", low=0)))
    if 0 < a["quantile_noise"] < MIN_NOISE_MULTIPLIER:  # 0: fixed clipping, no count released
        raise SlimtuneError(f"{owner}: quantile_noise={quantile_noise!r}: below {MIN_NOISE_MULTIPLIER:g}, the least "
                            "noise the accountant prices; use a larger quantile_noise, or 0 (fixed clipping)")
    with python_terms(owner, ALIASES):  # the accountant's own checks (delta < 1/N, Laplace) speak the CLI's flags
        spec = _spec(None, a["delta"], a["sampling"], a["mechanism"], a["accountant"], a["pld_discretization"])
        check_spec(spec, a["dataset_size"])
        check_releases(spec, a["releases"])
        return PrivacyAccountant(spec, a["dataset_size"], a["batch_size"], a["noise_multiplier"], a["releases"],
                                 quantile_noise=a["quantile_noise"]).epsilon(a["steps"])


def noise_multiplier(*, epsilon: float, dataset_size: int, batch_size: int, steps: int, delta: float = 1e-5,
                     releases: int = 1, sampling: str = "poisson", mechanism: str = "gaussian",
                     accountant: str = "rdp", pld_discretization: float = 1e-3) -> float:
    """The smallest noise multiplier sigma whose epsilon after `steps` steps is at most `epsilon` (bisection on the
    accountant; arguments as `epsilon()`)."""
    from slimtune.settings.python import argument, python_terms

    owner = "slimtune.privacy.noise_multiplier"
    a = _arguments(owner, dict(epsilon=epsilon, dataset_size=dataset_size, batch_size=batch_size, steps=steps,
                               delta=delta, releases=releases, sampling=sampling, mechanism=mechanism,
                               accountant=accountant, pld_discretization=pld_discretization),
                   (argument("epsilon", "float", low=0, low_open=True),))
    with python_terms(owner, ALIASES):
        spec = _spec(a["epsilon"], a["delta"], a["sampling"], a["mechanism"], a["accountant"], a["pld_discretization"])
        return calibrate_noise(spec, a["dataset_size"], a["batch_size"], a["steps"], a["releases"])


__all__ = ["epsilon", "noise_multiplier"]
