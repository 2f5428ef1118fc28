"""Review 23 of f8a8147 and c1b8610: the prompt an adapter carries (slimtune.json), the federated server's prompt sent
to its clients, and what a client checks of it. Each test failed on the code it was written against."""

from __future__ import annotations

import json
import shutil

import pytest

from slimtune import SlimtuneError
from slimtune.data import get_task
from test_bad_input_table import DEV, TINY, TRAIN, assert_one_line, cli
from test_federated import InProcessGrid, make_cfg, task_identity  # noqa: F401 (fixture)
from test_review_findings_22 import OWN, own_prompt_run, spy_prompts  # noqa: F401 (fixture)


# -- 1. a federated run's adapter ---------------------------------------------------------------------------------------
def test_a_federated_runs_adapter_is_scored_with_the_prompt_it_trained_with(tmp_path, monkeypatch):
    """c1b8610 gave `slimtune federate` --template / --label-words and sends them to every client, but the server
    saves its adapter with adapter_meta(cfg.model) alone (server_app.run_server), and its run directory has no
    config.json (summary.json only): `slimtune eval --adapter runs/fed/adapter` scores a 'Film: ... Verdict:' bad/good
    adapter with today's 'Review: ... Sentiment:' negative/positive, exit 0 (the silent mismatch f8a8147 fixed for
    `slimtune train`)."""
    from slimtune.federated.server_app import run_server
    out = tmp_path / "fed"
    run_server(InProcessGrid(2), make_cfg((TRAIN, DEV), out_dir=str(out), num_clients=2, rounds=1, local_steps=1,
                                          model="tiny-llama", template="Film: {sentence} Verdict:",
                                          label_words="0=bad,1=good", eval_max=8))
    seen = spy_prompts(monkeypatch)
    res = cli("eval", "--data", DEV, *TINY, "--adapter", out / "adapter")
    assert res.exit_code == 0, res.output
    assert seen == [("Film: {sentence} Verdict:", "0=bad,1=good")], seen


# -- 2. a merged checkpoint -----------------------------------------------------------------------------------------
def test_a_merged_checkpoint_is_scored_with_the_prompt_its_adapter_learned(own_prompt_run, tmp_path, monkeypatch):
    """Review 22's finding 1 named the merged checkpoint too ('merge/export drop the prompt'); f8a8147 fixed the
    copied adapter only. `slimtune merge run/adapter --out merged` writes no slimtune.json, so `slimtune eval
    --adapter merged` (a whole model, read_adapter's is_whole_model path) silently uses today's SST-2 prompt."""
    merged = tmp_path / "merged"
    res = cli("merge", own_prompt_run / "adapter", *TINY, "--out", merged)
    assert res.exit_code == 0, res.output
    seen = spy_prompts(monkeypatch)
    res = cli("eval", "--data", DEV, "--adapter", merged)  # a whole model: no --model
    assert res.exit_code == 0, res.output
    assert seen == [("Film: {sentence} Verdict:", "0=bad,1=good")], seen


# -- 3. a slimtune.json prompt that is not one -------------------------------------------------------------------------
@pytest.mark.parametrize("template, label_words", [(5, "0=bad,1=good"), ("Film: {sentence} Verdict:", ["bad", "good"]),
                                                    ("Film: {text} Verdict:", "0=bad,1=good")])
def test_a_bad_prompt_in_slimtune_json_is_one_line_naming_the_file(own_prompt_run, tmp_path, template, label_words):
    """read_adapter_meta checks base_quant, dtype and base_fingerprint with one line naming slimtune.json, but not the
    new task / template / label_words: an int template is a TypeError traceback from string.Formatter, a list of
    words an AttributeError ('list' object has no attribute 'split'), and a template over another column is refused
    as '--template ...', a flag the user never gave, naming no file."""
    adapter = tmp_path / "adapter"
    shutil.copytree(own_prompt_run / "adapter", adapter)
    meta = json.loads((adapter / "slimtune.json").read_text())
    (adapter / "slimtune.json").write_text(json.dumps({**meta, "template": template, "label_words": label_words}))
    assert_one_line(cli("eval", "--data", DEV, *TINY, "--adapter", adapter), "slimtune.json")


# -- 4. a template's format specs and conversions ----------------------------------------------------------------------
FORMATTED = ["{sentence:.0} Verdict:", "{sentence:>999999999} Verdict:", "{sentence!r} Verdict:"]


@pytest.mark.parametrize("template", FORMATTED)
def test_a_federated_client_refuses_a_template_with_a_format_spec_or_conversion(template):
    """A client checks the template it is sent (validate -> check_task_text -> template_fields), which refuses {0} and
    {sentence.__class__} but passes format specs and conversions: a server's '{sentence:.0} ...' makes every client
    train on prompts with none of its text, '{sentence:>999999999}' makes each client build a ~1 GB string per row
    (memory), '{sentence!r}' adds quotes. A template is text over column names; nothing else in braces is needed."""
    from slimtune.federated.config import FederatedConfig
    sent = json.loads(FederatedConfig(task="sst2").resolved().client_json())
    received = FederatedConfig.from_json(json.dumps({**sent, "template": template}))
    with pytest.raises(SlimtuneError, match="template"):
        received.validate()


@pytest.mark.parametrize("template", FORMATTED)
def test_get_task_refuses_a_template_with_a_format_spec(template):
    """The same rule for slimtune.data.get_task (rules.check_template, which `slimtune train --template` runs)."""
    with pytest.raises(SlimtuneError):
        get_task("sst2", template=template)


def test_train_refuses_a_template_with_a_format_spec_in_one_line(tmp_path):
    """`slimtune train --template '{sentence:.0} Verdict:'` trains (exit 0) on prompts that hold none of the text."""
    assert_one_line(cli("train", "--data", TRAIN, *TINY, "--out", tmp_path / "run", "--steps", "1", "--quiet",
                        "--template", "{sentence:.0} Verdict:"), "--template")
    assert not (tmp_path / "run").exists()


# -- 5. federate's hint -----------------------------------------------------------------------------------------------
def test_federates_template_error_names_no_flag_federate_lacks(tmp_path):
    """c1b8610 checks federate's --template with train's rule (check_task_text), whose SST-2 hint says 'a column of
    another name in the data: --text-column'; `slimtune federate` has no --text-column (the user is sent to a flag
    that is refused)."""
    res = cli("federate", "--data", TRAIN, *TINY, "--out", tmp_path / "fed", "--template", "{text} It was")
    assert_one_line(res, "only {sentence} can be filled in")
    assert "--text-column" not in res.stderr, res.stderr
    assert not (tmp_path / "fed").exists()


# -- 6. the inner step's guard, re-entered -----------------------------------------------------------------------------
def test_a_private_optimizers_inner_step_is_refused_inside_its_own_closure():
    """f8a8147 refuses `opt.impl.step` unless `_owner_stepping`, which stays True for the whole of opt.step, closure
    calls included: a closure that calls `opt.impl.step(fixed batch)` takes a private step on an undrawn batch with
    none of the checks (steps_taken 2, `_released` 1). The permission should be spent on entering the inner step."""
    from test_privacy_review_13 import losses_of
    from test_review_findings_20 import build
    model, opt, _ = build("DPZero")
    batch, refused = opt.sample_batch(), []

    def closure():
        if not refused:
            try:
                opt.impl.step(losses_of(model, list(range(4))))
                refused.append(False)
            except SlimtuneError:
                refused.append(True)
        return losses_of(model, batch)()
    opt.step(closure)
    assert refused == [True] and opt.steps_taken == 1, (refused, opt.steps_taken)
