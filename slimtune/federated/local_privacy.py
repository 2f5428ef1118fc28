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

A deployment node keeps what it spends on its data in a ledger on its own disk (`NodeLedger`: `<data-path>` +
`.slimtune-dp.json`, or `--node-config dp-ledger=PATH`), not in Flower's per-run state (empty for every new run, and a
snapshot per ClientApp process): a new run, parallel train messages or a restart do not reset it. Each private round
is recorded, under an exclusive lock taken before the budget check, before its first step (a round that crashes
still counts). The epsilon a node prints and its `local-dp-epsilon` budget compose the kept rounds, each at its own
noise, batch and steps (`composed_epsilon`, one function for both), at `account_delta`: the round's delta or the
node's own `local-dp-delta` (1e-5 unless pinned), whichever is smaller, never the server's alone.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
from pathlib import Path

from slimtune import SlimtuneError
from slimtune.federated.config import FederatedConfig

NODE_DELTA = 1e-5  # a node's delta unless it pins local-dp-delta: the server's delta alone could make any epsilon ~0
LEDGER_KEY = "dp-ledger"  # node config: where the node's ledger lives (default: beside its data file)
LEDGER_SUFFIX = ".slimtune-dp.json"
LEDGER_FORMAT = "slimtune-node-dp-ledger/1"


def is_private(cfg: FederatedConfig) -> bool:
    """Clients that train with example-level DP (zo-seeds clients run MeZO: a private optimizer is refused there)."""
    from slimtune.optim import PRIVATE_OPTIMIZERS
    return cfg.mode != "zo-seeds" and cfg.local_optimizer in PRIVATE_OPTIMIZERS


def private_clients(cfg: FederatedConfig) -> bool:
    """Whether the run protects the clients' data (local DP optimizers, or client-level DP): then the server writes
    no round times or memory (a round lasts as long as its slowest client's private batches take), no client
    training loss and no client's error text, only what the DP releases and evaluations on its own data."""
    return is_private(cfg) or cfg.client_level_dp


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


def account_delta(cfg: FederatedConfig, node: dict | None = None) -> float:
    """The delta a node composes its budget and reports its epsilon at: min(the round's delta, the node's own
    `local-dp-delta`, NODE_DELTA unless it pins one). The server picks the round's delta (any value in (0, 1)), and at
    delta 0.999999 every epsilon is ~0: a budget measured at it would bound nothing."""
    own = (node or {}).get("local-dp-delta", NODE_DELTA)
    own = float(own) if isinstance(own, (int, float)) and not isinstance(own, bool) else NODE_DELTA
    return min(cfg.local_dp_delta, own)


def _segment(cfg: FederatedConfig, population: int, steps: int) -> dict:
    from dataclasses import asdict

    from slimtune.optim.builders import private_releases
    from slimtune.privacy.accountant import Segment

    return asdict(Segment(steps, population, min(cfg.batch_size, population), cfg.local_dp_noise,
                          private_releases(cfg.local_optimizer, 1)))


def bound_segment(cfg: FederatedConfig) -> dict:
    """A private round's steps as an accountant segment bounded without the node's row count: q = B / population with
    population = --local-dp-min-examples, or B (q = 1). A node's `local-dp-epsilon` budget composes these."""
    return _segment(cfg, cfg.local_dp_min_examples or cfg.batch_size, cfg.local_steps)


def node_segment(cfg: FederatedConfig, num_examples: int, steps: int | None = None) -> dict:
    """A private round's steps at the rate the node sampled at, q = min(1, B / n, B / M) (its epsilon, kept on it)."""
    return _segment(cfg, max(num_examples, cfg.local_dp_min_examples or 1), cfg.local_steps if steps is None else steps)


def composed_epsilon(cfg: FederatedConfig, segments: list[dict], delta: float | None = None) -> float:
    """Epsilon of the private rounds `segments` (accountant segments, each at its own round's noise, batch and steps),
    composed in order, at `delta` (default: account_delta(cfg)). The one account behind both a node's budget (its
    bound_segment's) and the epsilon it prints (its node_segment's)."""
    from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec, Segment

    segments = [Segment.from_dict(d) for d in segments]
    segments = [seg for seg in segments if seg.steps > 0]  # the accountant answers 0 for 0 steps, past or not
    if not segments:
        return 0.0
    *past, last = segments
    spec = PrivacySpec(delta=account_delta(cfg) if delta is None else delta, noise_multiplier=last.noise_multiplier,
                       clip=cfg.local_dp_clip)
    return float(PrivacyAccountant(spec, last.num_examples, last.batch_size, last.noise_multiplier, last.releases,
                                   extra=past).epsilon(last.steps))


def node_epsilon(cfg: FederatedConfig, num_examples: int, steps: int, spent: list[dict] = (),
                 delta: float | None = None) -> float:
    """A client's own epsilon (kept on its node): its earlier rounds `spent` (node_segment's, each at its own
    settings), then `steps` steps at this round's settings on its `num_examples` rows; composed_epsilon at `delta`."""
    return composed_epsilon(cfg, [*spent, node_segment(cfg, num_examples, steps)], delta)


def ledger_path(node: dict) -> Path | None:
    """Where this node's ledger lives: `dp-ledger` from its node config, else beside its `data-path`
    (`<data-path>.slimtune-dp.json`, of the file the path resolves to); None for a node with neither (a simulated
    node's share of a shared file, which has no budget)."""
    explicit = node.get(LEDGER_KEY)
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit.strip():
            raise SlimtuneError(f"--node-config {LEDGER_KEY}={explicit!r}: expected a file path")
        return Path(explicit).expanduser().absolute()
    own = node.get("data-path")
    if not own:
        return None
    data = Path(str(own)).expanduser().resolve()
    if not data.is_file():
        raise SlimtuneError(f"--node-config data-path={own!r}: no such file (its privacy ledger goes beside it)")
    return data.parent / (data.name + LEDGER_SUFFIX)


class NodeLedger:
    """What a node has spent on its data, on its own disk (mode 0600): per private round it started, the delta it
    composed at, its row-free bound segment (bound_segment: what the budget counts) and the segment at the rate it
    sampled at (node_segment: noise, sampling rate, steps; what it prints). Nothing else about its rows.

    `with NodeLedger(path) as ledger:` takes an exclusive flock and reads it; `record` writes this round (atomically:
    a new file renamed over the old) and releases the lock, so a round is checked and recorded by one process at a
    time and parallel rounds each see the others. A ledger that does not parse is refused, never reset."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.rounds: list[dict] = []

    def __enter__(self) -> "NodeLedger":
        self.fd = self._lock()
        try:
            self.rounds = self._read()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases its flock
            self.fd = None

    def bound_segments(self) -> list[dict]:
        return [r["bound"] for r in self.rounds]

    def spent_segments(self) -> list[dict]:
        return [r["spent"] for r in self.rounds]

    def _refuse(self, why: str) -> SlimtuneError:
        return SlimtuneError(f"{self.path} (this node's privacy ledger): {' '.join(why.split())} (round refused)")

    def _lock(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise self._refuse(f"cannot open it ({exc.strerror or exc}); give the node a file it can write "
                                   f"with --node-config {LEDGER_KEY}=PATH") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                here, now = os.fstat(fd), os.stat(self.path)
                if (here.st_dev, here.st_ino) == (now.st_dev, now.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            except OSError as exc:
                os.close(fd)
                raise self._refuse(f"cannot lock it ({exc.strerror or exc})") from None
            os.close(fd)  # replaced by another round's record while this one waited: lock the file now there

    def _read(self) -> list[dict]:
        os.lseek(self.fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self.fd, 1 << 16):
            chunks.append(chunk)
        text = b"".join(chunks)
        if not text:
            return []  # created by this lock: nothing spent yet
        try:
            doc = json.loads(text)
            rounds = doc.get("rounds") if isinstance(doc, dict) else None
            if not isinstance(rounds, list) or doc.get("format") != LEDGER_FORMAT:
                raise ValueError(f"not a {LEDGER_FORMAT} file")
            return [_checked_round(i, r) for i, r in enumerate(rounds, 1)]
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:  # json's: ValueError
            raise self._refuse(f"damaged ({exc}); it is what this node has spent on its data, so it is never "
                               "reset: restore it, or move it aside only if none of the data it covers is used "
                               "again") from None

    def record(self, cfg: FederatedConfig, num_examples: int, delta: float) -> list[dict]:
        """Write this round (before its first step) and release the lock; returns the rounds' spent segments before
        this one."""
        if self.fd is None:
            raise RuntimeError("NodeLedger.record outside its lock")
        before = self.spent_segments()
        entry = {"delta": float(delta), "bound": bound_segment(cfg), "spent": node_segment(cfg, num_examples)}
        text = json.dumps({"format": LEDGER_FORMAT, "rounds": [*self.rounds, entry]}, indent=1)
        temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.write(text)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise self._refuse(f"cannot record this round ({exc.strerror or exc})") from None
        self.rounds.append(entry)
        self.release()
        return before


def _checked_round(index: int, entry) -> dict:
    """A ledger entry as written by `record`, or ValueError naming what is wrong with it."""
    if not isinstance(entry, dict) or set(entry) != {"delta", "bound", "spent"}:
        raise ValueError(f"round {index}: expected the keys delta, bound, spent")
    delta = entry["delta"]
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"round {index}: delta {delta!r} is not in (0, 1)")
    return {"delta": float(delta), **{key: _checked_segment(index, key, entry[key]) for key in ("bound", "spent")}}


def _checked_segment(index: int, key: str, segment) -> dict:
    from dataclasses import asdict

    from slimtune.privacy.accountant import Segment

    fields = {"steps": 0, "num_examples": 1, "batch_size": 1, "releases": 1}
    optional = {"mechanism": ("gaussian", "laplace"), "sampling": ("poisson", "shuffle")}  # (older ledgers: absent)
    if not isinstance(segment, dict) or not {*fields, "noise_multiplier", "quantile_noise"} <= set(segment) \
            <= {*fields, "noise_multiplier", "quantile_noise", *optional}:
        raise ValueError(f"round {index}: {key} is not an accountant segment")
    for name, allowed in optional.items():
        if segment.get(name) is not None and segment[name] not in allowed:
            raise ValueError(f"round {index}: {key}.{name} {segment[name]!r} is none of {', '.join(allowed)}")
    for name, least in fields.items():
        value = segment[name]
        if type(value) is not int or value < least:
            raise ValueError(f"round {index}: {key}.{name} {value!r} is not an integer >= {least}")
    for name in ("noise_multiplier", "quantile_noise"):
        value = segment[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                or (name == "noise_multiplier" and value == 0):
            raise ValueError(f"round {index}: {key}.{name} {value!r} is not a valid noise multiplier")
    if segment["batch_size"] > segment["num_examples"]:
        raise ValueError(f"round {index}: {key}.batch_size exceeds its num_examples")
    return asdict(Segment.from_dict(segment))


def public_bound(cfg: FederatedConfig, rounds: int) -> float | None:
    """The server's bound on every client's epsilon after `rounds` rounds (None without --local-dp-min-examples)."""
    if not is_private(cfg) or cfg.local_dp_min_examples is None or rounds < 1:
        return None
    return epsilon_at(cfg, cfg.local_dp_min_examples, rounds * cfg.local_steps)
