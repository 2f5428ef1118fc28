"""Review 65: resume integrity, attacked as a careless user and as a disk that fails (files changed between the runs,
a damaged or foreign checkpoint, a failed write while resuming, a library upgrade). The promise: a resume is exact or
refused with one line, and nothing the user had is lost. Each test fails on the code it was written against."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from slimtune.cli import app

from conftest import cli, one_line_error  # noqa: E402

runner = CliRunner()  # (one test reads the warnings cli() silences)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
ROWS = (DEMO / "sst2_demo_train.tsv").read_text().splitlines()


def start(run: Path, data: Path, *flags, model="tiny-llama") -> None:
    """A finished 2-step run (checkpoint at step 2) on `data`."""
    res = cli("train", "--data", data, "--model", model, "--steps", "2", "--batch-size", "2", "--eval-every",
              "0", "--save", "last", "--checkpoint-every", "1", "--out", run, "--quiet", "--r", "2", *flags)
    assert res.exit_code == 0, res.output[-800:]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(run, its data file): a plain mezo+lora run, copied by each test that changes something."""
    tmp = tmp_path_factory.mktemp("base")
    data = tmp / "train.tsv"
    data.write_text("\n".join(ROWS[:41]) + "\n")
    start(tmp / "run", data)
    return tmp / "run", data


@pytest.fixture
def run(base, tmp_path):
    """A private copy of the base run and of its data file (config.json names the copy's data file)."""
    source, data = base
    copy, own_data = tmp_path / "run", tmp_path / "train.tsv"
    shutil.copytree(source, copy)
    shutil.copy(data, own_data)
    config = json.loads((copy / "config.json").read_text())
    config.update(out_dir=str(copy), train_data=str(own_data))
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


# -- files changed between the runs ------------------------------------------------------------------------------------
def test_resume_refuses_a_training_file_whose_contents_changed(run):
    """config.json records only the data file's path: the same path with other rows (the file regenerated, edited)
    is trained on silently from the checkpoint on (and a tiny model's fitted vocabulary changes with it)."""
    data = Path(json.loads((run / "config.json").read_text())["train_data"])
    data.write_text("\n".join([ROWS[0], *ROWS[41:81]]) + "\n")
    message = one_line_error(cli("train", "--resume", "--out", run, "--steps", "3", "--quiet"))
    assert "train.tsv" in message, message


def test_resume_refuses_a_model_directory_whose_weights_changed(tmp_path):
    """The same for --model DIR: another checkpoint saved into the same directory is resumed on silently."""
    from slimtune.models import load_model_and_tokenizer
    data = tmp_path / "train.tsv"
    data.write_text("\n".join(ROWS[:41]) + "\n")
    texts = ROWS[1:41]
    model_dir = tmp_path / "base-model"
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("tiny-llama", texts=texts)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    start(tmp_path / "run", data, model=model_dir)
    torch.manual_seed(1)  # another base of the same architecture, saved over the first
    model, tok = load_model_and_tokenizer("tiny-llama", texts=texts)
    with torch.no_grad():  # tiny models are always initialised from seed 0 (models/loading.py tiny_model): change one
        next(model.parameters()).add_(0.01)  # weight, or the file saved is byte for byte the first
    model.save_pretrained(model_dir)
    message = one_line_error(cli("train", "--resume", "--out", tmp_path / "run", "--steps", "3", "--quiet"))
    assert "model" in message, message


def test_resume_refuses_a_private_run_whose_secret_key_was_replaced(tmp_path):
    """RUN/secret.key replaced by another key (restored from the wrong backup, regenerated): batches and noise after
    the checkpoint come from another key, with no refusal: not the trajectory the run would have taken."""
    from slimtune.privacy.secret import create_key_file
    data = tmp_path / "train.tsv"
    data.write_text("\n".join(ROWS[:41]) + "\n")
    run = tmp_path / "run"
    start(run, data, "--optimizer", "dpzero", "--delta", "1e-3")
    # (lead) a completed run retires its key: the run is made one that stopped before completing (its status.json
    # as an interrupted run's), whose key file is then replaced
    status = json.loads((run / "status.json").read_text())
    status.pop("key")
    (run / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    create_key_file(run / "secret.key")
    message = one_line_error(cli("train", "--resume", "--out", run, "--steps", "3", "--quiet"))
    assert "key" in message, message


def test_resume_under_another_torch_version_is_not_silent(run, monkeypatch):
    """The perturbations, batches and dropout come from torch generators, whose streams torch does not promise across
    versions; neither config.json nor the checkpoint records the versions, so a resume after an upgrade continues
    with no word that it may not be the run's trajectory."""
    monkeypatch.setattr(torch, "__version__", "99.0.0")
    res = runner.invoke(app, ["train", "--resume", "--out", str(run), "--steps", "3", "--quiet"])
    assert res.exit_code == 2 or "99.0.0" in res.stderr, res.stderr


# -- a damaged or foreign checkpoint -----------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "half-written weights": lambda c: _truncate(c / "trainable.safetensors"),
    "half-written optimizer state": lambda c: _truncate(c / "optimizer.pt"),
    "no optimizer state": lambda c: (c / "optimizer.pt").unlink(),
    "trainer state without a step": lambda c: (c / "trainer_state.json").write_text("{}"),
    "trainer state not an object": lambda c: (c / "trainer_state.json").write_text("[]"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_in_one_line(run, damage):
    """A checkpoint whose files a failing disk (or a copy) damaged: 'internal error (SafetensorError ...)', exit 1,
    asking the user to report a bug, instead of one line naming the damaged file (exit 2)."""
    DAMAGE[damage](run / "checkpoint")
    message = one_line_error(cli("train", "--resume", "--out", run, "--steps", "3", "--quiet"))
    assert "checkpoint" in message and "internal error" not in message, message


def test_a_checkpoint_missing_a_trainable_weight_is_refused(run):
    """load_checkpoint only refuses weights the model does not have; a weight the checkpoint lacks keeps its fresh
    initialisation and the run resumes silently from a model it never had."""
    path = run / "checkpoint" / "trainable.safetensors"
    weights = load_file(str(path))
    del weights[sorted(weights)[0]]
    save_file(weights, str(path))
    message = one_line_error(cli("train", "--resume", "--out", run, "--steps", "3", "--quiet"))
    assert "checkpoint" in message, message


def test_a_checkpoint_weight_of_another_shape_is_refused(run):
    """A weight of shape (1, d) where the model has (2, d) (another --r's LoRA A, cut down) is broadcast by copy_ into
    every row: resumed silently."""
    path = run / "checkpoint" / "trainable.safetensors"
    weights = load_file(str(path))
    name = next(n for n in sorted(weights) if "lora_A" in n)
    weights[name] = weights[name][:1].clone()
    save_file(weights, str(path))
    message = one_line_error(cli("train", "--resume", "--out", run, "--steps", "3", "--quiet"))
    assert "checkpoint" in message, message


def test_a_checkpoint_of_another_run_copied_in_is_refused(run, tmp_path):
    """checkpoint/ copied from another run (here: another --seed, same shapes) into a run directory: nothing ties a
    checkpoint to its run, so the resume mixes two runs silently."""
    other = tmp_path / "other"
    start(other, Path(json.loads((run / "config.json").read_text())["train_data"]), "--seed", "7")
    shutil.rmtree(run / "checkpoint")
    shutil.copytree(other / "checkpoint", run / "checkpoint")
    message = one_line_error(cli("train", "--resume", "--out", run, "--steps", "3", "--quiet"))
    assert "checkpoint" in message, message


# -- a disk that fails -------------------------------------------------------------------------------------------------
def test_a_checkpoint_is_flushed_to_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    """save_checkpoint writes, renames over the previous checkpoint and deletes it, with no fsync: after a power loss
    the renamed checkpoint can hold empty files, and the good previous one is already gone."""
    from slimtune.train.checkpoint import save_checkpoint
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "checkpoint", model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 1})
    save_checkpoint(tmp_path / "checkpoint", model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 2})
    assert len(synced) >= 2 * 3, f"{len(synced)} fsync calls for two checkpoints of three files"


def _fail_writing(monkeypatch, name: str) -> None:
    """Path.write_text on `name` as on a full disk: the file is opened (truncated), then the write fails."""
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == name:
            open(self, "w").close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_full_disk_while_resuming_does_not_lose_the_metrics_log(run, monkeypatch):
    """On resume MetricsLog.truncate_after rewrites metrics.jsonl in place: a write that fails (full disk, kill)
    leaves it empty, and the run's logged history (its steps' losses) is gone."""
    before = (run / "metrics.jsonl").read_text()
    assert before.strip()
    _fail_writing(monkeypatch, "metrics.jsonl")
    res = cli("train", "--resume", "--out", run, "--steps", "3", "--quiet")
    assert res.exit_code != 0
    assert (run / "metrics.jsonl").read_text() == before


def test_a_full_disk_while_resuming_leaves_a_resumable_run(run, monkeypatch):
    """On resume _write_config rewrites config.json in place: a write that fails leaves it empty, and the run can
    never be resumed again ('config.json: not valid JSON')."""
    _fail_writing(monkeypatch, "config.json")
    res = cli("train", "--resume", "--out", run, "--steps", "3", "--quiet")
    assert res.exit_code != 0
    monkeypatch.undo()
    res = cli("train", "--resume", "--out", run, "--steps", "3", "--quiet")
    assert res.exit_code == 0, res.stderr[-500:]
