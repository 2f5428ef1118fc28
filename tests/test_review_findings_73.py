"""Review 73: adversarial review of 5fa4fd8 (report/tables honesty), 336d4cf (hf.py loss alignment, eval/merge
scoring) and f5551c2 (accountant: segment mechanism/sampling, PLD probing). Every test here failed when written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune import SlimtuneError
from slimtune.privacy import PrivacySpec
from slimtune.privacy.accountant import PrivacyAccountant, Segment

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# a segment as status.json / trainer_state.json held it before f5551c2 (no mechanism, no sampling)
LEGACY = {"steps": 5, "num_examples": 1000, "batch_size": 50, "noise_multiplier": 1.0, "releases": 1,
          "quantile_noise": 0.0}


# -- f5551c2: Segment grew two fields ----------------------------------------------------------------------------------
def test_a_nodes_local_dp_ledger_written_by_one_round_is_read_by_the_next(tmp_path):
    """HIGH. local_privacy._segment writes asdict(Segment), which now holds mechanism and sampling; _checked_segment
    accepts exactly the six old keys. A node's second private round reads its own ledger as 'damaged' and is refused
    (forever: the ledger is never reset)."""
    from slimtune.federated.config import FederatedConfig
    from slimtune.federated.local_privacy import NodeLedger

    cfg = FederatedConfig(local_optimizer="dpzero", local_dp_min_examples=8, batch_size=4, local_steps=2)
    path = tmp_path / "ledger.json"
    with NodeLedger(path) as ledger:
        ledger.record(cfg, 20, 1e-5)
    with NodeLedger(path) as ledger:  # the next round
        assert len(ledger.rounds) == 1


def test_a_legacy_ledger_of_a_shuffle_run_still_composes():
    """A --sampling shuffle run checkpointed by the previous code (privacy_history / abandoned without 'sampling') is
    read as Poisson and its resume is refused ('restart with --sampling poisson': the wrong advice, too)."""
    spec = PrivacySpec(delta=1e-5, noise_multiplier=1.0, sampling="shuffle")
    with pytest.warns(UserWarning):
        acc = PrivacyAccountant(spec, 1000, 50, 1.0, past=[Segment.from_dict(LEGACY)])
    acc.epsilon(10)  # raises SlimtuneError now


def test_a_legacy_ledger_of_a_laplace_run_keeps_its_epsilon():
    """A --mechanism laplace run's earlier segments, written without 'mechanism', are now priced as Gaussian (its
    reported epsilon changes on resume); the old code priced them as the run's own (Laplace) noise."""
    spec = PrivacySpec(delta=1e-5, noise_multiplier=1.0, mechanism="laplace", accountant="pld")
    old = PrivacyAccountant(spec, 1000, 50, 1.0, past=[Segment.from_dict(LEGACY)]).epsilon(10)
    laplace = Segment.from_dict({**LEGACY, "mechanism": "laplace"})
    assert old == pytest.approx(PrivacyAccountant(spec, 1000, 50, 1.0, past=[laplace]).epsilon(10), rel=1e-9)


def _crash_and_resume(tmp_path, monkeypatch, spec):
    from slimtune.train import prepare, train

    from test_privacy_review_11 import cfg, crashed_run
    run = tmp_path / "run"
    crashed_run(run, monkeypatch, 4, steps=6, checkpoint_every=2, privacy=spec)  # checkpoint 2, released 3-4
    summary = train(prepare(cfg(run, steps=6, checkpoint_every=2, privacy=spec), resume=True))
    return run, summary


def test_a_resumed_shuffle_run_that_released_past_its_checkpoint_is_not_refused(tmp_path, monkeypatch):
    """trainer._private_setup builds the 'released after the checkpoint' Segment without mechanism/sampling (defaults
    gaussian/poisson): a --sampling shuffle run killed after a release cannot be resumed any more."""
    spec = PrivacySpec(delta=1e-3, noise_multiplier=1.0, sampling="shuffle")
    with pytest.warns(UserWarning):
        _, summary = _crash_and_resume(tmp_path, monkeypatch, spec)
    assert summary["steps"] == 6


def test_a_resumed_laplace_run_prices_its_post_checkpoint_releases_as_laplace(tmp_path, monkeypatch):
    """The same Segment in a --mechanism laplace run: its abandoned releases are recorded (and priced) as Gaussian at
    the Laplace noise multiplier, the under-reporting f5551c2 fixed for replaced runs."""
    spec = PrivacySpec(delta=1e-3, noise_multiplier=1.0, mechanism="laplace", accountant="pld")
    run, _ = _crash_and_resume(tmp_path, monkeypatch, spec)
    abandoned = json.loads((run / "status.json").read_text())["abandoned"]
    assert abandoned and all(d.get("mechanism") == "laplace" for d in abandoned), abandoned


# -- 5fa4fd8: report / benchmark tables -----------------------------------------------------------------------------
def test_the_last_eval_mark_of_a_failed_resume_is_not_its_later_attempts_step(tmp_path):
    """A run completed at step 4, resumed to 6 and failed there: summary.json is the earlier completion (steps 4,
    final accuracy of step 4's evaluation), metrics.jsonl holds the failed attempt's evaluation at 6. The report marks
    the accuracy '(step 6)', a step it is not from."""
    from slimtune.report.render import COLUMNS, load_runs, table_rows

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"method": "mezo", "peft": "lora", "steps": 4,
                                                  "final_accuracy": 0.5}))
    (run / "status.json").write_text(json.dumps({"state": "failed"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 2, "eval_loss": 0.7, "eval_accuracy": 0.4}, {"step": 4, "eval_loss": 0.6, "eval_accuracy": 0.5},
        {"step": 6, "eval_loss": 0.5, "eval_accuracy": 0.6})))
    row = dict(zip([c[0] for c in COLUMNS], table_rows([load_runs([str(run)])[0].summary])[0]))
    assert row["dev accuracy"] == "0.500", row["dev accuracy"]


def test_a_damaged_prompt_in_config_json_is_not_a_traceback(tmp_path):
    """_prompt promises 'a damaged one leaves the prompt unknown', but a config.json whose template is not text (a
    list) is hashed by prompt_note: TypeError (unhashable), a traceback from `slimtune report`."""
    from slimtune.report.render import load_runs, prompt_note

    dirs = []
    for name, template in (("a", "{sentence} It was"), ("b", ["{sentence}", "x"])):
        run = tmp_path / name
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"method": "mezo", "steps": 1}))
        (run / "config.json").write_text(json.dumps({"task": "custom", "template": template,
                                                     "label_words": "0=a,1=b"}))
        dirs.append(str(run))
    try:
        prompt_note([r.summary for r in load_runs(dirs)])
    except SlimtuneError:
        pass  # one line naming the file: fine


def test_judged_keeps_not_met_for_a_finished_run_that_never_reached_the_target(monkeypatch):
    """wall_clock: a run that finished without reaching 80% is not met (le_2x False). judged() rewrites it from
    bounds(): (its last evaluation, None), so unless its whole run already cost > 2x the reference's time to 80% the
    verdict becomes None, and tables/targets drop the 'not met' note for it."""
    monkeypatch.syspath_prepend(str(BENCH))
    import zo_convergence as zc

    ref = {"seconds": [0, 100, 200], "steps": [0, 10, 20], "accuracy": [0.5, 0.7, 0.85], "finished": True}
    slow = {"seconds": [0, 50, 100], "steps": [0, 5, 10], "accuracy": [0.5, 0.6, 0.7], "finished": True}
    doc = {"runs": {zc.REFERENCE: ref, "mezo-lora": slow}, "target_accuracy": zc.TARGET_ACC,
           "wall_clock_to_target": zc.wall_clock({zc.REFERENCE: ref, "mezo-lora": slow})}
    assert doc["wall_clock_to_target"]["mezo-lora"]["le_2x"] is False  # what wall_clock says
    assert zc.judged(doc)["wall_clock_to_target"]["mezo-lora"]["le_2x"] is False


# -- 336d4cf: loss alignment and scoring -------------------------------------------------------------------------------
def test_gpt2_double_heads_still_shifts():
    """The allow-list replaced 'generates => shifts'. GPT2DoubleHeadsModel (its .logits are the LM head's, its own
    lm_loss shifts) was 'causal' before and is now None: a private ZO run of it is refused."""
    from transformers import GPT2Config, GPT2DoubleHeadsModel

    from slimtune.hf import loss_alignment

    model = GPT2DoubleHeadsModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16))
    assert loss_alignment(model) == "causal"


def test_an_api_run_with_a_short_max_length_writes_an_adapter_meta_its_own_checks_accept(tmp_path):
    """trainer.validate accepts max_length >= 1 (the Python API), the adapter's meta records it, and read_adapter_meta
    now refuses max_length < 8: merge / eval --adapter of that run's own adapter fail ('not a whole number >= 8')."""
    from slimtune.peft.registry import read_adapter_meta
    from slimtune.train import prepare, train

    from test_privacy_attacks import private_config
    run = tmp_path / "run"
    train(prepare(private_config(run, optimizer="mezo", privacy=None, steps=1, max_length=4, eval_every=0,
                                 checkpoint_every=1)))
    assert read_adapter_meta(run / "adapter").get("max_length") == 4
