"""The built-in tasks' prompts: SST-2's default prompt, a prompt of one's own for sst2/rte (--template, --label-words),
and a run's prompt recorded in its config.json, so that a later change of a task's prompt never changes what an
existing run resumes with or what its adapter is evaluated with."""

import json

import pytest

from slimtune.data import get_task, read_examples
from test_bad_input_table import DEV, FAST, TINY, TRAIN, assert_one_line, cli


def prompts_of(task):
    return [e.prompt for e in read_examples(TRAIN, task)][:2]


def test_sst2_prompts_are_review_and_sentiment_with_negative_and_positive():
    task = get_task("sst2")
    assert task.label_words == (" negative", " positive")
    first = read_examples(TRAIN, task)[0]
    assert first.prompt.startswith("Review: ") and first.prompt.endswith("\nSentiment:")


def test_a_builtin_task_takes_a_prompt_of_ones_own():
    task = get_task("sst2", template="{sentence} It was", label_words="1=great,0=terrible")
    assert task.label_words == (" terrible", " great")  # in the task's label order, whatever the order given
    assert all(p.endswith(" It was") for p in prompts_of(task))
    renamed = get_task("sst2", text_column="text", template="{sentence} It was")
    assert renamed.template == "{text} It was"


@pytest.mark.parametrize("flags, needle", [
    (["--template", "{text} It was"], "only {sentence} can be filled in"),
    (["--template", "{sentence1} and {sentence2}"], "only {sentence} can be filled in"),
    (["--label-words", "0=bad,2=good"], "task sst2 has the label values 0, 1"),
    (["--label-words", "0=bad"], "at least two classes"),
])
def test_a_builtin_tasks_prompt_of_ones_own_is_checked_before_any_work(tmp_path, flags, needle):
    assert_one_line(cli("train", "--data", TRAIN, *TINY, *FAST, "--out", tmp_path / "out", *flags), needle)
    assert not (tmp_path / "out").exists()


def test_a_run_records_its_prompt_and_an_older_run_resumes_with_the_prompt_of_its_time(tmp_path):
    """Runs recorded template null for built-in tasks: after SST-2's prompt changed, resuming one would have trained
    on with the new prompt, a silent change of the objective mid-run."""
    out = tmp_path / "run"
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "mezo", *FAST, "--eval-every", "0", "--out", out)
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert (config["template"], config["label_words"]) == ("Review: {sentence}\nSentiment:", "0=negative,1=positive")
    config["template"] = config["label_words"] = None  # as a run of an earlier slimtune recorded it
    (out / "config.json").write_text(json.dumps(config))
    more = ["--steps", "3", *FAST[2:]]
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "mezo", *more, "--eval-every", "0", "--out", out,
              "--resume")
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert (config["template"], config["label_words"]) == ("{sentence} It was", "0=terrible,1=great")


def test_eval_scores_an_adapter_with_the_prompt_its_run_trained_with(tmp_path, monkeypatch):
    out = tmp_path / "run"
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "mezo", *FAST, "--eval-every", "0", "--out", out,
              "--template", "Film: {sentence} Verdict:", "--label-words", "0=bad,1=good")
    assert res.exit_code == 0, res.output
    seen = []
    import slimtune.train.objectives as objectives
    real = objectives.make_objective

    def spy(task, text_column=None, label_column=None, template=None, label_words=None, *args, **kwargs):
        seen.append((template, label_words))
        return real(task, text_column, label_column, template, label_words, *args, **kwargs)

    monkeypatch.setattr(objectives, "make_objective", spy)
    res = cli("eval", "--data", DEV, *TINY, "--adapter", out / "adapter")
    assert res.exit_code == 0, res.output
    res = cli("eval", "--data", DEV, *TINY, "--adapter", out / "adapter", "--label-words", "0=terrible,1=great")
    assert res.exit_code == 0, res.output
    assert seen == [("Film: {sentence} Verdict:", "0=bad,1=good"), ("Film: {sentence} Verdict:", "0=terrible,1=great")]
