"""Review 24 of aaf8d95 and the changes before it (SST-2's new default prompt, every artefact carrying its prompt):
where what an artefact is, or which prompt it learned, is inferred from which files or keys are present, and an
artefact of another producer is misread. Each test failed on the code it was written against."""

from __future__ import annotations

import json
import shutil

import pytest

from test_bad_input_table import DEV, FAST, TINY, TRAIN, cli
from test_review_findings_22 import OWN, own_prompt_run, spy_prompts  # noqa: F401 (fixture)

CUSTOM = ["--task", "custom", "--template", "{sentence} Overall:", "--label-words", "0=bad,1=good"]


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rv24") / "custom"
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "mezo", *FAST, "--eval-every", "0", "--out", out,
              *CUSTOM)
    assert res.exit_code == 0, res.output
    return out


# -- 1. an adapter of another task, evaluated without --task ------------------------------------------------------------
def test_an_adapter_of_a_custom_task_is_not_scored_with_sst2s_prompt_when_task_is_left_out(custom_run, monkeypatch):
    """prompt_of_adapter reads the adapter's prompt only when its recorded task equals --task, whose default is sst2.
    An adapter trained with --task custom ('{sentence} Overall:' bad/good) records task custom in slimtune.json and
    config.json, yet `slimtune eval --adapter run/adapter --data dev.tsv` (no --task) scores it with today's SST-2
    'Review: ... Sentiment:' negative/positive, exit 0: another objective's accuracy, silently. Either the recorded
    task is taken, or one line says the adapter learned task custom."""
    seen = spy_prompts(monkeypatch)
    res = cli("eval", "--data", DEV, *TINY, "--adapter", custom_run / "adapter")
    if res.exit_code == 2:  # refused: one line naming the adapter's task
        assert "custom" in res.output and "Traceback" not in res.output, res.output
        return
    assert res.exit_code == 0, res.output
    assert seen == [("{sentence} Overall:", "0=bad,1=good")], seen


# -- 2. merge loses the prompt that eval finds for the adapter ---------------------------------------------------------
@pytest.mark.parametrize("null_prompt", [False, True], ids=["recorded-in-config", "run-before-the-record"])
def test_a_merged_checkpoint_keeps_the_prompt_eval_finds_for_its_adapter(own_prompt_run, tmp_path, monkeypatch,
                                                                         null_prompt):
    """export.prompt_meta reads the prompt from the adapter's slimtune.json only. An adapter saved before runs wrote
    the prompt there (slimtune.json with the base only) is scored by `eval --adapter` with its run's config.json
    prompt (or PROMPT_FOR_NULL's for a run that recorded null), but `slimtune merge run/adapter --out merged`
    writes no prompt, so `eval --adapter merged` scores the same weights with today's 'Review: ... Sentiment:'."""
    run = tmp_path / "run"
    shutil.copytree(own_prompt_run, run)
    meta_path = run / "adapter" / "slimtune.json"
    meta = json.loads(meta_path.read_text())
    for key in ("task", "template", "label_words"):
        meta.pop(key, None)
    meta_path.write_text(json.dumps(meta))  # as an adapter saved before f8a8147
    if null_prompt:
        config = json.loads((run / "config.json").read_text())
        config["template"] = config["label_words"] = None  # a run from before the record
        (run / "config.json").write_text(json.dumps(config))
    expected = ("{sentence} It was", "0=terrible,1=great") if null_prompt else \
        ("Film: {sentence} Verdict:", "0=bad,1=good")
    seen = spy_prompts(monkeypatch)
    res = cli("eval", "--data", DEV, *TINY, "--adapter", run / "adapter")
    assert res.exit_code == 0, res.output
    assert seen == [expected], seen  # what eval scores the adapter with (passes today)
    merged = tmp_path / "elsewhere" / "merged"
    res = cli("merge", run / "adapter", *TINY, "--out", merged)
    assert res.exit_code == 0, res.output
    seen.clear()
    res = cli("eval", "--data", DEV, "--adapter", merged)
    assert res.exit_code == 0, res.output
    assert seen == [expected], seen


# -- 3. a merged checkpoint given as --model ---------------------------------------------------------------------------
def test_a_merged_checkpoint_given_as_model_is_not_scored_with_todays_prompt(own_prompt_run, tmp_path, monkeypatch):
    """A merged checkpoint is a plain transformers checkpoint (docs/how-to/export.md), and check_model takes it as
    --model. Its slimtune.json records the prompt it learned, read only when it is given as --adapter:
    `slimtune eval --model merged --data dev.tsv` scores 'Film: ... Verdict:' bad/good weights with today's
    'Review: ... Sentiment:' negative/positive, exit 0. The same checkpoint is scored two ways by which flag names it
    (and a --peft none run's adapter/ likewise)."""
    merged = tmp_path / "merged"
    res = cli("merge", own_prompt_run / "adapter", *TINY, "--out", merged)
    assert res.exit_code == 0, res.output
    seen = spy_prompts(monkeypatch)
    res = cli("eval", "--data", DEV, "--model", merged)
    if res.exit_code == 2:  # refused: one line pointing at --adapter
        assert "--adapter" in res.output and "Traceback" not in res.output, res.output
        return
    assert res.exit_code == 0, res.output
    assert seen == [("Film: {sentence} Verdict:", "0=bad,1=good")], seen


# -- 4. a merged checkpoint kept in its run's directory ----------------------------------------------------------------
def test_a_merged_checkpoint_in_its_run_directory_is_not_taken_for_the_runs_adapter(own_prompt_run, tmp_path):
    """check_finished_run infers 'this is RUN/adapter' from a status.json in the parent directory. `slimtune merge
    run/adapter --out run/merged` of a finished run, then a resume of the run that fails (or is still running): the
    merged checkpoint is a finished artefact of its own, yet `slimtune export run/merged` (and `merge run/merged`) is
    refused with 'adapter/ holds an earlier evaluation's model', which is about another directory."""
    run = tmp_path / "run"
    shutil.copytree(own_prompt_run, run)
    res = cli("merge", run / "adapter", *TINY, "--out", run / "merged")
    assert res.exit_code == 0, res.output
    status = json.loads((run / "status.json").read_text())
    status["state"] = "failed"  # a later resume of the run failed
    (run / "status.json").write_text(json.dumps(status))
    res = cli("merge", run / "merged", "--out", tmp_path / "again")
    assert res.exit_code == 0, res.output


# -- the fix's edges (the lead's): the recorded task is taken as a flag would be -----------------------------------------
def test_a_flag_the_recorded_task_does_not_take_is_one_line(custom_run):
    """With --task left out the adapter's task (custom) is the task: --text-column, an sst2 setting, was accepted
    against the default sst2 and then silently ignored."""
    res = cli("eval", "--data", DEV, *TINY, "--adapter", custom_run / "adapter", "--text-column", "sentence")
    assert res.exit_code == 2 and "--text-column" in res.output and "custom" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_another_task_given_gets_its_own_prompt(custom_run, monkeypatch):
    """--task given is the user's choice: the custom adapter scored as sst2 gets sst2's prompt (nothing recorded
    for another task is mixed in)."""
    from slimtune.data.tasks import builtin_prompt
    seen = spy_prompts(monkeypatch)
    res = cli("eval", "--data", DEV, *TINY, "--adapter", custom_run / "adapter", "--task", "sst2")
    assert res.exit_code == 0, res.output
    assert seen in ([(None, None)], [builtin_prompt("sst2")]), seen


@pytest.mark.parametrize("task", ["xyz", 3])  # generation is recorded too now (tests/test_generation_prompt_record.py)
def test_a_recorded_task_that_is_not_a_classification_task_is_one_line(custom_run, tmp_path, task):
    """The record is read as input: a task that eval could not score with a prompt names the file."""
    adapter = tmp_path / "adapter"
    shutil.copytree(custom_run / "adapter", adapter)
    meta = json.loads((adapter / "slimtune.json").read_text())
    meta["task"] = task
    (adapter / "slimtune.json").write_text(json.dumps(meta))
    res = cli("eval", "--data", DEV, *TINY, "--adapter", adapter)
    assert res.exit_code == 2 and "slimtune.json" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_a_model_kept_in_a_run_directory_is_not_scored_with_that_runs_prompt(own_prompt_run, tmp_path, monkeypatch):
    """Only a run's adapter/ reads its run's config.json for the prompt: a checkpoint of other weights kept in the
    run's directory (no slimtune.json of its own) was scored with the run's 'Film: ... Verdict:' prompt."""
    run = tmp_path / "run"
    shutil.copytree(own_prompt_run, run)
    res = cli("merge", run / "adapter", *TINY, "--out", run / "other")
    assert res.exit_code == 0, res.output
    (run / "other" / "slimtune.json").unlink()  # as a checkpoint from elsewhere
    seen = spy_prompts(monkeypatch)
    res = cli("eval", "--data", DEV, "--model", run / "other")
    assert res.exit_code == 0, res.output
    assert seen == [(None, None)], seen
