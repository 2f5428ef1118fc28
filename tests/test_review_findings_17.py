"""Seventeenth review round: a careless user against `plan`, `export`, `report` and `eval` (generate shares eval's
loader).

Each test fails on the code it was written against; nothing here trains (adapters are built and saved directly, runs
are faked as `slimtune report` and `export` read them)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from slimtune import SlimtuneError
from test_bad_input_table import assert_one_line, cli  # the CLI runner and the one-line error check
from test_review_findings_10 import fake_run, saved_adapter

TINY = ["--model", "tiny-llama"]


def refuse_model_loading(monkeypatch):
    """Loading any model is 'work': a check that should have come first shows up as this error instead."""
    import slimtune.models

    def refuse(*args, **kwargs):
        raise SlimtuneError("LOADED A MODEL")

    monkeypatch.setattr(slimtune.models, "load_model_and_tokenizer", refuse)


# -- plan -----------------------------------------------------------------------------------------------------------
def test_plan_refuses_a_max_length_beyond_the_models_positions():
    """tiny-gpt2 has 256 learned positions (n_positions): `plan --max-length 100000` printed a table of peaks for a
    run that cannot take a single step (its position embedding is indexed out of range), exit 0."""
    res = cli("plan", "--model", "tiny-gpt2", "--batch-size", "1", "--max-length", "100000")
    assert_one_line(res, "--max-length")


def test_plan_does_not_say_pissa_fits_at_a_rank_train_refuses():
    """PiSSA takes r singular vectors of each adapted weight (train refuses --peft pissa --r 1000 on tiny-llama, whose
    layers are 32 wide: registry.check_rank_fits); `plan --r 1000` listed every pissa row with 'fits: yes'."""
    res = cli("plan", *TINY, "--batch-size", "1", "--max-length", "16", "--r", "1000")
    assert res.exit_code in (0, 2), res.output
    if res.exit_code == 2:
        assert_one_line(res, "--r")
    rows = [line for line in res.stdout.splitlines() if "pissa" in line]
    assert not any("yes" in line for line in rows), rows


@pytest.mark.parametrize("config, why", [
    ({"model_type": "t5"}, "an encoder-decoder: no causal LM"),
    ({"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4}, "heads do not divide the hidden size"),
])
def test_plan_on_a_config_it_cannot_build_is_one_line(tmp_path, config, why):
    """model_for_planning wrapped only AutoConfig.from_pretrained: a config transformers reads but cannot build as a
    causal LM (a T5 config.json, an inconsistent llama one) ended in 'internal error (ValueError: Unrecognized
    configuration class ...)' / '(StrictDataclassClassValidationError ...)' with exit code 1."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    res = cli("plan", "--model", path, "--batch-size", "1", "--max-length", "8")
    assert_one_line(res, "--model")


# -- eval ------------------------------------------------------------------------------------------------------------
def test_eval_refuses_a_max_length_beyond_the_models_positions(tmp_path):
    """`eval --model tiny-gpt2 --max-length 1000` on a data file with a 600-word row loaded the model, tokenized, and
    ended in 'internal error (IndexError: index out of range in self)' with exit code 1 (generate --max-length does the
    same with a long --prompt)."""
    words = "the script is smart and the jokes land this film at its worst".split()
    rng = random.Random(0)
    data = tmp_path / "long.tsv"
    data.write_text("sentence\tlabel\n" + " ".join(rng.choice(words) for _ in range(600)) + "\t1\na fine film\t0\n")
    res = cli("eval", "--model", "tiny-gpt2", "--data", data, "--max-length", "1000", "--device", "cpu")
    assert_one_line(res, "--max-length")


# -- export ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["running", "failed"])
def test_export_of_a_run_that_is_still_training_or_failed_is_not_silent(tmp_path, monkeypatch, state):
    """With --save best (the default) adapter/ is rewritten at every better evaluation: RUN/adapter exists while RUN is
    still training (and after it failed). `export RUN/adapter` went straight to loading the base, with no word that
    the run is unfinished (report marks such runs; export, whose file outlives the run, did not look)."""
    import fcntl
    import os

    run = tmp_path / "run"
    saved_adapter(run / "adapter", "lora")
    (run / "status.json").write_text(json.dumps({"state": state, "pid": os.getpid(), "step": 3}))
    refuse_model_loading(monkeypatch)
    fd = os.open(run / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        if state == "running":  # held as RunDirectory.acquire holds it while the run trains
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = cli("export", run / "adapter", *TINY, "--out", tmp_path / "model.gguf")
    finally:
        os.close(fd)
    assert res.exit_code == 2, res.output
    if state == "running":
        assert_one_line(res, "running")
    assert state in res.output, res.output
    assert not (tmp_path / "model.gguf").exists()


def test_a_gguf_exported_into_the_runs_adapter_directory_survives_the_next_adapter_save(tmp_path, monkeypatch):
    """`export RUN/adapter --out RUN/adapter/model.gguf` was accepted; the next save of adapter/ (train --resume, or the
    next better evaluation of a run still training) swaps a fresh directory in and rmtree's the old one, deleting the
    user's model.gguf (reproduced with a real resume: the file is gone). Either export refuses that --out, or the
    adapter writer keeps files that are not its own."""
    adapter = saved_adapter(tmp_path / "run" / "adapter", "lora")
    out = adapter / "model.gguf"
    refuse_model_loading(monkeypatch)
    res = cli("export", adapter, *TINY, "--out", out)
    if res.exit_code == 2 and "LOADED A MODEL" not in res.output:
        assert_one_line(res, "--out")  # refused before the work: fine
        return
    monkeypatch.undo()
    out.write_bytes(b"GGUF user's exported model")  # what the export writes there
    saved_adapter(adapter, "lora")  # the next save of the run's adapter
    assert out.exists() and out.read_bytes() == b"GGUF user's exported model"


# -- report -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file, content", [
    ("status.json", b"null"),  # a damaged status: valid JSON, not an object
    ("status.json", b"[]"),
    ("summary.json", b"\xff\xfe{\"method\": \"mezo\"}"),  # not UTF-8
])
def test_report_of_a_damaged_run_file_is_one_line_naming_it(tmp_path, file, content):
    """read_status returned whatever JSON status.json held and load_runs called .get on it: 'internal error
    (AttributeError: 'NoneType' object has no attribute 'get')', exit 1; a summary.json that is not UTF-8 gave
    'internal error (UnicodeDecodeError ...)' (only JSONDecodeError was caught)."""
    run = fake_run(tmp_path / "run")
    (run / file).write_bytes(content)
    out = tmp_path / "report"
    res = cli("report", run, "--out", out)
    assert_one_line(res, file)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("dirname, summary, shown", [
    ("sweep[lr=3e-4]", None, "sweep[lr=3e-4]"),  # a sweep's run names: shown as 'sweep', all alike
    ("run", {"method": "[/b]"}, "[/b]"),  # a damaged field: MarkupError after the report was written
])
def test_report_prints_run_names_and_fields_as_they_are(tmp_path, dirname, summary, shown):
    """print_summary passed run names and summary strings to rich as markup: a run directory `sweep[lr=3e-4]` was
    printed as `sweep` (its bracket part read as a style), and a '[/b]' in a field ended in 'internal error
    (MarkupError ...)' with exit 1, after the report directory had been written."""
    run = fake_run(tmp_path / dirname, summary)
    res = cli("report", run, "--out", tmp_path / "report")
    assert res.exit_code == 0, res.output
    assert shown in res.stdout, res.stdout


def test_a_failed_adapter_save_keeps_the_users_files_in_adapter(tmp_path, monkeypatch):
    """The carry-over moves the user's files into the new adapter's temporary directory; a save that fails after that
    (the final swap) must put them back, not remove them with the temporary."""
    import os

    adapter = saved_adapter(tmp_path / "run" / "adapter", "lora")
    mine = adapter / "model.gguf"
    mine.write_bytes(b"GGUF user's exported model")
    real = os.replace

    def failing(src, dst):
        if os.fspath(dst) == os.path.abspath(adapter) and os.fspath(src).endswith(".partial"):  # the final swap
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        saved_adapter(adapter, "lora")
    monkeypatch.undo()
    assert mine.exists() and mine.read_bytes() == b"GGUF user's exported model"
