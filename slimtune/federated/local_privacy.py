"""Example-level DP of private federated clients (--local-optimizer dpzero, dplozo, dphizoo, dphybrid, dp-adamw,
dp-sgd): what may be said about a client's epsilon, and by whom.

A client's epsilon after T local steps is that of the Poisson-subsampled Gaussian mechanism at rate q, noise sigma
(per release, `releases` releases a step), delta:  epsilon = eps_acct(q, sigma, T, delta).  With q = B / n, epsilon is
a function of n, the client's number of rows: sent to the server, even rounded to a power of two, it would say
whether one row is there (n = 2^k against 2^k - 1), a release no accountant covers. So:

- without --local-dp-min-examples: a client sends nothing about it. A deployment node (its own data file) prints its
  own epsilon on its own stderr, for its operator, who holds the rows anyway.
- with --local-dp-min-examples M (a public lower bound on the clients' rows): every client samples at
  q = min(1, B / n, B / M) <= B / M, and eps_acct is increasing in q, so eps_acct(B / M, sigma, T, delta) bounds
  every client's epsilon. It is a function of public settings alone: the server computes it (T = the local steps of
  a client that trained in every round so far), and a client with n < M trains on smaller expected batches (q n)
  rather than spend more than the bound.
"""

from __future__ import annotations

from slimtune.federated.config import FederatedConfig


def is_private(cfg: FederatedConfig) -> bool:
    """Clients that train with example-level DP (zo-seeds clients run MeZO: a private optimizer is refused there)."""
    from slimtune.optim import PRIVATE_OPTIMIZERS
    return cfg.mode != "zo-seeds" and cfg.local_optimizer in PRIVATE_OPTIMIZERS


def sample_rate(cfg: FederatedConfig, num_examples: int) -> float:
    """q = min(1, B / n, B / M): the Poisson rate of a private client with `num_examples` rows."""
    return min(1.0, cfg.batch_size / max(num_examples, 1), cfg.batch_size / (cfg.local_dp_min_examples or 1))


def epsilon_at(cfg: FederatedConfig, population: int, steps: int) -> float:
    """eps_acct(B / population, sigma, steps, delta) for this run's local optimizer (its releases per step)."""
    from slimtune.optim.builders import private_releases
    from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec

    spec = PrivacySpec(delta=cfg.local_dp_delta, noise_multiplier=cfg.local_dp_noise, clip=cfg.local_dp_clip)
    releases = private_releases(cfg.local_optimizer, 1)  # dphizoo: the gradient and the curvature scalar per step
    return float(PrivacyAccountant(spec, population, min(cfg.batch_size, population), cfg.local_dp_noise,
                                   releases).epsilon(steps))


def bound_segment(cfg: FederatedConfig) -> dict:
    """A private round's steps as an accountant segment bounded without the node's row count: q = B / population with
    population = --local-dp-min-examples, or B (q = 1). A node's `local-dp-epsilon` budget composes these."""
    from dataclasses import asdict

    from slimtune.optim.builders import private_releases
    from slimtune.privacy.accountant import Segment

    population = cfg.local_dp_min_examples or cfg.batch_size
    return asdict(Segment(cfg.local_steps, population, min(cfg.batch_size, population), cfg.local_dp_noise,
                          private_releases(cfg.local_optimizer, 1)))


def composed_epsilon(cfg: FederatedConfig, segments: list[dict]) -> float:
    """Epsilon of the private rounds `segments` (bound_segment's, each at its own round's noise and batch), composed
    at this round's delta."""
    from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec, Segment

    if not segments:
        return 0.0
    *past, last = [Segment.from_dict(d) for d in segments]
    spec = PrivacySpec(delta=cfg.local_dp_delta, noise_multiplier=last.noise_multiplier, clip=cfg.local_dp_clip)
    return float(PrivacyAccountant(spec, last.num_examples, last.batch_size, last.noise_multiplier, last.releases,
                                   extra=past).epsilon(last.steps))


def node_epsilon(cfg: FederatedConfig, num_examples: int, steps: int) -> float:
    """A client's own epsilon after `steps` local steps on its `num_examples` rows (kept on its node)."""
    return epsilon_at(cfg, max(num_examples, cfg.local_dp_min_examples or 1), steps)


def public_bound(cfg: FederatedConfig, rounds: int) -> float | None:
    """The server's bound on every client's epsilon after `rounds` rounds (None without --local-dp-min-examples)."""
    if not is_private(cfg) or cfg.local_dp_min_examples is None or rounds < 1:
        return None
    return epsilon_at(cfg, cfg.local_dp_min_examples, rounds * cfg.local_steps)
