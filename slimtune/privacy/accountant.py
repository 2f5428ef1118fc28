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

# RDP orders that fail to converge are excluded by dp-accounting itself; its per-order warnings are noise.
logging.getLogger("absl").setLevel(logging.ERROR)


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
        try:
            return self._epsilon(steps)
        except (ZeroDivisionError, OverflowError, FloatingPointError):
            raise SlimtuneError(f"noise multiplier {self.noise:g}: too small to account (epsilon overflows); use a "
                                "larger --noise-multiplier or a target --epsilon") from None

    def _epsilon(self, steps: int) -> float:
        if steps not in self._cache:
            segments = [replace(seg, mechanism=seg.mechanism or self.spec.mechanism,
                                sampling=seg.sampling or self.spec.sampling) for seg in self.extra + self.history(steps)]
            laplace = any(seg.mechanism == "laplace" for seg in segments)  # only PLD composes Laplace releases
            acc = make_accountant(replace(self.spec, accountant="pld") if laplace else self.spec)
            for seg in segments:
                if seg.sampling != self.spec.sampling:  # add/remove and replace-one neighbours do not compose
                    raise SlimtuneError(f"releases made with --sampling {seg.sampling} (a run --restart replaced) "
                                        f"cannot be composed with --sampling {self.spec.sampling}'s accounting (their "
                                        f"neighbouring relations differ): restart with --sampling {seg.sampling}")
                acc.compose(step_event(replace(self.spec, mechanism=seg.mechanism), seg.num_examples,
                                       seg.batch_size, seg.noise_multiplier, seg.releases, seg.quantile_noise),
                            seg.steps)  # each segment priced as the noise it had
            self._cache[steps] = _epsilon_of(acc, self.spec.delta)
        return self._cache[steps]


def _epsilon_of(acc, delta: float) -> float:
    try:
        return float(acc.get_epsilon(delta))
    except (MemoryError, OverflowError, ValueError):
        return math.inf  # too little noise to represent: certainly over any budget


def check_releases(spec: PrivacySpec, releases: int) -> None:
    if releases < 1:
        raise SlimtuneError(f"--n-spsa must be >= 1, got {releases}")
    if releases > 1 and spec.mechanism == "laplace":
        raise SlimtuneError(f"Laplace noise is accounted for one released value per step; this run releases "
                            f"{releases} (--n-spsa, or an optimizer that releases several: dphizoo, dphybrid): use "
                            "--mechanism gaussian")


def effective_noise(noise: float, releases: int = 1, quantile_noise: float = 0.0) -> float:
    """Noise multiplier of the one Gaussian mechanism a step is: k scalars (sigma each), each with its count (sigma_b)."""
    inverse_square = 1 / noise**2 + (1 / quantile_noise**2 if quantile_noise else 0.0)
    return 1 / math.sqrt(releases * inverse_square)


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
        return dp_accounting.LaplaceDpEvent(noise)
    if spec.mechanism == "gaussian":
        return dp_accounting.GaussianDpEvent(effective_noise(noise, releases, quantile_noise))
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

    def over(noise: float) -> bool:
        return PrivacyAccountant(spec, num_examples, batch_size, noise, releases, extra=extra).epsilon(steps) > target

    floor = _noise_floor(spec, num_examples, batch_size, releases)
    if spec.accountant == "pld" and spec.mechanism == "gaussian":  # RDP is looser: its sigma bounds PLD's from above
        high = calibrate_noise(replace(spec, accountant="rdp"), num_examples, batch_size, steps, releases, extra)
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
        low, high, tol = floor, 1.0, 1e-5
        while over(high):
            low, high = high, high * 2
            if high > 1e4:
                raise SlimtuneError(f"privacy budget epsilon={target}, delta={spec.delta} cannot be met with {steps} "
                                    f"steps at sampling rate {batch_size / num_examples:.4g} (noise multiplier > 1e4 "
                                    "needed); use fewer steps, a smaller batch or a larger epsilon")
    if not over(low):
        return low
    while high / low > 1 + tol:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if over(mid) else (low, mid)
    return high


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
