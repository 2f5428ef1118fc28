"""Secret randomness for private runs: the DP guarantee holds only if nobody can recompute the noise or the batches.

Public: the model, `--seed` and everything derived from it (initialisation, ZO directions z, data order of
non-private runs). Secret: the DP noise and the Poisson batches. Both come from one 256-bit key drawn from the
operating system (`os.urandom`) when a private run starts, and nothing else:

    K(purpose, run, attempt, step, i) = HMAC-SHA256(key, "slimtune/<purpose>" || run || attempt || step || i)
    draws = numpy's Philox-4x64 generator with key = K[:16] (128 bits) and counter = K[16:] (256 bits)

so every noise value and every batch is a function of the whole key, reached through a PRF: no 32- or 64-bit value
(a seed, a generator state) determines any of them, and no generator state exists between steps. `attempt` counts
how often the run was (re)started: a step recomputed after a resume (its first computation was written to the log,
then the process died before the checkpoint) gets fresh noise and a fresh batch, and the accountant charges it again
(train/trainer.py); `run` is a random nonce drawn when the run starts (public, in status.json, kept across --resume),
so two runs never share noise or batches even when they share a key file. The same noise is never used on two
different computations.

Where the key lives: exactly one file, `RUN/secret.key` (JSON {"key": hex}), created with mode 0600 before any byte
is written to it (O_CREAT | O_EXCL), and retired (overwritten, removed) when the run completes (`retire_key_file`):
a completed run's directory holds nothing that undoes its noise. The checkpoint, the optimizer state, the logs, the
adapter, reports and federated app bundles hold neither the key nor anything computed from it except the accounted, noised releases, and the
checkpoint's fingerprint (train/fingerprint.py): PRF outputs under the key (a check value, and HMACs of the data
files' digests), which reveal nothing about the key or the rows. Data-parallel
ranks read the key from that file (same machine) or from `secret_key_file` given to each rank out of band; the key
never crosses the network.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import math
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np

from slimtune import SlimtuneError

KEY_FILE = "secret.key"
KEY_BYTES = 32


def create_key_file(path: Path) -> "RunKey":
    """A fresh key, written to `path` owner-readable only; refuses to replace an existing file. Written whole to a
    private temporary first, then linked into place (os.link refuses an existing name): a process killed while
    writing leaves no half-written key file at `path` to block every later attempt (a filesystem without hard links
    gets the file created exclusively in place)."""
    key = os.urandom(KEY_BYTES)
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise _already_there(path)
    record = {"key": key.hex(), "bits": 8 * KEY_BYTES}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")  # is_temporary_of's form
    try:
        _write_exclusively(tmp, record)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _already_there(path) from None
        except OSError:
            _write_exclusively(path, record)
    finally:
        tmp.unlink(missing_ok=True)
    return RunKey(key)


def retire_key_file(path: Path) -> None:
    """A completed run's key, destroyed: its bytes overwritten with zeros and synced, then the file removed (and the
    removal synced), so that the run directory may be shared whole. The key reproduces every noise value and batch of
    the run: with it and the released values anyone recovers the unnoised sums. A completed run is never continued
    from this key (a run that wants to be extended later keeps its own `--secret-key-file`, which is never retired).
    Only a regular file is retired (a symbolic link there raises OSError, and nothing is touched); one with other
    hard links is only unlinked: the other names are the user's, and their copy of the key stays theirs."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a symbolic link?)", str(path))
    if info.st_nlink == 1:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.write(fd, b"\0" * info.st_size)
            os.fsync(fd)
        finally:
            os.close(fd)
    path.unlink(missing_ok=True)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def is_temporary_of(name: str, target: str) -> bool:
    """Whether a file name is create_key_file's temporary for a key file named `target` (one a kill left behind)."""
    return re.fullmatch(rf"\.{re.escape(target)}\.\d+\.[0-9a-f]+\.tmp", name) is not None


def _already_there(path: Path) -> SlimtuneError:
    return SlimtuneError(f"{path}: a key file is already there (nothing was overwritten)")


def _write_exclusively(path: Path, record: dict) -> None:
    """`record` as JSON in a new file of mode 0600, synced to disk; an existing file is refused, never replaced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise _already_there(path) from None
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())


def read_key_file(path: Path) -> "RunKey":
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"{path}: no key file; a private run's noise cannot be continued without it")
    if path.stat().st_mode & 0o077:
        raise SlimtuneError(f"{path}: readable by other users (mode {oct(path.stat().st_mode & 0o777)}); "
                            f"run `chmod 600 {path}` first")
    try:
        key = parse_key(path.read_text())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise SlimtuneError(f"{path}: not a key file: a key file holds the key in hex, alone (make one with "
                            f"`openssl rand -hex 32 > {path.name}` and `chmod 600 {path.name}`) or as JSON "
                            '{"key": "<hex>"} (what a run writes)') from None
    if len(key) < 16:
        raise SlimtuneError(f"{path}: the key has {8 * len(key)} bits; at least 128 are needed")
    return RunKey(key)


def parse_key(text: str) -> bytes:
    """A key file's key: JSON {"key": hex} (what a run writes), or the hex digits alone (`openssl rand -hex 32`).
    ValueError (or KeyError, TypeError) for anything else."""
    stripped = text.strip()
    if stripped.startswith("{"):
        return bytes.fromhex(json.loads(stripped)["key"])
    if not re.fullmatch(r"[0-9a-fA-F]+", stripped):
        raise ValueError("not hex")
    return bytes.fromhex(stripped)


class RunKey:
    """The run's secret key; hands out independent generators by (purpose, indices)."""

    def __init__(self, key: bytes):
        self._key = bytes(key)

    @classmethod
    def fresh(cls) -> "RunKey":
        """An in-memory key (Python API use without a run directory: nothing to resume)."""
        return cls(os.urandom(KEY_BYTES))

    def generator(self, purpose: str, *indices: int) -> np.random.Generator:
        message = b"slimtune/" + purpose.encode() + b"".join(struct.pack("<q", int(i)) for i in indices)
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        key = int.from_bytes(digest[:16], "little")
        counter = int.from_bytes(digest[16:], "little")
        return np.random.Generator(np.random.Philox(key=key, counter=counter))

    def __repr__(self) -> str:  # never print the key
        return "RunKey(<secret>)"

    def __reduce__(self):  # never pickle it (into a checkpoint, a message, a Ray task)
        raise TypeError("the run key is never serialised; read it from its key file")


def fresh_nonce() -> int:
    """A new run's nonce (63 random bits; public: it only keeps two runs' noise apart)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


class KeyedNoise:
    """The noise of a private run: draw i of step t of attempt a of run r comes from K("noise", r, a, t, i).

    `begin_step(t)` is called before each training step; draws within a step are numbered in call order. Without
    calls to begin_step (a user's own loop) steps count up from 0 on their own."""

    def __init__(self, key: RunKey, attempt: int = 0, run: int | None = None):
        self.key, self.attempt = key, attempt
        self.run = fresh_nonce() if run is None else run
        self.step, self._draws, self._auto = 0, 0, True

    def begin_step(self, step: int) -> None:
        self.step, self._draws, self._auto = step, 0, False

    def end_step(self) -> None:
        if self._auto:
            self.step, self._draws = self.step + 1, 0

    def _next(self) -> np.random.Generator:
        gen = self.key.generator("noise", self.run, self.attempt, self.step, self._draws)
        self._draws += 1
        return gen

    def normal(self, shape: tuple = ()) -> np.ndarray | float:
        """Standard normal values (float64)."""
        values = self._next().standard_normal(shape)
        return float(values) if shape == () else values

    def uniform(self) -> float:
        return float(self._next().random())

    def discrete_laplace(self, scale: float) -> int:
        """An integer with P(k) proportional to exp(-|k| / scale): the difference of two geometric draws with
        p = 1 - exp(-1 / scale) (privacy/dpzero.py's grid mechanism)."""
        gen, p = self._next(), -math.expm1(-1.0 / scale)
        return int(gen.geometric(p)) - int(gen.geometric(p))

    def rounded_normal(self, scale: float) -> int:
        """round(scale x a standard normal draw): Gaussian noise on the integer grid."""
        return int(round(scale * float(self._next().standard_normal())))


def secret_tensor(key: RunKey, kind: str, shape: tuple, *indices: int, low: float = 0.0,
                  high: float = 1.0):
    """A float32 tensor of secret draws: "normal" (standard) or "uniform" in [low, high), from K(kind, *indices).
    For secrets that are tensors (federated theta_0, dither, client-level DP noise): never torch's 32-bit-keyed CPU
    generator."""
    gen = key.generator(kind, *indices)
    values = gen.standard_normal(shape) if kind == "normal" else gen.uniform(low, high, shape)
    import torch
    return torch.from_numpy(values.astype("float32"))


def sampling_generator(key: RunKey, attempt: int, step: int, run: int = 0) -> np.random.Generator:
    """The Poisson batch of step t (attempt a of run r): K("sampling", r, a, t)."""
    return key.generator("sampling", run, attempt, step)


def shuffle_generator(key: RunKey, attempt: int, epoch: int, run: int = 0) -> np.random.Generator:
    return key.generator("shuffle", run, attempt, epoch)
