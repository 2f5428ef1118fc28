"""Review 13: an adversarial reading of today's changes (0c01002..HEAD): check_only_claim_files, the key file written
through a temporary, the `replaced` record in status.json, releases_of / _rebuilt_releases and the nonce-keyed
ledger. Each test failed on the code it was written against.

1. create_key_file writes `.secret.key.<pid>.<hex>.tmp` and links it into place; a kill -9 while it is written (the
   case the temporary was introduced for) leaves that temporary, and check_only_claim_files, which allows only
   .lock, status.json(.tmp), secret.key and pissa_init, refuses the directory on every later attempt.
2. The run a --restart replaced is named in the new status.json; if the attempt stopped before its ledger was
   written and the replaced directory is gone (the user cleaned up RUN.failed-*), releases_of reads {} there and
   composes nothing: the next attempt starts a fresh budget on the same data.
3. status.json `replaced` that points at its own run (or a cycle of them) makes releases_of recurse until
   RecursionError: an internal error, not one line.
4. An attempt after --restart that wrote its ledger (the replaced run's releases carried into status.json) and
   stopped before config.json; a crash then damages its status.json: the next attempt reads {"state": "unknown"},
   finds neither ledger nor `replaced`, and composes nothing.
5. Ledgers written by yesterday's slimtune carry no "run" tag: their entries are keyed with the current run's nonce,
   so the carried entry (0, 2) of a replaced run is still overwritten by the restarted run's own (0, 2) entry on its
   first resume (the collision privacy review 11 fixed for new ledgers only).
6. A node's local-dp-epsilon budget charges all its past private steps at the settings of the round being checked:
   a server that lowers the noise in one round and raises it in the next passes the check past the budget.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import slimtune.train.trainer as trainer
from slimtune import SlimtuneError
from slimtune.train import prepare, train

from test_privacy_review_11 import cfg, crashed_run, reference_epsilon, restarted_after_a_failed_resume
from test_review_findings_9 import TRAIN, cli


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


# -- 1. the key's temporary, left by a kill, blocks the directory ------------------------------------------------------
def test_a_key_temporary_left_by_a_kill_does_not_block_the_directory(tmp_path, monkeypatch):
    import slimtune.privacy.secret as secret
    out = tmp_path / "run"
    command = ["train", "--data", TRAIN, "--model", "tiny-llama", "--quiet", "--eval-every", "0", "--steps", "2",
               "--optimizer", "dpzero", "--batch-size", "4", "--out", out]
    monkeypatch.setattr(secret.json, "dump", interrupt)  # killed while the key is written ...
    monkeypatch.setattr(secret.Path, "unlink", lambda self, missing_ok=False: None)  # ... -9: no cleanup ran
    assert cli(*command).exit_code != 0
    monkeypatch.undo()
    assert any(p.name.startswith(".secret.key.") for p in out.iterdir())  # what a kill -9 leaves
    res = cli(*command)
    assert res.exit_code == 0, res.output


# -- 2. the replaced run is gone ---------------------------------------------------------------------------------------
def test_a_replaced_run_that_is_gone_is_not_silently_forgotten(tmp_path, monkeypatch):
    """run released 3 steps; --restart moved it to run.failed-1 and stopped before its ledger (in apply_peft); the
    user deletes run.failed-1; the next attempt must refuse (the releases cannot be composed) or compose them."""
    run = tmp_path / "run"
    crashed_run(run, monkeypatch)
    monkeypatch.setattr(trainer, "apply_peft", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(run, steps=2), restart=True)
    monkeypatch.undo()
    assert json.loads((run / "status.json").read_text())["replaced"].endswith("run.failed-1")
    shutil.rmtree(tmp_path / "run.failed-1")
    try:
        summary = train(prepare(cfg(run, steps=2), restart=True))
    except SlimtuneError:
        return
    assert summary["epsilon"] >= reference_epsilon(summary, 2 + 3) * (1 - 1e-6), summary["epsilon"]


# -- 3. a `replaced` that points back ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cycle", [1, 2])
def test_a_replaced_record_that_forms_a_cycle_is_one_line(tmp_path, cycle):
    runs = [tmp_path / f"run{i}" for i in range(cycle)]
    for i, run in enumerate(runs):
        run.mkdir()
        (run / "status.json").write_text(json.dumps({"state": "failed", "replaced": str(runs[(i + 1) % cycle])}))
    with pytest.raises(SlimtuneError):
        trainer.releases_of(runs[0])


# -- 4. a damaged status.json of an attempt that carried releases -----------------------------------------------------
def test_a_damaged_status_of_an_attempt_that_carried_releases_is_not_a_fresh_budget(tmp_path, monkeypatch):
    run = tmp_path / "run"
    crashed_run(run, monkeypatch)
    monkeypatch.setattr(trainer, "build_optimizer", interrupt)  # after _private_setup wrote the carried ledger
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(run, steps=2), restart=True)
    monkeypatch.undo()
    assert json.loads((run / "status.json").read_text())["abandoned"]  # the carried releases, in this file only
    (run / "status.json").write_text("")  # the damage privacy review 11 handles for a run with a checkpoint
    try:
        summary = train(prepare(cfg(run, steps=2), restart=True))
    except SlimtuneError:
        return
    assert summary["epsilon"] >= reference_epsilon(summary, 2 + 3) * (1 - 1e-6), summary["epsilon"]


# -- 5. ledgers written before entries were tagged with their run ------------------------------------------------------
def _untag(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["abandoned"] = [{k: v for k, v in d.items() if k != "run"} for d in doc.get("abandoned", [])]
    path.write_text(json.dumps(doc))


def test_a_restarted_run_from_an_older_version_keeps_the_carried_abandoned_releases(tmp_path, monkeypatch):
    """test_privacy_review_11's scenario 3, with B's ledger as yesterday's slimtune wrote it (no "run" tags), resumed
    by today's: releases A 4, B 6 + 2 abandoned = 12."""
    run = tmp_path / "run"
    restarted_after_a_failed_resume(run, monkeypatch)
    _untag(run / "status.json")
    _untag(run / "checkpoint" / "trainer_state.json")
    summary = train(prepare(cfg(run, steps=6, checkpoint_every=2), resume=True))
    assert summary["steps"] == 6
    assert summary["epsilon"] == pytest.approx(reference_epsilon(summary, 4 + 6 + 2), rel=1e-6)


# -- 6. a node's local-dp-epsilon budget, composed at the current round's settings ------------------------------------
def test_a_nodes_budget_composes_the_rounds_it_trained_at_their_own_noise(demo_paths):
    """check_node_floor bounds epsilon_at(this round's cfg, steps_before + local_steps): every past step is charged at
    the noise (and batch) the server sends *now*. A server that sends local-dp-noise 0.6 in round 1 (the node's whole
    budget, epsilon 13.1) and 3 in round 2 passes round 2's check (4 steps at noise 3: epsilon 3.0), though the node's
    epsilon after round 2 is 13.45, above its budget. The node should keep what it spent and compose it."""
    from dataclasses import replace

    from slimtune.federated.client_app import check_node_floor
    from slimtune.federated.local_privacy import epsilon_at
    from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec, Segment

    from test_federated import make_cfg

    first = make_cfg(demo_paths, bits=8, local_optimizer="dp-sgd", local_dp_noise=0.6, batch_size=64, local_steps=2)
    second = replace(first, local_dp_noise=3.0)
    budget = epsilon_at(first, first.batch_size, 2) * 1.0001
    from slimtune.federated.local_privacy import bound_segment
    check_node_floor(first, {"local-dp-epsilon": budget}, [])  # round 1: within the budget, trains 2 steps
    spent = PrivacyAccountant(PrivacySpec(delta=first.local_dp_delta, noise_multiplier=3.0), 64, 64, 3.0, 1,
                              extra=[Segment(2, 64, 64, 0.6)]).epsilon(2)  # round 1's steps, then round 2's
    assert spent > budget
    with pytest.raises(SlimtuneError, match="local-dp-epsilon"):
        check_node_floor(second, {"local-dp-epsilon": budget}, [bound_segment(first)])  # what the node kept
