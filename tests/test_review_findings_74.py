"""Review 74: `slimtune train` under interrupts, concurrency and a hostile filesystem. The promises: nothing the user
had is overwritten or lost; a refusal is one line (exit 2) before any work; a stopped run is resumable and says so in
one line. Each test fails on the code it was written against."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from slimtune import SlimtuneError

from conftest import cli, one_line_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
TRAIN = ("--data", DEMO / "sst2_demo_train.tsv", "--model", "tiny-llama", "--batch-size", "2", "--eval-every", "0",
         "--save", "last", "--checkpoint-every", "1", "--quiet", "--r", "2")


def finished_run(out: Path, steps: int = 2) -> Path:
    res = cli("train", *TRAIN, "--steps", steps, "--out", out)
    assert res.exit_code == 0, res.output[-800:]
    return out


# A `slimtune train` subprocess that hangs (writing MARKER first) at a chosen moment, for a signal to arrive there.
HANG = r"""
import os, sys, time
from pathlib import Path
marker = Path(os.environ["MARKER"])
def hang():
    marker.write_text("x")
    time.sleep(60)
import slimtune.train.trainer as T
if os.environ["HANG_AT"] == "step":
    real, calls = T._step, []
    def step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            hang()
        return real(*a, **k)
    T._step = step
else:  # between write_adapter's two renames: adapter/ moved aside, the new one not yet in place
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if Path(src).name == "adapter" and Path(dst).name.endswith(".partial"):
            hang()
    os.replace = replace
from slimtune.cli import app
sys.argv = ["slimtune", *sys.argv[1:]]
app()
"""


def sigterm_at(hang_at: str, tmp_path: Path, *args) -> subprocess.CompletedProcess:
    marker = tmp_path / "marker"
    env = {**os.environ, "MARKER": str(marker), "HANG_AT": hang_at, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HANG, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the run never reached the moment to signal"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- 1. SIGTERM (timeout, kill, a scheduler, docker stop) is not handled ----------------------------------------------
def test_sigterm_during_training_marks_the_run_interrupted_and_says_so_in_one_line(tmp_path):
    """SIGTERM kills `slimtune train` with Python's default action: exit 143, nothing on stderr, and status.json says
    `running` for good (a dead pid), where Ctrl-C says `interrupted` and prints the resume command."""
    out = tmp_path / "run"
    res = sigterm_at("step", tmp_path, "train", *TRAIN, "--steps", "4", "--out", out)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted", (res.returncode, status)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--resume" in lines[0], (res.returncode, res.stderr[-500:])


def test_sigterm_during_the_adapter_swap_keeps_adapter_and_the_users_files_in_it(tmp_path):
    """write_adapter renames adapter/ aside, then the new one in; its clean-up runs only for Python exceptions, so a
    SIGTERM between the two renames leaves no adapter/ at all, and the user's files it carried (a .gguf exported
    there, notes) hidden in a .adapter.XXXX.partial directory (a resume writes a new adapter/ without them)."""
    out = finished_run(tmp_path / "run")
    (out / "adapter" / "notes.txt").write_text("mine")
    sigterm_at("adapter_swap", tmp_path, "train", "--resume", "--out", out, "--steps", "3", "--quiet")
    assert (out / "adapter" / "adapter_model.safetensors").exists(), sorted(p.name for p in out.iterdir())
    assert (out / "adapter" / "notes.txt").read_text() == "mine"


# -- 2. Ctrl-C outside the step loop (the final saves, loading, a second Ctrl-C) prints nothing ------------------------
def test_ctrl_c_during_the_final_adapter_save_prints_one_line(tmp_path, monkeypatch):
    """typer turns a KeyboardInterrupt into a silent Exit(130): OneLineErrors' `except click.Abort` ("interrupted")
    is never reached, so the run stops with exit 130 and an empty stderr; the user is not told it is resumable."""
    import slimtune.train.trainer as trainer

    def interrupted(run):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "_save_adapter", interrupted)
    out = tmp_path / "run"
    res = cli("train", *TRAIN, "--steps", "2", "--out", out)
    assert res.exit_code == 130, res.output[-500:]
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), repr(res.stderr)


def test_the_resume_command_printed_after_ctrl_c_is_quoted_for_the_shell(tmp_path, monkeypatch):
    """'resume with: slimtune train --out /x/my runs/a --resume' cannot be pasted: the path is not quoted."""
    import slimtune.train.trainer as trainer
    real = trainer._step

    def step(run, n):
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop after this step
        return real(run, n)
    monkeypatch.setattr(trainer, "_step", step)
    out = tmp_path / "my runs" / "a"
    res = cli("train", *TRAIN, "--steps", "3", "--out", out)
    assert res.exit_code == 130, res.output[-500:]
    assert f"--out {shlex.quote(str(out))} --resume" in res.stderr, res.stderr


# -- 3. concurrency ----------------------------------------------------------------------------------------------------
def test_a_second_train_into_a_directory_being_trained_into_is_refused_before_loading(tmp_path, monkeypatch):
    """The dry claim does not probe the lock: a second `slimtune train` (or --resume/--restart) into a directory a
    running process holds loads the model and data first (minutes for a real model), and only then is refused."""
    import slimtune.train.trainer as trainer
    from slimtune.train.run_dir import RunDirectory

    out = tmp_path / "run"
    holder = RunDirectory(out)
    holder.acquire()  # another process training into it (before its first save)
    holder.update(state="running", pid=12345, step=0)
    try:
        def loaded(config):
            raise SlimtuneError("LOADED THE MODEL AND DATA")
        monkeypatch.setattr(trainer, "_load", loaded)
        message = one_line_error(cli("train", *TRAIN, "--steps", "2", "--out", out))
        assert "another slimtune process" in message, message
    finally:
        holder.release()


def test_two_concurrent_restarts_do_not_both_own_the_run_directory(tmp_path, monkeypatch):
    """The lock file lives inside the directory --restart renames aside. A second process waiting on RUN/.lock holds a
    descriptor of the old file: when the first moves RUN to RUN.failed-1 and drops that lock, the second gets the lock
    of RUN.failed-1/.lock, finds the new RUN empty, and claims it as a new run while the first trains there too."""
    import fcntl

    import slimtune.train.trainer as trainer
    from slimtune.train.run_dir import RunDirectory

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "status.json").write_text(json.dumps({"state": "interrupted"}))
    config = SimpleNamespace(out_dir=str(out))
    spinning, results = threading.Event(), {}
    real_flock, real_move = fcntl.flock, RunDirectory.move_aside

    def flock(fd, op):
        try:
            return real_flock(fd, op)
        except BlockingIOError:
            spinning.set()
            raise
    monkeypatch.setattr(fcntl, "flock", flock)

    def second():
        holder = []
        try:
            results["second"] = trainer._claim(config, False, True, holder)[0]
        except SlimtuneError as exc:
            results["second"] = exc

    def move_aside(self):
        if "thread" not in results:  # the first process, holding the lock: the second starts waiting on it
            results["thread"] = threading.Thread(target=second)
            results["thread"].start()
            assert spinning.wait(10)
        return real_move(self)
    monkeypatch.setattr(RunDirectory, "move_aside", move_aside)
    first = trainer._claim(config, False, True, [])[0]
    results["thread"].join(10)
    try:
        assert not isinstance(results["second"], RunDirectory), "both processes own RUN (two runs write into it)"
    finally:
        first.release()
        if isinstance(results.get("second"), RunDirectory):
            results["second"].release()


# -- 4. a hostile filesystem -------------------------------------------------------------------------------------------
def test_a_full_disk_while_training_is_one_line_not_an_internal_error(tmp_path, monkeypatch):
    """metrics.jsonl is appended with a plain open(): ENOSPC there (or in save_checkpoint, save_peft) surfaces as
    'internal error (OSError ...); please report it', exit 1: a full disk reported as a bug in slimtune."""
    real = Path.open
    calls = []

    def full(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and "a" in mode:
            calls.append(1)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, mode, *args, **kwargs)
    monkeypatch.setattr(Path, "open", full)
    message = one_line_error(cli("train", *TRAIN, "--steps", "3", "--out", tmp_path / "run"))
    assert "internal error" not in message and "metrics.jsonl" in message, message


def test_a_dangling_symlink_as_out_is_one_line_before_any_work(tmp_path, monkeypatch):
    """`--out link` where link points nowhere passes the checks (exists() follows it), the model and data are loaded,
    then RunDirectory.acquire's mkdir fails: 'internal error (FileExistsError ...)', exit 1."""
    import slimtune.train.trainer as trainer

    def loaded(config):
        raise SlimtuneError("LOADED THE MODEL AND DATA")
    monkeypatch.setattr(trainer, "_load", loaded)
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone" / "run")
    message = one_line_error(cli("train", *TRAIN, "--steps", "2", "--out", link))
    assert "--out" in message and "LOADED" not in message, message


def test_a_resume_does_not_move_files_out_of_the_directory_adapter_links_to(tmp_path):
    """RUN/adapter a symlink to a shared directory: write_adapter follows it (final.is_dir()), moves every file there
    that is not an adapter's into the run's new adapter/, and leaves the link as .adapter.XXXX.partial: someone
    else's file is taken out of their directory."""
    out = finished_run(tmp_path / "run")
    shared = tmp_path / "shared"
    shutil.copytree(out / "adapter", shared)
    (shared / "theirs.txt").write_text("not the run's")
    shutil.rmtree(out / "adapter")
    (out / "adapter").symlink_to(shared)
    res = cli("train", "--resume", "--out", out, "--steps", "3", "--quiet")
    assert (shared / "theirs.txt").exists(), (res.exit_code, sorted(p.name for p in shared.iterdir()))


def test_a_kill_between_the_adapter_renames_is_recovered_with_the_users_files(tmp_path):
    """(lead) SIGKILL between write_adapter's two renames leaves no adapter/: the previous one renamed aside
    (.adapter.ID.old.partial) and the new one (.adapter.ID.partial, holding the user's notes it carried). The next
    claim of the directory puts the previous one back with the notes, before the resumed run writes its own adapter
    over it (carrying the notes again)."""
    run = tmp_path / "run"
    res = cli("train", *TRAIN, "--steps", 2, "--out", run)
    assert res.exit_code == 0, res.output[-800:]
    (run / "adapter" / "notes.txt").write_text("mine")
    # the state the kill left: the new adapter (the user's notes carried into it) beside the previous one, renamed
    shutil.copytree(run / "adapter", run / ".adapter.k1ll3d.partial")
    (run / "adapter" / "notes.txt").unlink()
    os.replace(run / "adapter", run / ".adapter.k1ll3d.old.partial")
    res = cli("train", "--resume", "--out", run, "--steps", 3, "--quiet")
    assert res.exit_code == 0, res.output[-800:]
    assert (run / "adapter" / "notes.txt").read_text() == "mine"
    assert not list(run.glob(".adapter.*"))
