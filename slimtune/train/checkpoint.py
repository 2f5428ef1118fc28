"""Atomic checkpoints: write everything into a temporary directory, sync it to disk, then swap it in with renames.

A crash (or a power loss) at any moment leaves either the previous checkpoint or the new one, never a half-written
mix; a checkpoint damaged anyway (a failing disk, a partial copy) is refused in one line naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimtune import SlimtuneError
from slimtune.train.run_dir import read_record, sync_to_disk

WEIGHTS, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.pt", "trainer_state.json"
LEGACY_SECRET_FILE = "secret.json"  # checkpoints before issue 33 kept a 63-bit noise seed here; never written now


def save_checkpoint(directory: Path, model, optimizer, state: dict) -> None:
    """Trainable weights, optimizer state and trainer state. Never anything secret: a private run's key lives only in
    RUN/secret.key (privacy/secret.py), and no optimizer holds a generator state (the trainer state's fingerprint holds
    PRF values of the key only: train/fingerprint.py). Every file and the directory are synced to disk before the
    new checkpoint replaces the previous one: a power loss never leaves a renamed checkpoint of empty files."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / WEIGHTS))
    try:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    except RuntimeError as exc:  # torch's writer reports a full disk as "unexpected pos ...", not as an OSError
        raise OSError(errno.EIO, f"could not write ({str(exc).splitlines()[0]}; is the disk full?)",
                      str(tmp / OPTIMIZER)) from None
    (tmp / STATE).write_text(json.dumps(state, indent=2))
    for name in (WEIGHTS, OPTIMIZER, STATE):
        sync_to_disk(tmp / name)
    sync_to_disk(tmp)
    old = directory.with_name(directory.name + ".old")
    if directory.exists():  # complete (it is only ever made by the rename below): a .old beside it is stale, left by
        shutil.rmtree(old, ignore_errors=True)  # an interrupted clean-up, and would make this rename fail for good
        os.replace(directory, old)
    os.replace(tmp, directory)
    sync_to_disk(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(directory: Path) -> Path:
    """Finish a swap interrupted between its two renames (the .old checkpoint is complete)."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and old.exists():
        try:
            os.replace(old, directory)
        except FileNotFoundError:  # another rank of a data-parallel resume finished the same swap first
            pass
    return directory


def read_state(directory: Path) -> tuple[dict, dict | None]:
    """(trainer_state, legacy secret) of a checkpoint, without loading weights; ({}, None) when there is none. A
    legacy secret (a pre-issue-33 private run) makes the run impossible to continue safely. A trainer state that is
    there but damaged is one line naming it."""
    directory = recover(directory)
    state_path, secret_path = directory / STATE, directory / LEGACY_SECRET_FILE
    state = checked_state(state_path) if state_path.exists() else {}
    try:
        return state, (json.loads(read_record(secret_path)) if secret_path.exists() else None)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlimtuneError(f"{secret_path}: damaged and cannot be read ({type(exc).__name__}); the run cannot be "
                            "resumed from this checkpoint") from None


def checked_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json, refused in one line naming it when it is not a trainer state (unreadable,
    not an object, no whole step)."""
    try:
        state = json.loads(read_record(path))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SlimtuneError(f"{path}: damaged and cannot be read ({type(exc).__name__}); the run cannot be resumed "
                            "from this checkpoint") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        what = "no step" if isinstance(state, dict) else f"a JSON {type(state).__name__}, not an object"
        raise SlimtuneError(f"{path}: damaged ({what}); the run cannot be resumed from this checkpoint")
    return state


def resumed_state(run_dir: Path) -> dict | None:
    """The trainer state a resume of `run_dir` starts from, read only (checkpoint/, else the checkpoint.old a save was
    replacing, as recover would rename it); None when there is no checkpoint; a damaged one is refused in one line."""
    for name in ("checkpoint", "checkpoint.old"):
        directory = Path(run_dir) / name
        if directory.is_dir():
            if not (directory / STATE).exists():
                raise SlimtuneError(f"{directory}: no {STATE} (an incomplete or damaged checkpoint); the run cannot "
                                    "be resumed from it")
            return checked_state(directory / STATE)
    return None


def peek_state(run_dir: Path) -> dict:
    """A run's last trainer state, read only (no recovering rename, unlike read_state): its checkpoint's, else that of
    the checkpoint.old a save was replacing; {} when neither is there or readable."""
    for name in ("checkpoint", "checkpoint.old"):
        path = Path(run_dir) / name / "trainer_state.json"
        if not path.exists():
            continue
        try:
            state = json.loads(read_record(path))
        except (SlimtuneError, ValueError):
            continue
        if isinstance(state, dict):
            return state
    return {}


def load_checkpoint(directory: Path, model, optimizer) -> dict:
    """Load a checkpoint into `model` and `optimizer`; returns its trainer state. A damaged or missing file, or weights
    that are not exactly the model's trainable ones (a name missing or unknown, another shape), are one line."""
    directory = recover(directory)
    if not (directory / STATE).exists():
        raise SlimtuneError(f"{directory}: no checkpoint to resume from")
    state = read_state(directory)[0]
    weights = _read(directory / WEIGHTS, lambda path: load_file(str(path)))
    params = dict(model.named_parameters())
    unknown = [n for n in weights if n not in params]
    if unknown:
        raise SlimtuneError(f"{directory}: checkpoint does not match the model (unknown parameter {unknown[0]!r}); "
                            "resume with the same --model/--peft settings")
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise SlimtuneError(f"{directory / WEIGHTS}: lacks the trainable weight {missing[0]!r}"
                            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; the checkpoint is "
                            "damaged or not this run's")
    shaped = [n for n, value in weights.items() if tuple(value.shape) != tuple(params[n].shape)]
    if shaped:
        n = shaped[0]
        raise SlimtuneError(f"{directory / WEIGHTS}: weight {n!r} has shape {tuple(weights[n].shape)}, the model's "
                            f"{tuple(params[n].shape)}; the checkpoint is not this run's")
    optimizer_state = _read(directory / OPTIMIZER, lambda path: torch.load(path, weights_only=False))
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    try:
        optimizer.load_state_dict(_to_device(optimizer_state, next(model.parameters()).device))
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        raise SlimtuneError(f"{directory / OPTIMIZER}: does not match this run's optimizer ({type(exc).__name__}); the "
                            "checkpoint is damaged or not this run's") from None
    return state


def _read(path: Path, load):
    """`load(path)`, a missing or damaged file being one line naming it."""
    if not path.is_file():
        raise SlimtuneError(f"{path}: missing; the checkpoint is incomplete and the run cannot be resumed from it")
    try:
        return load(path)
    except Exception as exc:  # safetensors' SafetensorError, torch's RuntimeError/EOFError/UnpicklingError, OSError
        raise SlimtuneError(f"{path}: damaged or incomplete ({type(exc).__name__}); the run cannot be resumed from "
                            "this checkpoint") from None


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.dtype != torch.uint8 else obj  # generator states stay on CPU
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
