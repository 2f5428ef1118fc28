"""Privacy accounting with Google's dp-accounting (RDP or PLD): calibrate sigma, track epsilon per step.

Each training step is one subsampled mechanism on the clipped sums (DPZero) or on the clipped gradient (DP-SGD):
- sampling "poisson": PoissonSampledDpEvent(q, M) under add/remove-one neighbours (sensitivity C);
- sampling "shuffle": fixed-size batches drawn without replacement, SampledWithoutReplacementDpEvent(N, B, M) under
  replace-one neighbours (sensitivity 2C). A reshuffled epoch is *not* this mechanism exactly; we account it as
  independent sampling without replacement per step, the usual approximation, and warn.
M is GaussianDpEvent(sigma / sqrt(k)) or LaplaceDpEvent(b), the noise scale relative to the sensitivity:
- a step may release k noisy scalars computed on the same batch (n-SPSA with k = n directions). Each scalar is a
  clipped sum with its own N(0, (sigma Delta)^2) noise, so the k-vector has L2 sensitivity Delta sqrt(k): one Gaussian
  mechanism with noise multiplier sigma / sqrt(k). `noise_multiplier` is always sigma, the noise on *one* scalar.
  Laplace noise with k > 1 is refused (its PLD under Poisson sampling is not supported by dp-accounting).
- adaptive clipping (DPZero, Andrew et al. 2021): each released scalar comes with a noisy count of the examples it
  did not clip (sensitivity 1, noise sigma_b), from which C follows a geometric quantile update. The pair (sum, count)
  is one Gaussian mechanism with 1/sigma_pair^2 = 1/sigma^2 + 1/sigma_b^2; with k pairs a step, sigma_pair / sqrt(k).
A run is a list of segments (steps, N, B, sigma, k, sigma_b): a resumed run with another batch size or n-SPSA
composes its past steps at their own sampling rate; `history(t)` is what the checkpoint stores.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, replace

import dp_accounting
from dp_accounting import pld, rdp

from slimtune import SlimtuneError
from slimtune.settings.train import MIN_NOISE_MULTIPLIER

# The least noise the PLD accountant prices at its default --pld-discretization (1e-3): a Gaussian step's privacy-loss
# distribution has ~1 / (sigma^2 * discretisation) points, and composing steps widens it. Measured (one thread,
# dp-accounting 0.4): sigma 0.1, 100 steps at q 0.016: 1.3 s, 190 MB; 10,000 steps at q 1: 9.5 s, 1.3 GB. Sigma 0.05:
# 10,000 steps at q 0.016 need more than 3 GB; 0.02: 19 s for one step; 1e-3: a 3.8 GiB array; 1e-4: 373 GiB.
# A finer discretisation raises the floor as 1 / sqrt(discretisation) (sigma 0.316 at 1e-4 costs what 0.1 does at 1e-3).
PLD_MIN_NOISE = 0.1
# Noise above this is priced as this (dp-accounting squares sigma: 1e155 overflows). Less noise than the step had,
# so the epsilon is an upper bound; at this level it is 0 to double precision.
PRICED_NOISE_CEILING = 1e100

# RDP orders that fail to converge are excluded by dp-accounting itself; its per-order warnings are noise.
logging.getLogger("absl").setLevel(logging.ERROR)


class Unaccountable(SlimtuneError):
    """dp-accounting cannot price these releases (a privacy-loss distribution too large for memory, an epsilon that
    overflows or is not a number): never an epsilon. Noise calibration counts such a probe as over budget."""


def pld_noise_floor(discretization: float) -> float:
    """The least effective Gaussian noise multiplier the PLD accountant is asked to price: PLD_MIN_NOISE at the
    default --pld-discretization 1e-3 (below it the privacy-loss distribution outgrows memory in a few steps), lower
    at a coarser discretization (cost ~ 1 / (sigma^2 x discretization)), never below MIN_NOISE_MULTIPLIER. A finer
    discretization does not raise it: its cost also grows with the sampling rate and the steps, which this floor
    does not see (sigma 0.9 over 1,000 Poisson steps at 1e-5 prices in seconds), so a finer grid is the user's choice
    of cost, and one that runs out of memory is still one line (`pld_memory_message`)."""
    return max(MIN_NOISE_MULTIPLIER, min(PLD_MIN_NOISE, PLD_MIN_NOISE * math.sqrt(1e-3 / discretization)))


def uses_pld(spec: "PrivacySpec") -> bool:
    return spec.accountant == "pld" or spec.mechanism == "laplace"


def check_noise(spec: "PrivacySpec", noise: float, releases: int = 1, quantile_noise: float = 0.0,
                pld_used: bool | None = None) -> None:
    """The noise of a step, refused (one line) where no accountant here can price it: a noise multiplier (or
    adaptive clipping's count noise) below MIN_NOISE_MULTIPLIER, whatever the accountant (RDP prices sigma ~1e-152
    at epsilon 0: its arithmetic gives NaN); with PLD, an effective multiplier below `pld_noise_floor`."""
    if not math.isfinite(noise) or noise < MIN_NOISE_MULTIPLIER:
        raise SlimtuneError(f"noise multiplier {noise:g} is below {MIN_NOISE_MULTIPLIER:g}, the least noise the "
                            "privacy accountant prices (so little noise leaves nothing private to account); use "
                            f"--noise-multiplier >= {MIN_NOISE_MULTIPLIER:g}, or a target --epsilon")
    if quantile_noise and (not math.isfinite(quantile_noise) or quantile_noise < MIN_NOISE_MULTIPLIER):
        raise SlimtuneError(f"adaptive clipping's count noise (quantile noise) {quantile_noise:g} is below "
                            f"{MIN_NOISE_MULTIPLIER:g}, the least noise the privacy accountant prices; use a larger "
                            "quantile noise, or 0 (fixed clipping)")
    if (uses_pld(spec) if pld_used is None else pld_used) and spec.mechanism == "gaussian":
        effective, floor = effective_noise(noise, releases, quantile_noise), pld_noise_floor(spec.pld_discretization)
        if effective < floor:
            why = [f"{releases} releases a step"] * (releases > 1) + \
                ["adaptive clipping's counts"] * bool(quantile_noise)
            detail = f" ({effective:.3g} for the step as a whole, with {' and '.join(why)})" if why else ""
            raise SlimtuneError(f"noise multiplier {noise:g}{detail}: the PLD accountant at --pld-discretization "
                                f"{spec.pld_discretization:g} cannot price noise below {floor:.3g} (its privacy-loss "
                                "distribution outgrows memory); use --accountant rdp, a larger --noise-multiplier, or a coarser "
                                "--pld-discretization")


def pld_memory_message(spec: "PrivacySpec", noise: float) -> str:
    return (f"noise multiplier {noise:g}: the PLD accountant at --pld-discretization {spec.pld_discretization:g} ran "
            "out of memory pricing these steps (too little noise, or too many steps, for its privacy-loss "
            "distribution); use --accountant rdp, or a larger --noise-multiplier")


@dataclass
class PrivacySpec:
    target_epsilon: float | None = None  # calibrate noise to this budget (or pass noise_multiplier)
    delta: float = 1e-5
    noise_multiplier: float | None = None  # sigma: noise std on one released scalar / gradient, relative to Delta
    clip: float = 1.0
    sampling: str = "poisson"  # or "shuffle"
    mechanism: str = "gaussian"  # or "laplace" (accounted with PLD)
    accountant: str = "rdp"  # or "pld" (tighter, slower)
    pld_discretization: float = 1e-3  # PLD value discretisation; pessimistic, so coarser is still an upper bound
    clipping: str = "auto"  # "adaptive" (DPZero default: C tracks a quantile privately), "fixed", "auto"
    target_quantile: float = 0.9  # adaptive: fraction of per-example scalars left unclipped
    clip_lr: float = 0.2  # adaptive: Q <- Q exp(-clip_lr (fraction_below_Q - target_quantile))
    clip_multiplier: float = 2.0  # adaptive: clip at C = clip_multiplier * Q (2 chosen on an SST-2 train split)


@dataclass
class Segment:
    """`steps` consecutive steps with the same sampling rate, noise and releases per step."""

    steps: int
    num_examples: int
    batch_size: int
    noise_multiplier: float
    releases: int = 1
    quantile_noise: float = 0.0  # sigma_b of the adaptive-clipping count released with each scalar (0: fixed C)
    mechanism: str | None = None  # the noise its releases had; None (ledgers written before it was recorded): the
    sampling: str | None = None  # accounting run's own, as it was then. Sampling fixes the neighbouring relation.

    @classmethod
    def from_dict(cls, d: dict) -> "Segment":
        return cls(int(d["steps"]), int(d["num_examples"]), int(d["batch_size"]), float(d["noise_multiplier"]),
                   int(d.get("releases", 1)), float(d.get("quantile_noise", 0.0)), d.get("mechanism"),
                   d.get("sampling"))


class PrivacyAccountant:
    """Epsilon spent after t steps: the `past` segments, then the current settings (fresh composition each query)."""

    def __init__(self, spec: PrivacySpec, num_examples: int, batch_size: int, noise_multiplier: float,
                 releases: int = 1, past: list[Segment] | tuple = (), quantile_noise: float = 0.0,
                 extra: list[Segment] | tuple = ()):
        """`past`: the trajectory's earlier segments (resume); `extra`: releases off the trajectory (steps released,
        then recomputed with fresh noise after a resume from an earlier checkpoint), composed into every epsilon."""
        check_releases(spec, releases)
        check_noise(spec, noise_multiplier, releases, quantile_noise)  # before any work: what can be priced
        self.spec, self.n, self.batch_size, self.noise, self.releases = (spec, num_examples, batch_size,
                                                                         noise_multiplier, releases)
        self.quantile_noise = quantile_noise
        self.past, self.extra = list(past), list(extra)
        if spec.sampling == "shuffle":
            warnings.warn("fixed-size shuffled batches: accounted as sampling without replacement per step "
                          "(replace-one neighbours, sensitivity 2C); Poisson sampling is the exact assumption",
                          stacklevel=2)
        self._cache: dict[int, float] = {} if self.extra else {0: 0.0}  # carried releases count from step 0

    @property
    def past_steps(self) -> int:
        return sum(s.steps for s in self.past)

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.batch_size / self.n)

    def history(self, steps: int) -> list[Segment]:
        """The segments that make up the first `steps` steps (what a checkpoint at `steps` stores)."""
        out, left = [], steps
        for seg in self.past + [Segment(max(steps - self.past_steps, 0), self.n, self.batch_size, self.noise,
                                        self.releases, self.quantile_noise, self.spec.mechanism, self.spec.sampling)]:
            take = min(seg.steps, left)
            if take > 0:
                out.append(replace(seg, steps=take))
            left -= take
        return out

    def epsilon(self, steps: int) -> float:
        """Epsilon spent after `steps` steps: a finite number >= 0, or an Unaccountable error (one line)."""
        try:
            return self._epsilon(steps)
        except MemoryError:  # dp-accounting's PLD arrays (a numpy MemoryError, or C++'s std::bad_alloc)
            raise Unaccountable(pld_memory_message(self.spec, self.noise)) from None
        except (ZeroDivisionError, OverflowError, FloatingPointError):  # huge noise is priced at the ceiling: small
            raise Unaccountable(f"noise multiplier {self.noise:g}: too little noise to account (epsilon overflows); "
                                "use a larger --noise-multiplier, fewer steps or a target --epsilon") from None

    def _epsilon(self, steps: int) -> float:
        if steps not in self._cache:
            segments = [replace(seg, mechanism=seg.mechanism or self.spec.mechanism,
                                sampling=seg.sampling or self.spec.sampling) for seg in self.extra + self.history(steps)]
            laplace = any(seg.mechanism == "laplace" for seg in segments)  # only PLD composes Laplace releases
            acc = make_accountant(replace(self.spec, accountant="pld") if laplace else self.spec)
            for seg in segments:
                check_noise(replace(self.spec, mechanism=seg.mechanism), seg.noise_multiplier, seg.releases,
                            seg.quantile_noise, pld_used=laplace or self.spec.accountant == "pld")
                if seg.sampling != self.spec.sampling:  # add/remove and replace-one neighbours do not compose
                    raise SlimtuneError(f"releases made with --sampling {seg.sampling} (a run --restart replaced) "
                                        f"cannot be composed with --sampling {self.spec.sampling}'s accounting (their "
                                        f"neighbouring relations differ): restart with --sampling {seg.sampling}")
                acc.compose(step_event(replace(self.spec, mechanism=seg.mechanism), seg.num_examples,
                                       seg.batch_size, seg.noise_multiplier, seg.releases, seg.quantile_noise),
                            seg.steps)  # each segment priced as the noise it had
            value = float(acc.get_epsilon(self.spec.delta))
            if not math.isfinite(value) or value < 0:  # never a number: NaN, inf or < 0 is no guarantee
                raise Unaccountable(f"noise multiplier {self.noise:g}: dp-accounting priced {steps} steps at epsilon "
                                    f"{value}, which is no privacy guarantee (too little noise or too many steps to "
                                    "account); use a larger --noise-multiplier, fewer steps or a target --epsilon")
            self._cache[steps] = value
        return self._cache[steps]


def check_releases(spec: PrivacySpec, releases: int) -> None:
    if releases < 1:
        raise SlimtuneError(f"--n-spsa must be >= 1, got {releases}")
    if releases > 1 and spec.mechanism == "laplace":
        raise SlimtuneError(f"Laplace noise is accounted for one released value per step; this run releases "
                            f"{releases} (--n-spsa, or an optimizer that releases several: dphizoo, dphybrid): use "
                            "--mechanism gaussian")


def effective_noise(noise: float, releases: int = 1, quantile_noise: float = 0.0) -> float:
    """Noise multiplier of the one Gaussian mechanism a step is: k scalars (sigma each), each with its count (sigma_b):
    1 / sqrt(k (1/sigma^2 + 1/sigma_b^2)), written so that no square overflows or underflows (sigma 1e300)."""
    if not quantile_noise:
        return noise / math.sqrt(releases)
    return noise / math.hypot(noise, quantile_noise) * quantile_noise / math.sqrt(releases)


def split_noise(effective: float, releases: int, quantile_noise: float) -> float:
    """The per-scalar sigma that, with the counts' sigma_b, makes a step's effective multiplier `effective`."""
    rest = 1 / (releases * effective**2) - (1 / quantile_noise**2 if quantile_noise else 0.0)
    return 1 / math.sqrt(rest)


def default_quantile_noise(effective: float, releases: int, batch_size: int) -> float:
    """sigma_b for adaptive clipping: Andrew et al.'s B/20, raised to 3x the per-pair noise so that the scalars'
    noise grows by at most 6% (1/sqrt(1 - 1/9))."""
    return max(batch_size / 20, 3 * effective * math.sqrt(releases))


def base_mechanism(spec: PrivacySpec, noise: float, releases: int = 1,
                   quantile_noise: float = 0.0) -> dp_accounting.DpEvent:
    """The per-step mechanism on the k released scalars: sensitivity Delta sqrt(k) against noise sigma Delta each
    (and, with adaptive clipping, k counts of sensitivity 1 against noise sigma_b)."""
    if spec.mechanism == "laplace":
        check_releases(spec, releases)
        if quantile_noise:
            raise SlimtuneError("adaptive clipping is accounted for Gaussian noise only: use --clipping fixed with "
                                "--mechanism laplace")
        return dp_accounting.LaplaceDpEvent(min(noise, PRICED_NOISE_CEILING))
    if spec.mechanism == "gaussian":
        return dp_accounting.GaussianDpEvent(min(effective_noise(noise, releases, quantile_noise),
                                                 PRICED_NOISE_CEILING))
    raise SlimtuneError(f"unknown DP mechanism {spec.mechanism!r} (gaussian or laplace)")


def step_event(spec: PrivacySpec, n: int, batch_size: int, noise: float, releases: int = 1,
               quantile_noise: float = 0.0) -> dp_accounting.DpEvent:
    mech = base_mechanism(spec, noise, releases, quantile_noise)
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
        return pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=spec.pld_discretization)
    if spec.accountant != "rdp":
        raise SlimtuneError(f"unknown accountant {spec.accountant!r} (rdp or pld)")
    return rdp.RdpAccountant(neighboring_relation=relation)


def sensitivity(spec: PrivacySpec, clip: float | None = None) -> float:
    """Of the clipped sum: C under add/remove (Poisson), 2C under replace-one (fixed-size batches)."""
    return (spec.clip if clip is None else clip) * (2.0 if spec.sampling == "shuffle" else 1.0)


def calibrate_noise(spec: PrivacySpec, num_examples: int, batch_size: int, steps: int, releases: int = 1,
                    extra: list[Segment] | tuple = ()) -> float:
    """Smallest noise multiplier sigma (per released scalar) whose epsilon after `steps` (plus the `extra` releases
    already made on this data, e.g. by a failed run that --restart replaced) is <= target.

    Bisection on log sigma (to a relative 1e-5; 1e-4 with PLD, started from the RDP answer, probed: doubled while
    over the budget), between a floor where even one unsubsampled release would spend more than the budget and a
    ceiling found by doubling. Each probe is a fresh dp-accounting composition; probes whose
    privacy-loss distribution is too large to represent (PLD at tiny sigma) count as over budget instead of raising.
    """
    check_spec(spec, num_examples)
    check_releases(spec, releases)
    if spec.target_epsilon is None:
        raise SlimtuneError("calibration needs a target epsilon")
    target = spec.target_epsilon

    def priced(noise: float) -> float:
        return PrivacyAccountant(spec, num_examples, batch_size, noise, releases, extra=extra).epsilon(steps)

    def over(noise: float) -> bool:
        try:
            return priced(noise) > target
        except Unaccountable:  # too little noise to price (PLD's memory, an overflow): certainly over any budget
            return True

    lowest = least_noise(spec, releases)  # the search never leaves what the accountant prices
    floor = max(_noise_floor(spec, num_examples, batch_size, releases), lowest)
    if spec.accountant == "pld" and spec.mechanism == "gaussian":  # RDP is looser: its sigma bounds PLD's from above
        try:
            high = max(calibrate_noise(replace(spec, accountant="rdp"), num_examples, batch_size, steps, releases,
                                       extra), lowest)
        except BeyondAccounting:  # RDP meets the target even at its least noise: start PLD's search at its own
            high = lowest
        while over(high):  # a coarse --pld-discretization can make PLD the looser one: the answer must be probed
            high *= 2
            if high > 1e4:
                raise SlimtuneError(f"privacy budget epsilon={target}, delta={spec.delta} cannot be met with "
                                    f"{steps} steps by the PLD accountant at --pld-discretization "
                                    f"{spec.pld_discretization} (noise multiplier > 1e4 needed); use a finer "
                                    "discretization, fewer steps or a larger epsilon")
        low = max(high / 2, floor)
        while low > floor and not over(low):
            high, low = low, max(low / 2, floor)
        tol = 1e-4  # each PLD probe costs ~0.1 s
    else:
        low, high, tol = floor, max(1.0, floor), 1e-5
        while over(high):
            low, high = high, high * 2
            if high > 1e4:
                raise SlimtuneError(f"privacy budget epsilon={target}, delta={spec.delta} cannot be met with {steps} "
                                    f"steps at sampling rate {batch_size / num_examples:.4g} (noise multiplier > 1e4 "
                                    "needed); use fewer steps, a smaller batch or a larger epsilon")
    if not over(low):
        if low <= lowest:  # the answer lies below the least noise priced: no run of this budget can be accounted
            largest = _round_down(priced(lowest))
            raise BeyondAccounting(f"--epsilon {target:g} is beyond what can be accounted: the least noise the "
                                   f"{'PLD' if uses_pld(spec) else 'RDP'} accountant prices (noise multiplier "
                                   f"{lowest:.3g}) spends epsilon {largest:.4g} in {steps} steps, the largest "
                                   f"epsilon a run here can be calibrated to; use --epsilon <= {largest:.4g}")
        return low
    while high / low > 1 + tol:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if over(mid) else (low, mid)
    return high


class BeyondAccounting(SlimtuneError):
    """A target epsilon so large that the noise it needs lies below the least noise the accountant prices."""


def least_noise(spec: PrivacySpec, releases: int = 1) -> float:
    """The least per-release noise multiplier calibration may answer: MIN_NOISE_MULTIPLIER, and with the PLD
    accountant on Gaussian noise, the one whose effective multiplier (sigma / sqrt(releases)) is `pld_noise_floor`."""
    if spec.accountant == "pld" and spec.mechanism == "gaussian":
        return max(MIN_NOISE_MULTIPLIER, pld_noise_floor(spec.pld_discretization) * math.sqrt(releases))
    return MIN_NOISE_MULTIPLIER


def _round_down(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant digits, never above it (a bound the user may copy)."""
    if value <= 0:
        return value
    scale = 10 ** (math.floor(math.log10(value)) - digits + 1)
    return math.floor(value / scale) * scale


def _noise_floor(spec: PrivacySpec, n: int, batch_size: int, releases: int) -> float:
    """A sigma below every answer: a subsampled step can only amplify by log(1/q), so at this noise a single
    release already spends more than the target (Gaussian: eps >= 1/(2 sigma^2) - ish; Laplace: eps = 1/b)."""
    q = min(1.0, batch_size / n)
    budget = spec.target_epsilon + math.log(1 / q) + 1.0
    if spec.mechanism == "laplace":
        return 0.25 / budget
    return math.sqrt(releases) * 0.05 / math.sqrt(budget)


def check_names(spec: PrivacySpec) -> None:
    """The categorical settings, checked before anything is loaded."""
    for flag, value, allowed in (("--sampling", spec.sampling, ("poisson", "shuffle")),
                                 ("--mechanism", spec.mechanism, ("gaussian", "laplace")),
                                 ("--accountant", spec.accountant, ("rdp", "pld")),
                                 ("--clipping", spec.clipping, ("auto", "adaptive", "fixed"))):
        if value not in allowed:
            raise SlimtuneError(f"{flag} {value!r}: choose {' or '.join(allowed)}")


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
    if spec.noise_multiplier is not None and spec.noise_multiplier <= 0:
        raise SlimtuneError(f"noise multiplier must be > 0, got {spec.noise_multiplier}")
    if not 0 < spec.pld_discretization <= 0.1:
        raise SlimtuneError(f"PLD discretisation must be in (0, 0.1], got {spec.pld_discretization}")
    if spec.clipping not in ("auto", "adaptive", "fixed"):
        raise SlimtuneError(f"--clipping {spec.clipping!r}: choose adaptive, fixed or auto")
    if not 0 < spec.target_quantile < 1 or spec.clip_lr <= 0 or spec.clip_multiplier <= 0:
        raise SlimtuneError(f"adaptive clipping needs 0 < --target-quantile < 1 (got {spec.target_quantile}) and "
                            f"--clip-lr > 0 (got {spec.clip_lr}) and --clip-multiplier > 0 (got {spec.clip_multiplier})")


def plan(spec: PrivacySpec, num_examples: int, batch_size: int, steps: int, releases: int = 1,
         adaptive: bool = False, extra: list[Segment] | tuple = ()) -> PrivacyAccountant:
    """Pick (or check) the noise for a run of `steps` and return its accountant; refuse budgets that cannot be met.

    adaptive: each scalar also releases a count for adaptive clipping; the budget covers both (the calibrated
    effective multiplier is split between scalar noise sigma and count noise sigma_b)."""
    check_spec(spec, num_examples)
    noise, quantile_noise = spec.noise_multiplier, 0.0
    if adaptive:
        check_releases(spec, releases)
        if spec.mechanism != "gaussian":
            raise SlimtuneError("adaptive clipping is accounted for Gaussian noise only: use --clipping fixed with "
                                "--mechanism laplace")
        effective = (calibrate_noise(spec, num_examples, batch_size, steps, 1, extra) if noise is None
                     else effective_noise(noise, releases))
        quantile_noise = default_quantile_noise(effective, releases, batch_size)
        noise = split_noise(effective, releases, quantile_noise) if spec.noise_multiplier is None else noise
    elif noise is None:
        noise = calibrate_noise(spec, num_examples, batch_size, steps, releases, extra)
    accountant = PrivacyAccountant(spec, num_examples, batch_size, noise, releases, quantile_noise=quantile_noise,
                                   extra=extra)
    if spec.target_epsilon is not None and accountant.epsilon(steps) > spec.target_epsilon * 1.001:
        raise SlimtuneError(f"noise multiplier {noise} spends epsilon={accountant.epsilon(steps):.3g} in {steps} steps, "
                            f"over the requested budget epsilon={spec.target_epsilon}: refusing to start "
                            "(raise the noise, lower the steps, or omit --noise-multiplier to calibrate)")
    return accountant


def spec_dict(spec: PrivacySpec) -> dict:
    return asdict(spec)
