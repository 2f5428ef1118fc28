"""Twelfth review round: a careless user against what earlier rounds left alone: an --out that already holds the
user's own folders, resumes that shorten a run or come from Python with a settings file, an impossible privacy
budget, PiSSA ranks above the layers' sizes, a failure in the last save, `--restart --out .`, config files with
an unfilled value, tables with huge or doubled fields, and the Python API's empty target_modules.

Each test fails on the code it was written against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import slimtune
from slimtune import SlimtuneError

from test_review_findings_9 import TINY, TRAIN, cli, one_line_error  # one CLI runner for the review tests

# TINY without its --steps and --r (the runs below choose their own)
FEW = ["--model", "tiny-llama", "--batch-size", "4", "--quiet", "--eval-every", "0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step mezo run to resume from."""
    out = tmp_path_factory.mktemp("runs12") / "mezo"
    res = cli("train", "--data", TRAIN, *TINY, "--out", out)
    assert res.exit_code == 0, res.output
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


# -- nothing the user had is overwritten ------------------------------------------------------------------------------
def test_training_into_a_users_directory_never_replaces_their_adapter_folder(tmp_path):
    """_claim counts a directory as a run only if it holds checkpoint/, config.json, summary.json or metrics.jsonl;
    any other non-empty directory is trained into. A project folder with its own `adapter/` (or `checkpoint.old/`)
    given as --out: the run's write_adapter replaces OUT/adapter whole (the user's files in it are gone) and the
    checkpoint rotation deletes OUT/checkpoint.old. Exit 0, no word."""
    out = tmp_path / "project"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "mine.txt").write_text("my adapter notes")
    (out / "checkpoint.old").mkdir()
    (out / "checkpoint.old" / "keep.txt").write_text("keep me")
    cli("train", "--data", TRAIN, *TINY, "--out", out)
    assert (out / "adapter" / "mine.txt").is_file(), sorted(p.name for p in (out / "adapter").iterdir())
    assert (out / "checkpoint.old" / "keep.txt").is_file()


# -- resume -------------------------------------------------------------------------------------------------------------
def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(finished, tmp_path):
    """`--resume --steps 1` on a run checkpointed at step 2 trains nothing, prints 'run written', exits 0, and rewrites
    config.json with steps 1 (resumed: steps [2, 1]) while the adapter holds 2 steps: `--config RUN/config.json`
    then reproduces another run than the one recorded."""
    out = copy_of(finished, tmp_path)
    message = one_line_error(cli("train", "--resume", "--out", out, "--steps", "1", "--quiet"))
    assert "--steps" in message
    assert json.loads((out / "config.json").read_text())["steps"] == 2


def test_python_train_resume_with_a_config_file_starts_from_the_runs_settings(finished, tmp_path):
    """`slimtune train --resume --out RUN --config more.yaml` takes RUN's config.json as the base (commands/train.py
    resumed_settings); slimtune.train(config=..., resume=True, out=RUN) loads the stored settings only when config is
    None, so the same call fails: '--data is required' (or, with data in the file, every non-default the run used,
    e.g. batch_size 4 -> 16, is refused as a difference)."""
    out = copy_of(finished, tmp_path)
    more = tmp_path / "more.yaml"
    more.write_text("steps: 3\nquiet: true\n")
    summary = slimtune.train(config=more, resume=True, out=str(out))
    assert summary["steps"] == 3


def test_restart_with_out_dot_is_not_an_internal_error(finished, tmp_path, monkeypatch):
    """From inside an interrupted run's directory, `--out . --restart`: RunDirectory.move_aside calls
    Path('.').with_name(...) -> 'internal error (ValueError: PosixPath('.') has an empty name)', exit 1, after the
    model and data were loaded."""
    out = copy_of(finished, tmp_path)
    status = json.loads((out / "status.json").read_text())
    (out / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    (out / "summary.json").unlink()
    monkeypatch.chdir(out)
    res = cli("train", "--data", TRAIN, *TINY, "--out", ".", "--restart")
    assert "internal error" not in res.output, res.output
    assert res.exit_code in (0, 2), res.output
    if res.exit_code == 2:
        one_line_error(res)


# -- privacy: bad input found after the directory is made ---------------------------------------------------------------
def test_an_impossible_privacy_budget_is_refused_before_the_run_directory_exists(tmp_path):
    """--epsilon 0.001 over 2,000 steps cannot be met (noise multiplier > 1e4). The refusal comes from accountant.plan
    in _private_setup, after _claim made OUT and create_key_file wrote OUT/secret.key: the corrected command into the
    same --out is then refused ('OUT/secret.key: a key file is already there'), and so is --restart (OUT holds no
    checkpoint or config.json, so it is not a run to move aside): the user must delete files by hand."""
    out = tmp_path / "out"
    message = one_line_error(cli("train", "--data", TRAIN, *FEW, "--optimizer", "dpzero", "--steps", "2000",
                                 "--epsilon", "0.001", "--out", out))
    assert "epsilon" in message
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    again = cli("train", "--data", TRAIN, *FEW, "--optimizer", "dpzero", "--steps", "2", "--epsilon", "1",
                "--out", out)
    assert again.exit_code == 0, again.output


def test_a_private_batch_size_above_the_training_rows_is_refused(tmp_path):
    """check_data refuses --batch-size above the number of rows for shuffle sampling only. dpzero (Poisson) with
    --batch-size 1000 on 72 rows: the sampler and accountant clamp q = B/N to 1, every step trains all 72 rows and the
    released sum is divided by 1000: the asked batch is silently another one (summary.json says batch_size 1000)."""
    out = tmp_path / "out"
    message = one_line_error(cli("train", "--data", TRAIN, "--model", "tiny-llama", "--quiet", "--eval-every", "0",
                                 "--steps", "2", "--optimizer", "dpzero", "--batch-size", "1000", "--out", out))
    assert "--batch-size" in message
    assert not out.exists()


# -- PEFT -----------------------------------------------------------------------------------------------------------------
def test_pissa_rank_above_the_layers_sizes_is_refused_before_training(tmp_path):
    """tiny-llama's targeted layers are 32x32 and 16x32. `--peft pissa --r 1000` trains every step, then peft's
    PiSSA-to-LoRA conversion in write_adapter fails: 'internal error (RuntimeError: Error(s) in loading state_dict
    ... size mismatch ...)', exit 1, and status.json still says 'running' for a dead pid."""
    out = tmp_path / "out"
    res = cli("train", "--data", TRAIN, *FEW, "--steps", "1", "--peft", "pissa", "--r", "1000", "--out", out)
    assert "internal error" not in res.output, res.output
    message = one_line_error(res)
    assert "--r" in message
    assert not out.exists()


def test_a_failure_while_saving_the_final_adapter_marks_the_run_failed(tmp_path, monkeypatch):
    """trainer.train marks the run failed only for errors inside the step loop; an error in the final _save_adapter
    or write_summary (a full disk, the PiSSA conversion above) leaves status.json at 'running' with the dead pid, so
    `report` and a later `--out` see a run that is still training."""
    import slimtune.train.trainer as trainer

    def disk_full(run):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "_save_adapter", disk_full)
    out = tmp_path / "out"
    cli("train", "--data", TRAIN, *TINY, "--out", out)
    assert json.loads((out / "status.json").read_text())["state"] == "failed"


def test_apply_peft_refuses_an_empty_target_modules_like_the_cli(tmp_path):
    """`--target-modules ""` is refused ('empty (an unset variable?)'); slimtune.apply_peft(model, "lora",
    target_modules=[]) or target_modules="" silently adapts the default layers (q_proj, v_proj) instead."""
    from slimtune.models import load_model_and_tokenizer

    for empty in ([], ""):
        model, _ = load_model_and_tokenizer("tiny-llama")
        with pytest.raises(SlimtuneError, match="target_modules"):
            slimtune.apply_peft(model, "lora", r=2, target_modules=empty)


# -- config files -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["out", "optimizer"])
def test_an_unfilled_value_in_a_yaml_config_is_refused_not_the_default(tmp_path, key):
    """`out: ${RUN}` rendered with RUN unset is `out:`, YAML null; file_values skips nulls of non-optional settings
    ('not set'), so the run goes to runs/latest (or trains mezo for `optimizer:`), where `--out ""` is refused as 'empty
    (an unset variable?)'. Whatever a flag refuses a config file must refuse too."""
    config = tmp_path / "run.yaml"
    config.write_text(f"{key}:\n")
    message = one_line_error(cli("train", "--data", TRAIN, *TINY, "--dry-run", "--config", config))
    assert "run.yaml" in message and key in message


# -- data files -------------------------------------------------------------------------------------------------------------
def test_a_table_with_a_field_over_the_csv_modules_limit_is_read_or_named(tmp_path):
    """A row whose text exceeds csv's field_size_limit (131,072 characters: one long document) ends every command in
    'internal error (Error: field larger than field limit (131072))', exit 1, with no file or line."""
    from slimtune.data import get_task, read_examples

    for suffix, sep in ((".tsv", "\t"), (".csv", ",")):
        path = tmp_path / f"long{suffix}"
        path.write_text(f"sentence{sep}label\n{'a' * 200_000}{sep}1\nbad film{sep}0\n")
        try:
            examples = read_examples(str(path), get_task("sst2"))
        except SlimtuneError as exc:
            assert f"{path}:2" in str(exc)
        else:
            assert len(examples) == 2


def test_a_classification_text_that_is_not_text_is_refused(tmp_path):
    """Generation rows refuse a field that is not a string (generation/data._text); Task.prompt takes str(value): a
    JSONL `"sentence": ["bad"]` trains on the prompt "['bad'] It was", `{"a": 1}` on "{'a': 1} It was"."""
    from slimtune.data import get_task, read_examples

    path = tmp_path / "rows.jsonl"
    path.write_text('{"sentence": "good", "label": 1}\n{"sentence": ["bad"], "label": 0}\n')
    with pytest.raises(SlimtuneError, match=f"{path}:2"):
        read_examples(str(path), get_task("sst2"))


@pytest.mark.parametrize("name, text, line", [
    ("twice.tsv", "sentence\tlabel\tlabel\ngood\t1\t0\nbad\t0\t1\n", 1),
    ("twice.jsonl", '{"sentence": "good", "label": 1, "label": 0}\n{"sentence": "bad", "label": 0}\n', 1)])
def test_a_column_named_twice_is_refused_not_its_last_value(tmp_path, name, text, line):
    """csv.DictReader and json.loads keep the last of two equal names without a word: a header `sentence label
    label` trains on the third column's labels, a JSONL row with "label" twice on its last one. Config files refuse
    a key given twice for this reason (settings/cli.py DuplicateKey); the data the model learns from does not."""
    from slimtune.data import get_task, read_examples

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SlimtuneError, match=f"{path}:{line}"):
        read_examples(str(path), get_task("sst2"))


# -- the bare command -------------------------------------------------------------------------------------------------------
def test_slimtune_without_a_command_prints_help_without_an_empty_error_line():
    """`slimtune` alone prints the help, then 'error: slimtune: (see --help)': click's NoArgsIsHelpError has no
    message, and OneLineErrors prints it as an error anyway."""
    res = cli()
    assert "Usage" in res.output
    assert ": (see --help)" not in res.output, res.output
