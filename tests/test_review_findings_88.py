"""Review 88 (adversarial, on 565f5be, f267653, 40d165d, c684032): run files still read without run_dir.read_record,
outputs a run's next save deletes or overwrites that check_not_in_a_run lets through, the --num-beams bound bypassed
by a recorded value, the private ZOTrainer's row check missing labels, and the server settings file's writability
check bypassed through its directory.

Each test failed on the code it was written against (see the docstrings for what happened)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEMO, cli, one_line_error
from test_review_findings_84 import copy_run, finished_run  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-llama"]
TRAIN, DEV = DEMO / "sst2_demo_train.tsv", DEMO / "sst2_demo_dev.tsv"
E2E_TRAIN, E2E_DEV = DEMO / "e2e_demo_train.csv", DEMO / "e2e_demo_dev.csv"


def private_trainer(out: Path, model, rows, collator):
    """A 3-step DPZero ZOTrainer (batch 4, seed 7) on `rows`."""
    from transformers import TrainingArguments

    from slimtune.hf import ZOArguments, ZOTrainer
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, report_to=[], logging_steps=1,
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=7, max_steps=3)
    return ZOTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                     zo_args=ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2))


def assert_report_refused_or_kept(source: Path, run: Path, rep: Path) -> None:
    """`report SOURCE --out REP` is refused in one line naming --out, or REP survives RUN's next `train --resume`."""
    assert_out_refused_or_kept(cli("report", source, "--out", rep), run, rep / "report.md")


def assert_out_refused_or_kept(res, run: Path, kept: Path) -> None:
    """A command writing into RUN (its result `res`) is refused in one line naming --out, or what it wrote (`kept`)
    survives RUN's next `train --resume`."""
    if res.exit_code == 2:
        assert "--out" in one_line_error(res)
        return
    assert res.exit_code == 0 and kept.is_file(), res.output
    res = cli("train", "--resume", "--out", run, "--steps", 6, "--quiet")
    assert res.exit_code == 0, res.output
    assert kept.is_file(), f"{kept} was deleted by RUN's resume"


def generated_into(run: Path, out: Path) -> str | None:
    """`generate --adapter RUN/adapter --output OUT`: None when refused in one line naming --output, else the text
    it wrote."""
    res = cli("generate", "--adapter", run / "adapter", "--prompt", "great movie", "--max-new-tokens", 2,
              "--output", out)
    if res.exit_code == 2:
        assert "--output" in one_line_error(res)
        return None
    assert res.exit_code == 0 and out.is_file(), res.output
    return out.read_text()


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory):
    """A completed 2-step AdamW + LoRA generation run on tiny-llama (its adapter records max_new_tokens, num_beams)."""
    run = tmp_path_factory.mktemp("r88g") / "gen"
    res = cli("train", "--task", "generation", "--data", E2E_TRAIN, "--eval-data", E2E_DEV, "--input-column", "mr",
              "--target-column", "ref", *TINY, "--optimizer", "adamw", "--peft", "lora", "--steps", 2,
              "--batch-size", 4, "--eval-every", 0, "--max-new-tokens", 2, "--out", run, "--quiet")
    assert res.exit_code == 0, res.output
    return run


def slimtune_in_child(*args, timeout: int = 60) -> subprocess.CompletedProcess | None:
    """`python -m slimtune.cli ARGS` in a child process; None if it was still running after `timeout` s (a hang)."""
    env = {**os.environ, "SLIMTUNE_DEBUG": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run([sys.executable, "-m", "slimtune.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return None


# -- 1. an adapter's slimtune.json / adapter_config.json is read with read_text: a directory or a pipe there ---------
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_adapter_whose_slimtune_json_is_a_directory_is_one_line_naming_it(tmp_path, finished_run, command):
    """565f5be made a run's record files one line when a directory, pipe or device stands in their place; the
    adapter's own record, RUN/adapter/slimtune.json, is still read by peft.registry.read_adapter_meta with
    path.read_text(), catching only ValueError/UnicodeDecodeError: `slimtune generate|eval --adapter RUN/adapter` with
    a directory there ended in 'error: internal error (IsADirectoryError: ...); please report it', exit code 1."""
    run = copy_run(finished_run, tmp_path / "run")
    meta = run / "adapter" / "slimtune.json"
    meta.unlink()
    meta.mkdir()
    if command == "generate":
        res = cli("generate", "--adapter", run / "adapter", "--prompt", "great movie", "--max-new-tokens", 2)
    else:
        res = cli("eval", "--adapter", run / "adapter", "--data", DEV)
    message = one_line_error(res)
    assert "slimtune.json" in message, message


@pytest.mark.parametrize("name", ["slimtune.json", "adapter_config.json"])
def test_generate_does_not_hang_on_an_adapter_file_that_is_a_named_pipe(tmp_path, finished_run, name):
    """A named pipe in place of RUN/adapter/slimtune.json (read_adapter_meta) or RUN/adapter/adapter_config.json
    (read_lora_config): `slimtune generate --adapter RUN/adapter` waited forever for a writer (both read with
    path.read_text(); the run's other records go through read_record, which opens without blocking). It should be one
    line naming the file. (A child process: a hang would stall the suite; the limit only guards against it.)"""
    run = copy_run(finished_run, tmp_path / "run")
    path = run / "adapter" / name
    path.unlink()
    os.mkfifo(path)
    res = slimtune_in_child("generate", "--adapter", run / "adapter", "--prompt", "great movie",
                            "--max-new-tokens", 2)
    assert res is not None, f"`slimtune generate` still waiting on the named pipe {name} after 60 s"
    assert res.returncode == 2, (res.returncode, res.stderr[-500:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], res.stderr


# -- 2. outputs inside a directory another run's next save deletes -----------------------------------------------------
def test_train_out_inside_another_runs_checkpoint_is_refused_or_survives_its_resume(tmp_path, finished_run):
    """check_not_in_a_run guards generate/eval/report/merge/export outputs (check_output_file, check_new_directory),
    but `slimtune train --out` never calls it: `train --out RUN/checkpoint/inner` trained and wrote a whole run there,
    and RUN's next `train --resume` (save_checkpoint swaps a new checkpoint/ in and rmtree's the old one) deleted it
    without a word."""
    run = copy_run(finished_run, tmp_path / "run")
    inner = run / "checkpoint" / "inner"
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "adamw", "--peft", "lora", "--steps", 1,
              "--batch-size", 8, "--out", inner, "--quiet")
    assert_out_refused_or_kept(res, run, inner / "summary.json")


def test_federate_out_inside_a_runs_checkpoint_is_refused_before_any_work(tmp_path, finished_run, monkeypatch):
    """`slimtune federate --out RUN/checkpoint/fed`: federated.config.check_output only asks for a new or empty
    directory (no check_not_in_a_run), so the simulation started (here: Flower's run_simulation was reached) and its
    adapter and records would be written where RUN's next `train --resume` deletes them."""
    import flwr.simulation
    run = copy_run(finished_run, tmp_path / "run")
    started = []
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda *a, **k: started.append(True))
    res = cli("federate", "--data", TRAIN, *TINY, "--out", run / "checkpoint" / "fed")
    assert not started, "the federated simulation started with its --out inside RUN/checkpoint"
    assert "--out" in one_line_error(res) or "checkpoint" in one_line_error(res)


def test_an_output_named_checkpoint_tmp_in_a_run_is_refused_or_survives_its_resume(tmp_path, finished_run):
    """save_checkpoint builds the new checkpoint in RUN/checkpoint.tmp, which it first rmtree's (ignore_errors): a
    fixed name that REPLACED_WHOLE (checkpoint, checkpoint.old, adapter, pissa_init) does not list. `report RUN --out
    RUN/checkpoint.tmp` was accepted and the next `train --resume` deleted the report without a word."""
    run = copy_run(finished_run, tmp_path / "run")
    assert_report_refused_or_kept(finished_run, run, run / "checkpoint.tmp")


def test_a_generate_output_file_named_checkpoint_tmp_does_not_fail_the_runs_resume(tmp_path, finished_run):
    """`generate --adapter RUN/adapter --output RUN/checkpoint.tmp` was accepted; RUN's next `train --resume` trained
    its steps, then failed at the save ('RUN/checkpoint.tmp: File exists (EEXIST); the run stopped'): rmtree with
    ignore_errors does not remove a file, and mkdir then fails. The output should be refused in one line, or the run
    should resume (and keep the user's file)."""
    run = copy_run(finished_run, tmp_path / "run")
    out = run / "checkpoint.tmp"
    written = generated_into(run, out)
    if written is None:
        return  # refused in one line naming --output
    res = cli("train", "--resume", "--out", run, "--steps", 6, "--quiet")
    assert res.exit_code == 0, res.output[-600:]
    assert out.is_file() and out.read_text() == written


def test_an_output_inside_the_checkpoint_of_a_run_without_status_json_is_refused_or_survives(tmp_path,
                                                                                           finished_run):
    """check_not_in_a_run recognises a run by its status.json only. A run directory without one (status.json lost,
    or a run copied without it) still resumes (`train --resume` rewrites it), so `report X --out RUN/checkpoint/rep`
    was accepted and deleted by that resume without a word. The run's other records (config.json,
    checkpoint/trainer_state.json) say as well that RUN is a run."""
    run = copy_run(finished_run, tmp_path / "run")
    (run / "status.json").unlink()
    assert_report_refused_or_kept(finished_run, run, run / "checkpoint" / "report")


def test_a_generate_output_named_like_a_record_of_an_interrupted_run_is_not_overwritten_by_its_resume(
        tmp_path, finished_run):
    """An interrupted run has no summary.json yet. `generate --adapter RUN/adapter --output RUN/summary.json` was
    accepted (check_output_file: a new file, not inside checkpoint/ or adapter/); the run's `train --resume` then
    replaced the user's completions with its summary, without a word (nothing the user had is overwritten)."""
    run = copy_run(finished_run, tmp_path / "run")
    (run / "summary.json").unlink()
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    out = run / "summary.json"
    written = generated_into(run, out)
    if written is None:
        return  # refused in one line naming --output
    res = cli("train", "--resume", "--out", run, "--steps", 6, "--quiet")
    if res.exit_code == 2:  # the resume refuses to overwrite the user's file: acceptable
        one_line_error(res)
        assert out.read_text() == written
        return
    assert out.read_text() == written, "the user's completions in RUN/summary.json were overwritten by the resume"


# -- 3. --num-beams at most 64: not for the value an adapter records --------------------------------------------------
def test_a_recorded_num_beams_beyond_the_bound_is_refused_before_any_work(tmp_path, generation_run):
    """565f5be bounds --num-beams by MAX_NUM_BEAMS (64) because 10**8 loaded the model and tried to allocate
    gigabytes. `slimtune eval --adapter A` without --num-beams adopts the value A's slimtune.json records
    (adopt_recorded_scoring, after the range checks ran); read_adapter_meta checks it only to be >= 1. A recorded
    100000000 loaded the model and failed with 'internal error (RuntimeError: ... you tried to allocate 177600000000
    bytes)'; a recorded 65 runs a beam search the flag refuses. Either is one line naming the file before any work."""
    run = copy_run(generation_run, tmp_path / "gen")
    meta_path = run / "adapter" / "slimtune.json"
    meta = json.loads(meta_path.read_text())
    meta["num_beams"] = 65
    meta_path.write_text(json.dumps(meta))
    res = cli("eval", "--adapter", run / "adapter", "--data", E2E_DEV)
    message = one_line_error(res)
    assert "num_beams" in message or "num-beams" in message, message


# -- 4. the private ZOTrainer's row check: a label the loss refuses ----------------------------------------------------
datasets = pytest.importorskip("datasets")


def _classifier(tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, num_labels=2)
    return LlamaForSequenceClassification(config)


@pytest.mark.parametrize("bad", [-1, 2])
def test_a_training_label_the_loss_refuses_is_refused_before_any_step_not_at_the_step_that_drew_it(
        tmp_path, hf_offline, monkeypatch, bad):
    """40d165d's _check_fits_the_model refuses input ids past the embedding and rows past the positions before the
    first step, but not labels: a sequence classifier's row labelled -1 (how GLUE's test splits mark unlabelled
    rows) or 2 (of num_labels 2) collates, and fails only in the cross-entropy of the secret step whose Poisson batch
    drew it ('refused' after 2 released steps): whether and when the run fails is a function of that row and the
    secret batches."""
    import slimtune.data as data
    from transformers import DataCollatorWithPadding

    from test_review_findings_85 import TRAIN_ROWS, _FixedBatches, assert_refused_before_any_step, trained_or_refused

    from slimtune.models.loading import tiny_tokenizer
    monkeypatch.setattr(data, "PoissonSampler", _FixedBatches)  # row 3 is drawn at step 3 only
    outcome = []
    for canary in (False, True):
        labels = [i % 2 for i in range(len(TRAIN_ROWS))]
        if canary:
            labels[3] = bad
        tok = tiny_tokenizer(TRAIN_ROWS)
        rows = datasets.Dataset.from_dict({"text": TRAIN_ROWS, "label": labels})
        rows = rows.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
        trainer = private_trainer(tmp_path / str(canary), _classifier(tok), rows, DataCollatorWithPadding(tok))
        outcome.append(trained_or_refused(trainer))
    assert_refused_before_any_step(outcome)


# -- 5. the server settings file: writable by others through its directory ---------------------------------------------
def test_a_server_settings_file_in_a_directory_every_user_may_write_is_refused(tmp_path):
    """c684032 refuses a server settings file with the S_IWOTH bit (its docstring: 'a careless chmod, a shared
    $FLWR_HOME'). In a directory every user may write (a shared $FLWR_HOME, mode 0777, no sticky bit) any of them can
    replace the 0644 file, or, where there is none, create $FLWR_HOME/slimtune-server.toml, which the server then reads
    (settings_path: the default if present): allowed-nodes and client-level DP are theirs to set. Only the file's own
    mode bits were checked."""
    from slimtune import SlimtuneError
    from slimtune.federated.config import FederatedConfig
    shared = every_users_directory(tmp_path / "flwr-home")
    settings = shared / "slimtune-server.toml"
    settings.write_text('allowed-nodes = "11,12,13,14"\nclient-dp-clip = 0.0\n')
    os.chmod(settings, 0o644)
    with pytest.raises(SlimtuneError, match="slimtune-server.toml|flwr-home"):
        FederatedConfig.from_flower({}, settings)


def every_users_directory(path: Path) -> Path:
    """A new directory every user may write (mode 0777, no sticky bit): a shared $FLWR_HOME."""
    path.mkdir()
    os.chmod(path, 0o777)
    return path


def test_a_server_settings_path_that_is_a_symbolic_link_in_a_shared_directory_is_refused(tmp_path):
    """The same through a symbolic link: check_not_writable_by_others stats the link's target (path.stat()), so a
    link any user could place (or re-point) in a shared directory to a 0644 file of theirs is read silently."""
    from slimtune import SlimtuneError
    from slimtune.federated.config import FederatedConfig
    shared = every_users_directory(tmp_path / "flwr-home")
    theirs = tmp_path / "elsewhere.toml"
    theirs.write_text('allowed-nodes = "11,12,13,14"\n')
    os.chmod(theirs, 0o644)
    os.symlink(theirs, shared / "slimtune-server.toml")
    with pytest.raises(SlimtuneError):
        FederatedConfig.from_flower({}, shared / "slimtune-server.toml")
