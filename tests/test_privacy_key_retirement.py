"""A completed private run retires RUN/secret.key (privacy/secret.py, retire_key_file).

The key reproduces every noise value and every Poisson batch of the run: whoever holds it and the released values
(metrics.jsonl's projected gradients, the checkpoint) recovers the unnoised sums, i.e. the run without its privacy.
Before this change a completed run kept the key in its directory, so a user who shared the directory whole (a
results archive, a bucket, a repository) shared the key with it. Each test here failed on the code before it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import cli, one_line_error  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "slimtune" / "data" / "demo"
ROWS = (DEMO / "sst2_demo_train.tsv").read_text().splitlines()
PRIVATE = ("--optimizer", "dpzero", "--delta", "1e-3")


def train(run: Path, data: Path, *flags, steps: int = 2):
    return cli("train", "--data", data, "--model", "tiny-llama", "--steps", str(steps), "--batch-size", "2",
               "--eval-every", "0", "--save", "last", "--checkpoint-every", "1", "--out", run, "--quiet", "--r", "2",
               *PRIVATE, *flags)


def data_file(tmp_path: Path) -> Path:
    data = tmp_path / "train.tsv"
    data.write_text("\n".join(ROWS[:41]) + "\n")
    return data


def test_a_completed_private_run_leaves_no_key_in_its_directory(tmp_path):
    run = tmp_path / "run"
    res = train(run, data_file(tmp_path))
    assert res.exit_code == 0, res.output[-800:]
    names = sorted(p.name for p in run.iterdir())
    assert "secret.key" not in names and not [n for n in names if n.startswith(".secret.key")], names
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["key"] == "retired", status
    assert (run / "adapter").is_dir() and (run / "summary.json").is_file()  # the run's outputs are all there


def test_resuming_a_completed_private_run_is_one_line_naming_the_retired_key(tmp_path):
    run = tmp_path / "run"
    data = data_file(tmp_path)
    assert train(run, data).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    line = one_line_error(cli("train", "--resume", "--out", run, "--steps", "4", "--quiet"))
    assert "retired" in line and "--secret-key-file" in line, line
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written


def test_a_users_own_key_file_is_never_retired_and_extends_the_run(tmp_path):
    """--secret-key-file is the user's file: it is kept as it was, and with it a completed run may be extended."""
    from slimtune.privacy.secret import create_key_file
    key = tmp_path / "my.key"
    create_key_file(key)
    content = key.read_bytes()
    run = tmp_path / "run"
    data = data_file(tmp_path)
    assert train(run, data, "--secret-key-file", key, "--noise-multiplier", "1").exit_code == 0  # budget: no cap
    assert key.read_bytes() == content
    assert "key" not in json.loads((run / "status.json").read_text())
    res = cli("train", "--resume", "--out", run, "--steps", "3", "--quiet", "--secret-key-file", key)
    assert res.exit_code == 0, res.output[-800:]
    assert json.loads((run / "status.json").read_text())["step"] == 3
    assert key.read_bytes() == content


def failing_second_step(monkeypatch):
    """slimtune train's second step fails (a full disk); returns the real step function, to put back."""
    from slimtune.train import trainer
    real_step, calls = trainer._train_step, []

    def failing_step(run, step):
        calls.append(step)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_step(run, step)

    monkeypatch.setattr(trainer, "_train_step", failing_step)
    return real_step


def test_a_run_stopped_part_way_keeps_its_key_and_resumes(tmp_path, monkeypatch):
    """Only completion retires the key: a run that failed part-way needs it for its next steps (and its resume)."""
    from slimtune.train import trainer
    real_step = failing_second_step(monkeypatch)
    run, data = tmp_path / "run", data_file(tmp_path)
    assert train(run, data, steps=3).exit_code != 0
    assert (run / "secret.key").is_file()
    monkeypatch.setattr(trainer, "_train_step", real_step)
    res = cli("train", "--resume", "--out", run, "--quiet")
    assert res.exit_code == 0, res.output[-800:]
    assert not (run / "secret.key").exists()  # completed now: retired


def test_retire_key_file_overwrites_the_bytes_before_removing_the_name(tmp_path):
    """Removing the name alone leaves the key's bytes on the disk: they are zeroed first. (Review 86: a file with
    another hard link is only unlinked: the other name is the user's, and its copy of the key stays theirs.)"""
    import stat

    from slimtune.privacy.secret import create_key_file, retire_key_file
    path = tmp_path / "secret.key"
    create_key_file(path)
    fd = os.open(path, os.O_RDONLY)  # the file's bytes, seen after the name is gone
    try:
        size = os.fstat(fd).st_size
        retire_key_file(path)
        assert not path.exists()
        assert os.pread(fd, size, 0) == b"\0" * size
    finally:
        os.close(fd)
    retire_key_file(path)  # a second call (nothing there) is harmless
    create_key_file(path)
    other = tmp_path / "my-copy"
    os.link(path, other)
    content = other.read_bytes()
    retire_key_file(path)
    assert not path.exists() and other.read_bytes() == content  # the user's link keeps the key
    os.symlink(other, path)
    try:
        retire_key_file(path)
    except OSError:
        pass
    else:
        raise AssertionError("a symbolic link was retired")
    assert path.is_symlink() and stat.S_ISREG(other.stat().st_mode) and other.read_bytes() == content


def test_a_key_file_made_with_openssl_is_a_key_file_and_a_wrong_one_says_how_to_make_one(tmp_path):
    """(Review 89) The docs tell a user who wants to extend a run to give their own --secret-key-file; a key written
    the usual way (`openssl rand -hex 32 > my.key`) was refused as 'not a slimtune key file' (only the JSON a run
    writes was read), and the refusal did not say what a key file is."""
    import secrets

    from slimtune.privacy.secret import read_key_file
    key = tmp_path / "my.key"
    key.write_text(secrets.token_hex(32) + "\n")
    key.chmod(0o600)
    run = tmp_path / "run"
    res = train(run, data_file(tmp_path), "--secret-key-file", key, "--noise-multiplier", "1")
    assert res.exit_code == 0, res.output[-800:]
    assert read_key_file(key).generator("x").bytes(4) is not None
    raw = tmp_path / "raw.key"
    raw.write_bytes(secrets.token_bytes(32) + b"\xff")
    raw.chmod(0o600)
    line = one_line_error(train(tmp_path / "run2", data_file(tmp_path), "--secret-key-file", raw, "--dry-run"))
    assert "--secret-key-file" in line and "openssl rand -hex 32" in line, line
