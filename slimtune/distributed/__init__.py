"""Data-parallel zeroth-order training on torch.distributed (gloo on CPU, nccl on GPU), launched with torchrun.

Every rank holds the whole model and draws the same z from the shared step seed, so the ranks' weights never
diverge and nothing weight-sized is ever sent. Each step the global batch (the same sampler on every rank) is split
round-robin, rank r evaluating examples r, r + W, r + 2W, ...; after each of the two measurements the ranks
all-gather their per-example losses (a few floats each) and put them back in global order, so the estimator — MeZO's
mean difference or DPZero's per-example clipping, noise and adaptive clip — sees exactly what one process would.
DPZero's noise comes from the run's key file (RUN/secret.key, created by rank 0 before a barrier, or a key file given
to every rank out of band with --secret-key-file): every rank reads the same key from disk and adds the same noise,
so it is added once to the update and the privacy accounting is the one-process accounting. The key never crosses
the network; the per-example losses do (gloo, unencrypted): run multi-machine private jobs on a private network.
Rank 0 alone evaluates (and broadcasts the result, so early stopping and best-model decisions agree) and writes
metrics, checkpoints, the adapter and the summary; it also decides a private run's ledger (nonce, attempt, releases
carried or abandoned) and broadcasts it, so every rank's accountant and noise agree. Before anything is written the
ranks compare their settings, the contents of their data files, the model's weights and (with --secret-key-file) a
value derived from the key (`check_ranks_agree`): a rank started differently is one line, not a silently different
run. A peer that stops makes the others stop with one line (`collective`). Resuming needs the run directory on a
filesystem every rank sees (the checkpoint), and so does a private run without --secret-key-file (RUN/secret.key).
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from slimtune import SlimtuneError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def _whole_env(name: str, default: int, high: int | None = None) -> int | None:
    """Environment variable `name` as a whole number from 1 to `high` (left out: `default`); None when it is not."""
    raw = os.environ.get(name, str(default)).strip()
    value = int(raw) if raw.isascii() and raw.isdecimal() else 0
    return value if 1 <= value <= (high or value) else None


def torchrun_world_size() -> int:
    """WORLD_SIZE as torchrun sets it, with the variables its rendezvous needs beside it: a stray WORLD_SIZE (a job
    scheduler's, an earlier export) is one line naming it, not an internal error from the process group."""
    size = _whole_env("WORLD_SIZE", 1)
    if size is None:
        raise SlimtuneError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number >= 1: launch data-parallel "
                            "runs with torchrun, or unset WORLD_SIZE")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if size > 1 and not os.environ.get(name)]
    if missing:
        raise SlimtuneError(f"WORLD_SIZE={size} is set but {', '.join(missing)} not: launch data-parallel runs with "
                            "torchrun, or unset WORLD_SIZE")
    return size


def local_world_size(world: int) -> int:
    """The ranks torchrun started on this machine (LOCAL_WORLD_SIZE, a whole number from 1 to the world size; left
    out: all of them)."""
    local = _whole_env("LOCAL_WORLD_SIZE", world, high=world)
    if local is None:
        raise SlimtuneError(f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']!r} is not a whole number from 1 to "
                            f"WORLD_SIZE={world}: launch data-parallel runs with torchrun")
    return local


def setup(device: str) -> World:
    """The process group torchrun describes in the environment (WORLD_SIZE > 1), or a world of one."""
    import torch.distributed as dist

    size = torchrun_world_size()
    if size <= 1:
        return World()
    if not dist.is_initialized():  # rank 0 alone evaluates while the others wait in a broadcast: a generation
        # evaluation on CPU can outlast the default collective timeout (gloo 30 min, nccl 10 min); a peer that dies is
        # noticed at once (its connection resets), so a long wait only ever covers a live, busy rank 0
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=6))
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(dist.get_rank(), dist.get_world_size())


def shard(indices: list[int], world: World) -> list[int]:
    """This rank's examples of the global batch: positions rank, rank + W, ..."""
    return list(indices)[world.rank::world.size]


def gather_losses(local: torch.Tensor, global_size: int, world: World) -> torch.Tensor:
    """The global batch's per-example losses in sampler order, from every rank's shard (one all_gather)."""
    import torch.distributed as dist

    if not world.parallel:
        return local
    if global_size == 0:
        return local
    width = -(-global_size // world.size)
    padded = torch.zeros(width, dtype=torch.float32, device=local.device)
    padded[:local.numel()] = local.float()
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    with collective():
        dist.all_gather(parts, padded)
    out = torch.empty(global_size, dtype=torch.float32, device=local.device)
    for r, part in enumerate(parts):
        count = len(range(r, global_size, world.size))
        out[r::world.size] = part[:count]
    return out


def bytes_per_gather(global_size: int, world: World) -> int:
    """Bytes each rank sends per measurement (its padded shard of fp32 losses)."""
    return 4 * -(-global_size // world.size) if world.parallel and global_size else 0


def broadcast(obj, world: World):
    """Rank 0's object on every rank."""
    import torch.distributed as dist

    if not world.parallel:
        return obj
    box = [obj]
    with collective():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.parallel:
        with collective():
            dist.barrier()


def all_gather(obj, world: World) -> list:
    """Every rank's object, in rank order."""
    import torch.distributed as dist

    if not world.parallel:
        return [obj]
    out = [None] * world.size
    with collective():
        dist.all_gather_object(out, obj)
    return out


@contextmanager
def collective():
    """A collective whose peer stopped (its own error is printed by that process) is one line here, not an internal
    error: gloo says 'Connection reset' or 'Read error', nccl 'DistBackendError'."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed's errors (DistBackendError, DistNetworkError) are RuntimeErrors
        raise SlimtuneError("another process of this torchrun run stopped (its error is in its output above); "
                            f"this one stops too ({type(exc).__name__})") from None


def check_ranks_agree(facts: dict, world: World) -> None:
    """Every rank runs the same settings on the same data and model: `facts` ({what: a digest or value}) compared
    with rank 0's; the first difference is one line naming it (a typo in one node's command trained a different run
    on that rank, silently). A fact only one of the two has (a key file given to one rank) is a difference too."""
    everyone = all_gather(facts, world)
    for rank, theirs in enumerate(everyone[1:], 1):
        for what in [*everyone[0], *(w for w in theirs if w not in everyone[0])]:
            if theirs.get(what) != everyone[0].get(what):
                raise SlimtuneError(f"torchrun: rank {rank} differs from rank 0 in {what}; every rank must be started "
                                    "with the same settings, data and model")


def state_digest(*objs) -> str:
    """sha256 of nested state: dicts (by key), lists, tuples, sets, tensors and numpy arrays (dtype, shape, every
    byte), torch generators (their state), numbers, strings, bytes, None; each value tagged with its kind. Equal on
    two ranks exactly when they hold the same state; any other type is a TypeError (a repr may elide values or hold an
    address)."""
    import hashlib

    import numpy as np
    import torch

    def digest(obj) -> bytes:
        h = hashlib.sha256()
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            h.update(f"T{t.dtype}{tuple(t.shape)}{t.device.type == 'meta'}".encode())
            if t.device.type != "meta":
                t = (t.to_dense() if t.is_sparse else t).resolve_conj().resolve_neg().cpu().contiguous()
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, np.ndarray):
            a = np.ascontiguousarray(obj)
            h.update(f"N{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        elif isinstance(obj, torch.Generator):
            h.update(b"G" + digest(obj.get_state()))
        elif isinstance(obj, dict):
            h.update(b"D")
            for key, value in sorted(((digest(k), v) for k, v in obj.items()), key=lambda kv: kv[0]):
                h.update(key + digest(value))
        elif isinstance(obj, (list, tuple)):
            h.update(b"L" if isinstance(obj, list) else b"U")
            for item in obj:
                h.update(digest(item))
        elif isinstance(obj, (set, frozenset)):
            h.update(b"S" + b"".join(sorted(digest(item) for item in obj)))
        elif obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic)):
            h.update(f"V{type(obj).__name__}:".encode() + (obj if isinstance(obj, bytes) else repr(obj).encode()))
        else:
            raise TypeError(f"state_digest: cannot compare a {type(obj).__name__} between ranks")
        return h.digest()

    return hashlib.sha256(b"".join(digest(obj) for obj in objs)).hexdigest()


def check_supported(optimizer: str, world: World) -> None:
    from slimtune.optim import ZO_OPTIMIZERS

    if world.parallel and optimizer not in ZO_OPTIMIZERS:
        raise SlimtuneError(f"data-parallel runs (torchrun, {world.size} processes) are for zeroth-order optimizers "
                            f"({', '.join(ZO_OPTIMIZERS)}); run {optimizer} in one process")
