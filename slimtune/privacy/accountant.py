"""Privacy accounting with Google's dp-accounting (RDP or PLD): calibrate sigma, track epsilon per step.

Each training step is one subsampled mechanism on the scalar (DPZero) or on the clipped gradient (DP-SGD):
- sampling "poisson": PoissonSampledDpEvent(q, M) under add/remove-one neighbours (sensitivity C);
- sampling "shuffle": fixed-size batches drawn without replacement, SampledWithoutReplacementDpEvent(N, B, M) under
  replace-one neighbours (sensitivity 2C). A reshuffled epoch is *not* this mechanism exactly; we account it as
  independent sampling without replacement per step, the usual approximation, and warn.
M is GaussianDpEvent(sigma) or LaplaceDpEvent(b) with sigma/b the noise scale relative to the sensitivity.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import logging

import dp_accounting
from dp_accounting import pld, rdp

from slimtune import SlimtuneError

# RDP orders that fail to converge are excluded by dp-accounting itself; its per-order warnings are noise.
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass
class PrivacySpec:
    target_epsilon: float | None = None  # calibrate noise to this budget (or pass noise_multiplier)
    delta: float = 1e-5
    noise_multiplier: float | None = None
    clip: float = 1.0
    sampling: str = "poisson"  # or "shuffle"
    mechanism: str = "gaussian"  # or "laplace" (accounted with PLD)
    accountant: str = "rdp"  # or "pld"


class PrivacyAccountant:
    """Epsilon spent after t steps of one mechanism (fresh composition each query: exact, no drift)."""

    def __init__(self, spec: PrivacySpec, num_examples: int, batch_size: int, noise_multiplier: float):
        self.spec, self.n, self.batch_size, self.noise = spec, num_examples, batch_size, noise_multiplier
        if spec.sampling == "shuffle":
            warnings.warn("fixed-size shuffled batches: accounted as sampling without replacement per step "
                          "(replace-one neighbours, sensitivity 2C); Poisson sampling is the exact assumption",
                          stacklevel=2)
        self._cache: dict[int, float] = {0: 0.0}

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.batch_size / self.n)

    def event(self) -> dp_accounting.DpEvent:
        return step_event(self.spec, self.n, self.batch_size, self.noise)

    def epsilon(self, steps: int) -> float:
        if steps not in self._cache:
            acc = make_accountant(self.spec)
            acc.compose(self.event(), steps)
            self._cache[steps] = acc.get_epsilon(self.spec.delta)
        return self._cache[steps]


def base_mechanism(spec: PrivacySpec, noise: float) -> dp_accounting.DpEvent:
    if spec.mechanism == "laplace":
        return dp_accounting.LaplaceDpEvent(noise)
    if spec.mechanism == "gaussian":
        return dp_accounting.GaussianDpEvent(noise)
    raise SlimtuneError(f"unknown DP mechanism {spec.mechanism!r} (gaussian or laplace)")


def step_event(spec: PrivacySpec, n: int, batch_size: int, noise: float) -> dp_accounting.DpEvent:
    mech = base_mechanism(spec, noise)
    if spec.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(min(1.0, batch_size / n), mech)
    if spec.sampling == "shuffle":
        return dp_accounting.SampledWithoutReplacementDpEvent(n, batch_size, mech)
    raise SlimtuneError(f"unknown sampling {spec.sampling!r} (poisson or shuffle)")


def make_accountant(spec: PrivacySpec) -> dp_accounting.PrivacyAccountant:
    relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if spec.sampling == "shuffle"
                else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    if spec.accountant == "pld" or spec.mechanism == "laplace":
        if spec.sampling == "shuffle":
            raise SlimtuneError("the PLD accountant (needed for Laplace noise) supports Poisson sampling only")
        return pld.PLDAccountant(neighboring_relation=relation)
    if spec.accountant != "rdp":
        raise SlimtuneError(f"unknown accountant {spec.accountant!r} (rdp or pld)")
    return rdp.RdpAccountant(neighboring_relation=relation)


def sensitivity(spec: PrivacySpec) -> float:
    """Of the clipped sum: C under add/remove (Poisson), 2C under replace-one (fixed-size batches)."""
    return spec.clip * (2.0 if spec.sampling == "shuffle" else 1.0)


def calibrate_noise(spec: PrivacySpec, num_examples: int, batch_size: int, steps: int) -> float:
    """Smallest noise multiplier whose epsilon after `steps` is <= target (bisection on sigma to 1e-5); refuses impossible budgets."""
    check_spec(spec, num_examples)
    if spec.target_epsilon is None:
        raise SlimtuneError("calibration needs a target epsilon")

    def event(noise: float):
        return dp_accounting.SelfComposedDpEvent(step_event(spec, num_examples, batch_size, noise), steps)

    low = 0.1 if spec.mechanism == "laplace" else 1e-3  # PLD overflows for Laplace scales far below 1/epsilon
    try:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(spec), event, spec.target_epsilon, spec.delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(low, 1e4), tol=1e-5))  # tolerance on the noise; epsilon is steep in it
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise SlimtuneError(f"privacy budget epsilon={spec.target_epsilon}, delta={spec.delta} cannot be met with "
                            f"{steps} steps at sampling rate {batch_size / num_examples:.4g} ({exc}); use fewer steps, "
                            "a smaller batch or a larger epsilon") from None


def check_spec(spec: PrivacySpec, num_examples: int) -> None:
    if not 0 < spec.delta < 1:
        raise SlimtuneError(f"delta must be in (0, 1), got {spec.delta}")
    if spec.delta >= 1 / num_examples:
        raise SlimtuneError(f"delta={spec.delta} >= 1/N = {1 / num_examples:.3g}: such a delta allows leaking a whole "
                            "example; choose delta < 1/N")
    if spec.target_epsilon is not None and spec.target_epsilon <= 0:
        raise SlimtuneError(f"target epsilon must be > 0, got {spec.target_epsilon}")
    if spec.clip <= 0:
        raise SlimtuneError(f"clip threshold must be > 0, got {spec.clip}")


def plan(spec: PrivacySpec, num_examples: int, batch_size: int, steps: int) -> PrivacyAccountant:
    """Pick (or check) the noise for a run of `steps` and return its accountant; refuse budgets that cannot be met."""
    check_spec(spec, num_examples)
    noise = spec.noise_multiplier
    if noise is None:
        noise = calibrate_noise(spec, num_examples, batch_size, steps)
    accountant = PrivacyAccountant(spec, num_examples, batch_size, noise)
    if spec.target_epsilon is not None and accountant.epsilon(steps) > spec.target_epsilon * 1.001:
        raise SlimtuneError(f"noise multiplier {noise} spends epsilon={accountant.epsilon(steps):.3g} in {steps} steps, "
                            f"over the requested budget epsilon={spec.target_epsilon}: refusing to start "
                            "(raise the noise, lower the steps, or omit --noise-multiplier to calibrate)")
    return accountant
