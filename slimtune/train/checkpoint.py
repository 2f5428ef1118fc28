"""Atomic checkpoints: write everything into a temporary directory, then swap it in with renames.

A crash at any moment leaves either the previous checkpoint or the new one, never a half-written mix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimtune import SlimtuneError


LEGACY_SECRET_FILE = "secret.json"  # checkpoints before issue 33 kept a 63-bit noise seed here; never written now


def save_checkpoint(directory: Path, model, optimizer, state: dict) -> None:
    """Trainable weights, optimizer state and trainer state. Never anything secret: a private run's key lives only in
    RUN/secret.key (privacy/secret.py), and no optimizer holds a generator state."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():  # complete (it is only ever made by the rename below): a .old beside it is stale, left by
        shutil.rmtree(old, ignore_errors=True)  # an interrupted clean-up, and would make this rename fail for good
        os.replace(directory, old)
    os.replace(tmp, directory)
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
    legacy secret (a pre-issue-33 private run) makes the run impossible to continue safely."""
    directory = recover(directory)
    state_path, secret_path = directory / "trainer_state.json", directory / LEGACY_SECRET_FILE
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        return state, (json.loads(secret_path.read_text()) if secret_path.exists() else None)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlimtuneError(f"{directory}: its trainer_state.json (or {LEGACY_SECRET_FILE}) is damaged and cannot be "
                            f"read ({type(exc).__name__}); the run cannot be resumed from it") from None


def peek_state(run_dir: Path) -> dict:
    """A run's last trainer state, read only (no recovering rename, unlike read_state): its checkpoint's, else that of
    the checkpoint.old a save was replacing; {} when neither is there or readable."""
    for name in ("checkpoint", "checkpoint.old"):
        try:
            state = json.loads((Path(run_dir) / name / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict):
            return state
    return {}


def load_checkpoint(directory: Path, model, optimizer) -> dict:
    directory = recover(directory)
    if not (directory / "trainer_state.json").exists():
        raise SlimtuneError(f"{directory}: no checkpoint to resume from")
    weights = load_file(str(directory / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise SlimtuneError(f"{directory}: checkpoint does not match the model (unknown parameter {missing[0]!r}); "
                            "resume with the same --model/--peft settings")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(_to_device(torch.load(directory / "optimizer.pt", weights_only=False),
                                         next(model.parameters()).device))
    return read_state(directory)[0]


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.dtype != torch.uint8 else obj  # generator states stay on CPU
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
