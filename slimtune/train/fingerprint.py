"""What a run was trained with beyond its settings, so that a resume is exact or refused.

config.json records the settings and the *paths* of the data and the model; the fingerprint records what those paths
held when the run started. It is written into every checkpoint's trainer_state.json (`fingerprint`), with a run id
that status.json also keeps (`run_id`):

- `run`: a random id per run: a checkpoint of another run copied into the directory is refused;
- `files`: a digest of the training (and evaluation) data's contents (a file, or every file of an hf:DIR dataset);
- `model`, `tokenizer`: digests of the weights files (and config.json) and of the tokenizer files of --model when it
  is a directory;
- `key`: private runs: a check value of the run's secret key (a PRF output of it, never the key);
- `versions`: torch and transformers, whose random streams are not promised across versions.

`check` recomputes them on --resume and refuses the first difference in one line (a version difference only without
--force). Checkpoints written before fingerprints resume as before.

Private runs never store a plain digest of a data file: anyone holding a candidate dataset could hash it (or it with
one row added or removed) and compare, testing a row's membership. They store HMAC-SHA256 of the run's id and the
file's SHA-256, keyed by a PRF output of the run's secret key: without the key it cannot be recomputed, two runs that
share a key file never store equal digests, and the key never leaves RUN/secret.key (privacy/secret.py). Data-parallel
ranks of a private run compare the same keyed digests, never a plain one (they travel between machines).
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
    per process while the file's inode, size, mtime and ctime stay the same (any write changes its ctime). Opened as
    the readers open data (readers.open_data_file): what is hashed is the regular file opened, never a named pipe or
    a device put in its place after a check (one would block or never end); read in chunks."""
    from slimtune.data.readers import open_data_file

    path = Path(path)
    with open_data_file(path, "rb") as f:
        st = os.fstat(f.fileno())
        cached = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if cached not in _SHA256:
            _SHA256[cached] = hashlib.file_digest(f, "sha256").hexdigest()
    return _SHA256[cached]


def source_sha256(path: str | Path) -> str:
    """SHA-256 of a data source: a file's contents, or for `hf:DIR` (a saved dataset) of every file under DIR with
    its relative path."""
    path = str(path)
    if not path.startswith("hf:"):
        return file_sha256(path)
    root = Path(path[3:])
    digest = hashlib.sha256()
    for relative, file in sorted(_files_under(root)):
        digest.update(f"{relative}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _files_under(root: Path) -> list[tuple[str, Path]]:
    """(relative path, file) of every file under `root`, through symbolic links to directories (a saved dataset's
    split may be one), each real directory once."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [(Path(folder, f).relative_to(root).as_posix(), Path(folder, f)) for f in files
                  if Path(folder, f).is_file()]
    return found


def source_exists(path: str | Path) -> bool:
    path = str(path)
    return Path(path[3:]).is_dir() if path.startswith("hf:") else Path(path).is_file()


def data_digest(path: str | Path, key=None, salt: str | None = None) -> str:
    """A data source's digest as a fingerprint records it: plain SHA-256, or for a private run (`key`: its RunKey)
    HMAC-SHA256 of it and `salt` (the run's id: two runs sharing a key file never store equal digests of equal files)
    under a PRF output of the key (see the module's docstring: no plain digest of private data). "hmac-sha256:"
    digests (no salt) were written before the salt."""
    sha = source_sha256(path)
    if key is None:
        return "sha256:" + sha
    mac_key = key.generator("data-check").bytes(32)
    if salt is None:
        return "hmac-sha256:" + hmac.new(mac_key, bytes.fromhex(sha), hashlib.sha256).hexdigest()
    return "hmac-sha256-v2:" + hmac.new(mac_key, salt.encode() + b":" + bytes.fromhex(sha),
                                        hashlib.sha256).hexdigest()


def key_check(key) -> str:
    """A check value of the run's key: a PRF output under it (reveals nothing about the key)."""
    return key.generator("run-check").bytes(16).hex()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def tokenizer_digest(model: str | None) -> str | None:
    """SHA-256 over the tokenizer files of --model when it is a directory (the ids every example becomes); None when
    it has none (a built-in name)."""
    if not model or not Path(model).is_dir():
        return None
    files = [Path(model) / name for name in TOKENIZER_FILES if (Path(model) / name).is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return "sha256:" + digest.hexdigest()


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
    run_id = run_id or new_run_id()
    files = {name: data_digest(getattr(config, name), key, run_id) for name, _ in DATA_FLAGS
             if getattr(config, name) and source_exists(getattr(config, name))}
    out = {"run": run_id, "files": files, "versions": versions()}
    model, tokenizer = model_digest(config.model), tokenizer_digest(config.model)
    if model is not None:
        out["model"] = model
    if tokenizer is not None:
        out["tokenizer"] = tokenizer
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
        if status.get("key") == "retired" and not config.secret_key_file:
            raise SlimtuneError(f"{where}: this private run completed and retired its key ({key_path}), so that its "
                                "directory holds nothing that undoes its noise; a completed private run is not "
                                "continued: start a new run (a run meant to be extended later keeps its own "
                                "--secret-key-file)")
        key = read_key_file(key_path)
        if key_check(key) != stored["key"]:
            raise SlimtuneError(f"{where}: the secret key ({key_path}) is not the one the run started with (replaced "
                                "or restored from another run); its noise and batches cannot be continued")
    for name, flag in DATA_FLAGS:
        recorded, path = stored.get("files", {}).get(name), getattr(config, name)
        if recorded is None or not path:
            continue
        if not source_exists(path):
            raise SlimtuneError(f"{where}: {flag} {path}: no such file here (the run trained on it); resume from the "
                                "directory the run was started in, or give the path of the same file")
        salt = stored.get("run") if recorded.startswith("hmac-sha256-v2:") else None
        if data_digest(path, key, salt) != recorded:
            raise SlimtuneError(f"{where}: {flag} {path}: its contents differ from the file the run started with "
                                f"(edited, regenerated, or another file of that name{_relative_hint(path)}); a "
                                "resumed run trains on the same data: restore the file or start a new run")
    if (stored.get("model") or stored.get("tokenizer")) and not Path(config.model).exists():
        raise SlimtuneError(f"{where}: --model {config.model}: no such directory here (the run trained on it); resume "
                            "from the directory the run was started in, or give the path of the same checkpoint")
    if stored.get("tokenizer") and tokenizer_digest(config.model) != stored["tokenizer"]:
        raise SlimtuneError(f"{where}: --model {config.model}: its tokenizer files differ from those the run started "
                            "with (every example would become other token ids); restore them or start a new run")
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
