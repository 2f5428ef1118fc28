"""Review 22 of the changes since ef9da8e: SST-2's new prompt and its record (where a prompt travels with what a run
produced, and where it does not), the built-in tasks' --template / --label-words, and the private optimizer's step
checks. Each test failed on the code it was written against."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

import slimtune
from slimtune import SlimtuneError
from slimtune.data import get_task
from test_bad_input_table import DEV, FAST, TINY, TRAIN, cli
from test_privacy_review_13 import losses_of, moved
from test_python_api import trainable
from test_review_findings_20 import build

OWN = ["--template", "Film: {sentence} Verdict:", "--label-words", "0=bad,1=good"]


@pytest.fixture(scope="module")
def own_prompt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rv22") / "run"
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "mezo", *FAST, "--eval-every", "0", "--out", out, *OWN)
    assert res.exit_code == 0, res.output
    return out


def spy_prompts(monkeypatch) -> list:
    import slimtune.train.objectives as objectives
    seen, real = [], objectives.make_objective

    def spy(task, text_column=None, label_column=None, template=None, label_words=None, *args, **kwargs):
        seen.append((template, label_words))
        return real(task, text_column, label_column, template, label_words, *args, **kwargs)
    monkeypatch.setattr(objectives, "make_objective", spy)
    return seen


# -- 1. an adapter away from its run's config.json ---------------------------------------------------------------------
def test_an_adapter_copied_out_of_its_run_is_scored_with_the_prompt_it_learned(own_prompt_run, tmp_path, monkeypatch):
    """prompt_of_adapter finds the run's prompt only in `<adapter>/../config.json`. An adapter copied or shared on its
    own (`cp -r run/adapter models/sst2`, the usual way to keep one) carries its tokenizer and slimtune.json, not its
    prompt: `slimtune eval --adapter models/sst2` silently scores 'Film: ... Verdict:' bad/good as today's
    'Review: ... Sentiment:' negative/positive (exit 0, accuracy of another objective). The same for an adapter of a
    run from before the record, and for a merged checkpoint (merge/export drop the prompt)."""
    shutil.copytree(own_prompt_run / "adapter", tmp_path / "models" / "sst2")
    seen = spy_prompts(monkeypatch)
    res = cli("eval", "--data", DEV, *TINY, "--adapter", tmp_path / "models" / "sst2")
    assert res.exit_code == 0, res.output
    assert seen == [("Film: {sentence} Verdict:", "0=bad,1=good")], seen


# -- 2. the same prompt, words given in another order --------------------------------------------------------------------
def test_resume_with_the_same_label_words_in_another_order_is_not_a_changed_setting(own_prompt_run, tmp_path):
    """get_task puts label words in the task's label order ('1=good,0=bad' is the same task as '0=bad,1=good'), but
    config.json records the string as typed and --resume compares strings: repeating the flags in another order is
    refused with 'settings differ ... label_words: '0=bad,1=good' -> '1=good,0=bad''; a resumed run trains exactly
    what it started with, and here it would."""
    run = tmp_path / "run"
    shutil.copytree(own_prompt_run, run)
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "mezo", "--steps", "3", *FAST[2:], "--eval-every", "0",
              "--out", run, "--resume", "--template", "Film: {sentence} Verdict:", "--label-words", "1=good,0=bad")
    assert res.exit_code == 0, res.output


# -- 3. slimtune.data.get_task's own prompt for a built-in task ---------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(label_words="0=bad,2=good"), dict(label_words="0bad,1good"),
                                    dict(template="{text} It was")])
def test_get_task_refuses_a_builtin_tasks_bad_prompt_with_a_slimtune_error(kwargs):
    """slimtune.data.get_task is public (slimtune.data.__all__) and now takes template / label_words for sst2/rte.
    The CLI checks them first (rules.check_task_text); the function does not: a missing label value is a bare
    KeyError '1', words without '=' a ValueError 'not enough values to unpack', and a template over a column the task
    does not have is accepted (text_columns still ('sentence',); reading the rows fails later). The custom task's branch
    of the same function raises SlimtuneError for the same input."""
    with pytest.raises(SlimtuneError):
        get_task("sst2", **kwargs)


# -- 4. a trailing space before the label word -----------------------------------------------------------------------
def test_a_trailing_space_in_a_builtin_tasks_template_is_handled_as_a_custom_tasks():
    """Label words are scored as ' word'. `--task custom --template '{text} It was '` removes the trailing space with a
    warning (a bare space token before the label word); `--task sst2 --template '{sentence} It was '` keeps it
    silently, and trains on '... It was ' + ' great'."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = get_task("sst2", template="{sentence} It was ")
    assert task.template == "{sentence} It was" or caught, repr(task.template)


# -- 5. federated clients and the server's prompt --------------------------------------------------------------------
def test_federated_clients_are_sent_the_prompt_the_server_evaluates_with():
    """The server evaluates with its own slimtune's SST-2 prompt, and sends clients template None (FederatedConfig's
    template is generation-only), so each SuperNode trains with the prompt of the slimtune installed there: a client
    installed before 5600567 trains '{sentence} It was' terrible/great while the server scores 'Review: ...
    Sentiment:' negative/positive, silently. The centralized run records its prompt for exactly this reason."""
    from slimtune.federated.config import FederatedConfig
    sent = json.loads(FederatedConfig(task="sst2").resolved().client_json())
    assert sent.get("template") == get_task("sst2").template, sent.get("template")
    assert sent.get("label_words") == "0=negative,1=positive"
    assert FederatedConfig.from_json(json.dumps(sent)).template == sent["template"]  # what a client builds from


def test_federate_checks_a_builtin_tasks_own_prompt_in_one_line(tmp_path):
    from test_bad_input_table import assert_one_line
    assert_one_line(cli("federate", "--data", TRAIN, "--model", "tiny-llama", "--out", tmp_path / "fed",
                        "--label-words", "0=bad,2=good"), "task sst2 has the label values 0, 1")
    assert not (tmp_path / "fed").exists()


# -- 6. a private optimizer's inner step -------------------------------------------------------------------------------
def test_a_private_optimizers_inner_step_cannot_be_taken_around_its_checks():
    """`opt.impl` (no underscore) is the private ZO step itself: `opt.impl.step(closure)` took a noised step with none
    of PrivateOptimizer.step's checks (no draw needed, past the calibrated `steps`: 5 releases under a budget for 3,
    epsilon_spent 3.72 > 3.0) and without counting it in `_released`, so a `load_state_dict(start)` afterwards was
    accepted and epsilon_spent went back from 1.94 to 0.0 while the weights kept the release. It is refused now,
    before anything is evaluated."""
    model, opt, _ = build("DPZero")
    before = trainable(model)
    with pytest.raises(SlimtuneError, match="opt.step"):
        opt.impl.step(losses_of(model, list(range(4))))  # no sample_batch(): a fixed batch of 4
    assert opt.steps_taken == 0 and moved(before, model) == 0.0
    opt.step(losses_of(model, opt.sample_batch()))  # the way in still works
    assert opt.steps_taken == 1
