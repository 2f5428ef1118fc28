"""A run directory has one owner and says what state it is in.

- `.lock`: an exclusive `fcntl.flock` held by the process that trains into the directory, from before anything is
  written until it exits. A second process is refused with one line instead of interleaving metrics.jsonl and mixing
  config.json/summary.json of two runs. The lock dies with its process (no stale locks after a kill).
- `status.json`: {"state": running | completed | failed | interrupted, "pid", "step", "stop_reason" or "error",
  and for private runs "attempt" and "released_through"; "run_id", which the run's checkpoints also record
  (train/fingerprint.py)}. Written atomically and synced to disk (replace_file: temporary file, fsync, rename).
  `slimtune report` skips runs whose state is not completed; a new run may replace a failed or interrupted one only
  with `--restart`, which moves the old directory aside (RUN.failed-1, ...): nothing the user had is deleted.

Private runs keep their release ledger here: `released_through` is the last step whose released values were written
(to metrics.jsonl or a progress line), updated *before* they are written. A resume from an earlier checkpoint
recomputes those steps, so it must use fresh noise and account them again (train/trainer.py).
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from slimtune import SlimtuneError

STATUS_FILE = "status.json"
LOCK_FILE = ".lock"
LOCK_TRIES, LOCK_WAIT_S = 20, 0.05  # a held lock is reported after ~1 s of trying
UNFINISHED = ("failed", "interrupted", "running")


class RunFileError(SlimtuneError, OSError):
    """An OS error on a run's files while it trains (a full disk, a quota, a read-only remount): one line naming the
    file for the CLI (exit code 2), and still the OSError it was (errno, filename) for a Python caller."""

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        OSError.__init__(self, errno, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # OSError's would rebuild it as (errno, strerror, filename): the message as its errno
        return (type(self), (self.message, self.errno, self.filename))


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.replaced: Path | None = None  # --restart: where the failed run it replaced was moved

    # -- checks before anything is written ------------------------------------------------------------------------
    def check_writable(self, flag: str = "--out") -> None:
        """One-line errors for a path that can never hold a run (a file, a parent that is missing or read-only)."""
        check_output_dir(self.path, flag)

    # -- ownership --------------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the directory's lock (tried for ~1 s). The lock file is checked to be RUN/.lock still once locked: a
        concurrent --restart may have moved the directory (and the file this process waited on) aside meanwhile."""
        import fcntl

        lock = self.path / LOCK_FILE
        for attempt in range(LOCK_TRIES):  # a moment's probe (lock_held: export, merge) must not refuse a start
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
            else:
                if _same_file(fd, lock):
                    self._lock_fd = fd
                    return
                os.close(fd)  # the lock of a directory moved aside: try RUN/.lock as it is now
            if attempt + 1 < LOCK_TRIES:
                time.sleep(LOCK_WAIT_S)
        raise self._held() from None

    def check_not_held(self) -> None:
        """Refuse, before any work, a directory another process holds (it is training into it)."""
        if lock_held(self.path):
            raise self._held()

    def _held(self) -> SlimtuneError:
        owner = self.status().get("pid")
        return SlimtuneError(f"{self.path}: another slimtune process{f' (pid {owner})' if owner else ''} is "
                             "training into this directory; wait for it or choose another --out")

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # -- status -------------------------------------------------------------------------------------------------------
    def status(self) -> dict:
        return read_status(self.path)

    def update(self, **fields) -> dict:
        status = {**self.status(), **fields, "updated": time.time()}
        replace_file(self.path / STATUS_FILE, json.dumps(status, indent=2))  # on disk before what it accounts
        return status

    def move_aside(self) -> Path:
        """`--restart`: rename a failed/interrupted run's directory to RUN.failed-N (never deleted)."""
        n = 1
        while (target := self.path.with_name(f"{self.path.name}.failed-{n}")).exists():
            n += 1
        os.replace(self.path, target)
        return target


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (held.st_ino, held.st_dev) == (now.st_ino, now.st_dev)


def recover_adapter(out: str | Path) -> None:
    """Finish what a kill between write_adapter's two renames left (checkpoint.recover's twin): adapter/ missing, the
    previous one renamed aside (.adapter.*.old.partial) and the new one complete beside it (.adapter.*.partial,
    holding the user's files it carried), the two named alike. The previous adapter/ is put back with the user's
    files, as write_adapter's own rollback would have; anything else (a lone .old.partial: a successful write's
    clean-up cut short) is not restored. Called by the directory's owner."""
    import shutil

    from slimtune.peft.registry import ADAPTER_KIND_FILES

    final = Path(out) / "adapter"
    if final.exists() or final.is_symlink():
        return
    olds = [p for p in final.parent.glob(".adapter.*.old.partial") if p.is_dir() and not p.is_symlink()]
    pairs = [(old, old.with_name(old.name[:-len(".old.partial")] + ".partial")) for old in olds]
    pairs = [(old, new) for old, new in pairs if new.is_dir() and not new.is_symlink()]  # one write_adapter's two
    if len(pairs) != 1:  # a lone .old.partial is a successful write's unfinished clean-up: never restored
        return
    old, new = pairs[0]
    for path in list(new.iterdir()) if any((new / n).exists() for n in ADAPTER_KIND_FILES) else []:
        if not (old / path.name).exists():  # the user's files carried into the new adapter, the names old lacks
            os.replace(path, old / path.name)
    os.replace(old, final)
    shutil.rmtree(new, ignore_errors=True)


def lock_held(path: str | Path) -> bool:
    """Whether a process holds the run directory's lock now (it is training into it)."""
    import fcntl

    try:
        fd = os.open(Path(path) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # drops the shared lock taken for the test


def check_finished_run(adapter: str | Path, flag: str) -> None:
    """An adapter that outlives its run (export's .gguf, merge's checkpoint) is taken only from a run that completed:
    adapter/ is replaced at each better evaluation while the run trains, and after a failure it holds an earlier
    evaluation's model. Any other directory (outside a run, or a merged checkpoint kept in one) is taken as it is."""
    run = Path(adapter).resolve().parent  # `.` from inside adapter/, or a link to it: the run it belongs to
    if Path(adapter).resolve() != (run / "adapter").resolve() or not (run / STATUS_FILE).exists():
        return
    status = read_status(run)
    keep = f"copy {adapter} elsewhere to use it as it is"
    if status.get("damaged"):
        raise SlimtuneError(f"{flag} {adapter}: {run / STATUS_FILE} is damaged, so whether its run finished is "
                            f"unknown; {keep}")
    state, step = status.get("state"), status.get("step")
    if state == "running" and lock_held(run):
        raise SlimtuneError(f"{flag} {adapter}: its run is still training (running, {STATUS_FILE}) and replaces "
                            f"adapter/ at each better evaluation: wait for it to finish, or {keep}")
    if state in UNFINISHED:
        ended = "stopped without finishing" if state == "running" else state
        raise SlimtuneError(f"{flag} {adapter}: its run {ended}{f' at step {step}' if step else ''} ({STATUS_FILE}), "
                            f"so adapter/ holds an earlier evaluation's model: resume the run (slimtune train "
                            f"--resume), or {keep}")


def read_record(path: str | Path, errors: str = "strict") -> str:
    """The text (UTF-8) of one of a run's record files (config.json, status.json, summary.json, metrics.jsonl, a
    checkpoint's trainer_state.json): readers.read_regular_text (a directory, named pipe or device in its place is
    one line naming it, never a hang); a UnicodeDecodeError passes to the caller, which names the damage."""
    from slimtune.data.readers import read_regular_text
    return read_regular_text(path, "a run's record file (a file slimtune writes); move it aside", errors)


def read_status(path: str | Path) -> dict:
    file = Path(path) / STATUS_FILE
    if not file.exists() and not file.is_symlink():
        return {}
    try:
        status = json.loads(read_record(file))
    except (ValueError, UnicodeDecodeError):
        status = None
    if not isinstance(status, dict):  # unreadable, or valid JSON that is not an object (null, [])
        return {"state": "unknown", "damaged": True}  # a private run's ledger was there: callers must not assume none
    return status


WRITING = ".writing"  # replace_file's temporary directory: RUN/.NAME.writing/NAME


def replace_file(path: str | Path, text: str) -> None:
    """`path` holds `text`, or, whatever fails (a full disk, a kill, a power loss), what it held before: the text is
    written to a file of the same name in a temporary sibling directory (so the operating system, and any error,
    name the file), flushed to disk, renamed over `path`, and the directory flushed. The one way a run's records
    (config.json, metrics.jsonl, summary.json, status.json) are rewritten."""
    import shutil

    path = Path(path)
    tmp_dir = path.with_name(f".{path.name}{WRITING}")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # a kill's leftover (one writer: the run directory's owner)
    try:
        tmp_dir.mkdir()
        tmp = tmp_dir / path.name
        tmp.write_text(text)
        sync_to_disk(tmp)
        os.replace(tmp, path)
        sync_to_disk(path.parent)
    except OSError as exc:
        raise SlimtuneError(f"{path}: could not write ({exc.strerror or exc}); its previous contents are kept") \
            from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def is_writing_temporary(name: str) -> bool:
    """Whether a name in a run directory is replace_file's temporary (a kill can leave one behind)."""
    return name.startswith(".") and name.endswith(WRITING)


def sync_to_disk(path: str | Path) -> None:
    """fsync a file, or a directory (its entries: a rename in it); a filesystem that cannot sync a directory is
    left as it is."""
    is_dir = Path(path).is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def check_output_dir(path: Path, flag: str) -> None:
    path = Path(path)
    for link in (path, *path.parents):  # exists() follows a link: a dangling one passed, and mkdir failed after
        if link.is_symlink() and not link.exists():  # all the work
            raise SlimtuneError(f"{flag} {path}: {link} is a symbolic link to {os.readlink(link)}, which does not "
                                "exist (or the links loop); give a directory, or create its target")
    if path.exists() and not path.is_dir():
        raise SlimtuneError(f"{flag} {path}: is a file, not a directory")
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SlimtuneError(f"{flag} {path}: {parent} is not writable")
    check_not_in_a_run(path, flag)


def check_output_file(path: str | Path, flag: str, overwrite: bool = False) -> Path:
    """An output file the command will write at the end: checked before any work (parent exists and is writable,
    not a directory, not an existing file unless `overwrite`)."""
    path = Path(path)
    if path.is_symlink():  # exists() follows it: a dangling link passed, and the write failed after all the work
        raise SlimtuneError(f"{flag} {path}: is a symbolic link (nothing was overwritten); give a new file name")
    if path.is_dir():
        raise SlimtuneError(f"{flag} {path}: is a directory; give a file name")
    if path.exists() and not overwrite:
        raise SlimtuneError(f"{flag} {path}: exists (nothing was overwritten); choose another name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SlimtuneError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SlimtuneError(f"{flag} {path}: directory {parent} is not writable")
    check_not_in_a_run(path, flag)
    return path


REPLACED_WHOLE = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "adapter", "pissa_init")  # a run's saves swap
# these in whole (or delete them first)
RUN_FILES = ("summary.json", "metrics.jsonl", "config.json", STATUS_FILE, STATUS_FILE + ".tmp", LOCK_FILE,
             "secret.key")  # what a run writes (or replaces) at its top level


def is_run_directory(directory: Path) -> bool:
    """A training run's directory: its status.json, or (a run made before status.json, or one whose status.json
    is gone, still resumes) its config.json beside a checkpoint or metrics."""
    return (directory / STATUS_FILE).exists() or (directory / "config.json").is_file() and any(
        (directory / name).exists() for name in ("checkpoint", "checkpoint.old", "metrics.jsonl"))


def check_not_in_a_run(path: str | Path, flag: str) -> None:
    """An output (file or directory) never where a training run's next save or resume would replace or delete it:
    inside a directory its saves replace whole (RUN/checkpoint, RUN/adapter, ...: REPLACED_WHOLE), nor at one of
    the names it writes at its top (its records, RUN_FILES, and its hidden temporaries)."""
    resolved = Path(os.path.abspath(path)).resolve()
    for directory in (resolved, *resolved.parents):
        run = directory.parent
        if run == directory or not is_run_directory(run):
            continue
        name = directory.name
        if name in REPLACED_WHOLE:
            raise SlimtuneError(f"{flag} {path}: inside {directory}, which each save of the run in {run} replaces "
                                "whole (a `train --resume` would delete it with it): write it elsewhere")
        if directory == resolved and (name in RUN_FILES or name.startswith(".")):
            raise SlimtuneError(f"{flag} {path}: a name the run in {run} writes ({name}); a `train --resume` would "
                                "replace it: write it elsewhere")


def _partial_name(target: Path) -> Path:
    """A temporary sibling of `target` no user file has: a fixed name (o.jsonl.tmp, m.tmp-merge, x.gguf.partial) was
    overwritten or deleted when the user had one."""
    import uuid
    target = Path(os.path.abspath(target))  # "." and "out/.." have a name to build it from
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.partial")


def write_new_file(path: str | Path, write, flag: str) -> None:
    """Write the output file `path` (checked by check_output_file before any work) whole or not at all: `write(tmp)`
    fills a temporary sibling, which becomes `path` only if nothing has appeared there meanwhile; on an error or a
    Ctrl-C the temporary is removed, and nothing else is touched."""
    target = Path(path)
    tmp = _partial_name(target)
    appeared = SlimtuneError(f"{flag} {path}: appeared while this command ran (nothing was overwritten)")
    try:
        write(tmp)
        try:
            os.link(tmp, target)  # atomic, and refuses anything at `path`: no window between a check and a rename
        except FileExistsError:
            raise appeared from None
        except OSError:  # a filesystem without hard links: check, then rename
            if target.exists():
                raise appeared from None
            os.replace(tmp, target)
    except OSError as exc:
        raise SlimtuneError(f"{flag} {path}: could not write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_new_directory(path: str | Path, write, flag: str) -> None:
    """write_new_file for an output directory (checked new or empty by check_new_directory): `write(tmp)` fills a
    temporary sibling directory, renamed onto `path` (which may only be empty: the rename fails on anything in it).
    The working directory itself (`--out .`) keeps its inode: the files move into it, as a rename would leave the
    shell that ran the command in a deleted, empty directory."""
    import shutil

    target = Path(os.path.abspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(target)
    try:
        tmp.mkdir()
        write(tmp)
        if target.is_dir() and os.path.samefile(target, os.getcwd()):
            if any(target.iterdir()):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))
            for entry in tmp.iterdir():
                os.rename(entry, target / entry.name)
        else:
            os.rename(tmp, target)
    except OSError as exc:
        reason = "it is no longer empty" if target.is_dir() and any(target.iterdir()) else exc.strerror or exc
        raise SlimtuneError(f"{flag} {path}: could not write ({reason}; nothing was overwritten)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
