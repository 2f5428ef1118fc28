"""What a run was trained with beyond its settings, so that a resume is exact or refused.

config.json records the settings and the *paths* of the data and the model; the fingerprint records what those paths
held when the run started. It is written into every checkpoint's trainer_state.json (`fingerprint`), with a run id
that status.json also keeps (`run_id`):

- `run`: a random id per run: a checkpoint of another run copied into the directory is refused;
- `files`: a digest of the training (and evaluation) data file's contents;
- `model`: a digest of the weights files (and config.json) of --model when it is a directory;
- `key`: private runs: a check value of the run's secret key (a PRF output of it, never the key);
- `versions`: torch and transformers, whose random streams are not promised across versions.

`check` recomputes them on --resume and refuses the first difference in one line (a version difference only without
--force). Checkpoints written before fingerprints resume as before.

Private runs never store a plain digest of a data file: anyone holding a candidate dataset could hash it (or it with
one row added or removed) and compare, testing a row's membership. They store HMAC-SHA256 of the file's SHA-256,
keyed by a PRF output of the run's secret key: without the key it cannot be recomputed, and the key never leaves
RUN/secret.key (privacy/secret.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import warnings
from pathlib import Path

from slimtune import SlimtuneError

DATA_FLAGS = (("train_data", "--data"), ("eval_data", "--eval-data"))
_SHA256: dict[tuple, str] = {}  # (path, dev, inode, size, mtime, ctime) -> sha256: each file is read once per process


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's contents (hex): the one hasher of data and model files (rank_facts, the fingerprint). Kept
    per process while the file's inode, size, mtime and ctime stay the same (any write changes its ctime)."""
    path = Path(path)
    st = path.stat()
    cached = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if cached not in _SHA256:
        with open(path, "rb") as f:
            _SHA256[cached] = hashlib.file_digest(f, "sha256").hexdigest()
    return _SHA256[cached]


def data_digest(path: str | Path, key=None) -> str:
    """A data file's digest as a fingerprint records it: plain SHA-256, or for a private run (`key`: its RunKey)
    HMAC-SHA256 of it under a PRF output of the key (see the module's docstring: no plain digest of private data)."""
    sha = file_sha256(path)
    if key is None:
        return "sha256:" + sha
    mac_key = key.generator("data-check").bytes(32)
    return "hmac-sha256:" + hmac.new(mac_key, bytes.fromhex(sha), hashlib.sha256).hexdigest()


def key_check(key) -> str:
    """A check value of the run's key: a PRF output under it (reveals nothing about the key)."""
    return key.generator("run-check").bytes(16).hex()


def model_digest(model: str | None) -> str | None:
    """SHA-256 over the config.json and the weights files (those the loader reads) of --model when it is a directory
    (or a file); None for a built-in or hub name."""
    if not model:
        return None
    path = Path(model)
    if path.is_file():
        return "sha256:" + file_sha256(path)
    if not path.is_dir():
        return None
    from slimtune.models.loading import weight_files
    digest = hashlib.sha256()
    for file in ([path / "config.json"] if (path / "config.json").is_file() else []) + list(weight_files(path)):
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return "sha256:" + digest.hexdigest()


def versions() -> dict:
    import torch
    try:
        from importlib.metadata import version
        transformers = version("transformers")
    except Exception:  # not installed as a distribution
        transformers = None
    return {"torch": str(torch.__version__), "transformers": transformers}


def new_run_id() -> str:
    return os.urandom(8).hex()


def compute(config, key=None, run_id: str | None = None) -> dict:
    """The fingerprint of a run with settings `config` (its data and model paths as they are now); `key`: a private
    run's RunKey."""
    files = {name: data_digest(getattr(config, name), key) for name, _ in DATA_FLAGS
             if getattr(config, name) and Path(getattr(config, name)).is_file()}
    out = {"run": run_id or new_run_id(), "files": files, "versions": versions()}
    model = model_digest(config.model)
    if model is not None:
        out["model"] = model
    if key is not None:
        out["key"] = key_check(key)
    return out


def check(config, run_dir: Path, stored: dict, status: dict) -> dict:
    """Refuse a resume whose data, model, key or checkpoint are not those the checkpoint's fingerprint `stored`
    records (one line naming the first difference); returns the version changes --force accepted ({lib: [old,
    new]}), to record in config.json."""
    where = f"--resume {run_dir}"
    if status.get("run_id") and stored.get("run") and status["run_id"] != stored["run"]:
        raise SlimtuneError(f"{where}: {run_dir}/checkpoint was saved by another run (run id {stored['run']}; this "
                            f"run's is {status['run_id']}, status.json): a checkpoint copied in from another run is "
                            "not resumed")
    key = None
    if stored.get("key"):
        from slimtune.privacy.secret import KEY_FILE, read_key_file
        key_path = Path(config.secret_key_file) if config.secret_key_file else Path(run_dir) / KEY_FILE
        key = read_key_file(key_path)
        if key_check(key) != stored["key"]:
            raise SlimtuneError(f"{where}: the secret key ({key_path}) is not the one the run started with (replaced "
                                "or restored from another run); its noise and batches cannot be continued")
    for name, flag in DATA_FLAGS:
        recorded, path = stored.get("files", {}).get(name), getattr(config, name)
        if recorded is None or not path:
            continue
        if not Path(path).is_file():
            raise SlimtuneError(f"{where}: {flag} {path}: no such file here (the run trained on it); resume from the "
                                "directory the run was started in, or give the path of the same file")
        if data_digest(path, key) != recorded:
            raise SlimtuneError(f"{where}: {flag} {path}: its contents differ from the file the run started with "
                                f"(edited, regenerated, or another file of that name{_relative_hint(path)}); a "
                                "resumed run trains on the same data: restore the file or start a new run")
    if stored.get("model") and model_digest(config.model) != stored["model"]:
        raise SlimtuneError(f"{where}: --model {config.model}: the model's weights differ from those the run started "
                            "with (another checkpoint saved there?); restore them or start a new run")
    changed = {}
    now = versions()
    for lib, old in (stored.get("versions") or {}).items():
        new = now.get(lib)
        if old == new or old is None or new is None:
            continue
        if not config.force:
            raise SlimtuneError(f"{where}: {lib} {old} -> {new} since the run started (random streams may differ; "
                                "--force to resume anyway)")
        changed[lib] = [old, new]
    if changed:
        shown = ", ".join(f"{lib} {old} -> {new}" for lib, (old, new) in changed.items())
        warnings.warn(f"--resume --force: {shown} since the run started; random streams may differ from the run's "
                      "(recorded in config.json)", stacklevel=2)
    return changed


def _relative_hint(path: str) -> str:
    return ", read relative to the working directory" if not Path(path).is_absolute() else ""
