"""Privacy review 11: the release ledger of a private run across crashes, --resume and --restart, attacked as someone
who sees every release. The guarantee: every release is accounted at least once, whatever was interrupted where.
Each test fails on the code it was written against.

1. A --restart whose budget (now including the replaced run's releases) cannot be met is refused after the failed run
   was moved aside and RUN/ holds only claim files (status.json, secret.key): the same command run again is a new run
   in that directory (check_only_claim_files), and _carried_releases finds no replaced run: the moved run's releases
   are forgotten and the new run reports a fresh budget on the same data.
2. A --restart of a run whose status.json a crash left unreadable (empty, truncated JSON): read_status returns
   {"state": "unknown"}, _carried_releases finds no ledger and composes nothing, although the replaced run's
   metrics.jsonl shows what it released (and its epsilon).
3. The ledger keys abandoned releases by (attempt, from_step). A --restart carries the replaced run's entries with
   their own keys, (0, 2) for instance; the new run's first resume from its checkpoint at step 2 writes its own
   (0, 2) entry over it: the replaced run's abandoned releases disappear from the accounting.
4. A crash while create_key_file writes RUN/secret.key (after O_CREAT, before the JSON) leaves an empty key file:
   every later attempt, --restart included, is refused ('not a slimtune key file') until the user deletes it by hand.
5. A crash-damaged checkpoint/trainer_state.json makes --resume an internal error (JSONDecodeError, exit 1), not one
   line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import slimtune.train.trainer as trainer
from slimtune import SlimtuneError
from slimtune.privacy import PrivacySpec
from slimtune.privacy.accountant import PrivacyAccountant
from slimtune.train import prepare, train

from test_privacy_attacks import crash_after_logging_step, private_config, step_records
from test_review_findings_9 import TRAIN, cli, one_line_error

FIXED = PrivacySpec(delta=1e-3, noise_multiplier=1.0)  # the noise of every run below (adaptive clipping, the default)


def cfg(out: Path, **kw):
    return private_config(out, eval_every=0, **kw)


def reference_epsilon(summary: dict, releases: int) -> float:
    """Epsilon of `releases` steps of this setting (N, B = 8, sigma 1, the run's count noise), composed."""
    return PrivacyAccountant(FIXED, summary["train_examples"], 8, 1.0, 1,
                             quantile_noise=summary["quantile_noise"]).epsilon(releases)


def crashed_run(out: Path, monkeypatch, crash_step: int = 3, restart: bool = False, **kw) -> None:
    """A private run (or, restart=True, a --restart of the one in `out`) that released steps 1..crash_step and died
    before the checkpoint of crash_step (its checkpoint is crash_step's previous one: checkpoint_every in kw)."""
    crash_after_logging_step(monkeypatch, crash_step)
    with pytest.raises(KeyboardInterrupt):
        train(prepare(cfg(out, **{"checkpoint_every": crash_step, **kw}), restart=restart))
    monkeypatch.undo()
    assert max(step_records(out)) == crash_step


def restarted_after_a_failed_resume(run: Path, monkeypatch) -> dict:
    """A: steps 1-4 released, checkpoint at 2, crash; its resume fails at its first step (abandoned: steps 3-4);
    --restart B: releases 1-4, checkpoint at 2, crash. Returns A's status.json as the failed resume left it."""
    crashed_run(run, monkeypatch, 4, steps=6, checkpoint_every=2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "_train_step", disk_full)
    with pytest.raises(OSError):
        train(prepare(cfg(run, steps=6, checkpoint_every=2), resume=True))
    monkeypatch.undo()
    status_a = json.loads((run / "status.json").read_text())
    crashed_run(run, monkeypatch, 4, restart=True, steps=6, checkpoint_every=2)
    return status_a


# -- 1. a refused --restart forgets the replaced run ------------------------------------------------------------------
def test_a_restart_refused_for_its_budget_does_not_forget_the_replaced_runs_releases(tmp_path, monkeypatch):
    """The failed run released 3 steps (epsilon e3 in its metrics.jsonl). `--restart --epsilon e3/2` cannot be met:
    refused, after run/ was moved to run.failed-1. The same command again trains and reports epsilon <= e3/2 while
    the replaced run's 3 releases alone spent e3 on the same data."""
    run = tmp_path / "run"
    crashed_run(run, monkeypatch)
    spent = step_records(run)[3]["epsilon"]
    target = PrivacySpec(delta=1e-3, target_epsilon=spent / 2)
    with pytest.raises(SlimtuneError):
        prepare(cfg(run, steps=2, privacy=target), restart=True)
    # refused before anything moved (the plan composes the releases --restart would carry), or after the move
    assert (run / "metrics.jsonl").exists() or (tmp_path / "run.failed-1" / "metrics.jsonl").exists()
    try:  # the user runs it again (with or without --restart)
        summary = train(prepare(cfg(run, steps=2, privacy=target), restart=True))
    except SlimtuneError:
        return  # refused again: the replaced run's releases are still counted
    assert summary["epsilon"] >= spent, (summary["epsilon"], spent)


def test_a_restart_interrupted_before_its_first_save_still_composes_the_replaced_run(tmp_path, monkeypatch):
    """The same with a Ctrl-C while the --restart builds its optimizer (after _private_setup wrote the carried
    releases to the new status.json): the next attempt in run/ starts a fresh ledger (abandoned: [])."""
    run = tmp_path / "run"
    crashed_run(run, monkeypatch)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_optimizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(run, steps=2), restart=True)
    monkeypatch.undo()
    summary = train(prepare(cfg(run, steps=2), restart=True))
    assert summary["epsilon"] == pytest.approx(reference_epsilon(summary, 2 + 3), rel=1e-6)


# -- 2. an unreadable status.json --------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["", '{"state": "failed", "attempt": 0, "released_thr'])
def test_a_restart_of_a_run_whose_status_json_is_unreadable_still_composes_its_releases(tmp_path, monkeypatch,
                                                                                       damage):
    """metrics.jsonl of the replaced run shows 3 releases (epsilon at step 3); its status.json is damaged. The
    --restart must compose them (from metrics.jsonl / the checkpoint) or refuse; it composes nothing."""
    run = tmp_path / "run"
    crashed_run(run, monkeypatch)
    (run / "status.json").write_text(damage)
    try:
        summary = train(prepare(cfg(run, steps=2), restart=True))
    except SlimtuneError:
        return
    assert summary["epsilon"] == pytest.approx(reference_epsilon(summary, 2 + 3), rel=1e-6)


# -- 3. abandoned entries of two runs under one key --------------------------------------------------------------------
def test_a_restarted_runs_own_abandoned_releases_do_not_replace_the_carried_ones(tmp_path, monkeypatch):
    """A: steps 1-4 released, checkpoint at 2, crash; resume (abandoned (0, 2): steps 3-4) fails at its first step.
    --restart B: carries A's (0, 2) entry and A's 2 trajectory steps; releases 1-4, checkpoint at 2, crash; resume
    to 6 adds B's own (0, 2) entry, which replaces A's. Releases: A 4, B 6 + 2 abandoned = 12; reported: 10."""
    run = tmp_path / "run"
    status_a = restarted_after_a_failed_resume(run, monkeypatch)
    assert [(d["attempt"], d["from_step"], d["steps"]) for d in status_a["abandoned"]] == [(0, 2, 2)]
    summary = train(prepare(cfg(run, steps=6, checkpoint_every=2), resume=True))
    assert summary["steps"] == 6
    assert summary["epsilon"] == pytest.approx(reference_epsilon(summary, 4 + 6 + 2), rel=1e-6)


# -- 4. a key file half written ----------------------------------------------------------------------------------------
def test_a_crash_while_the_key_file_is_written_does_not_block_the_directory(tmp_path, monkeypatch):
    """create_key_file opens RUN/secret.key with O_EXCL and then writes it: a kill in between leaves an empty file,
    which check_only_claim_files accepts and read_key_file refuses on every later attempt. Writing a temporary 0600
    file and linking it into place (os.link refuses an existing name) never leaves a partial key."""
    import slimtune.privacy.secret as secret
    out = tmp_path / "run"
    command = ["train", "--data", TRAIN, "--model", "tiny-llama", "--quiet", "--eval-every", "0", "--steps", "2",
               "--optimizer", "dpzero", "--batch-size", "4", "--out", out]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(secret.json, "dump", killed)
    assert cli(*command).exit_code != 0
    monkeypatch.undo()
    assert not (out / "secret.key").exists() or (out / "secret.key").stat().st_size > 0
    res = cli(*command)
    assert res.exit_code == 0, res.output


# -- 5. a damaged checkpoint -------------------------------------------------------------------------------------------
def test_resume_from_a_damaged_trainer_state_is_one_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    crashed_run(run, monkeypatch, 4, checkpoint_every=2)
    (run / "checkpoint" / "trainer_state.json").write_text("")
    message = one_line_error(cli("train", "--resume", "--out", run, "--quiet"))
    assert "trainer_state.json" in message


def test_the_key_file_is_written_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    """os.link fails with EPERM / ENOTSUP on some filesystems (FAT, some network mounts): the key is then created
    exclusively in place, still owner-readable only and still never over an existing file."""
    import os
    import stat

    import slimtune.privacy.secret as secret

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(secret.os, "link", no_links)
    key = secret.create_key_file(tmp_path / "secret.key")
    path = tmp_path / "secret.key"
    assert secret.read_key_file(path)._key == key._key  # the key written is the key returned
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]  # no temporary left
    with pytest.raises(SlimtuneError, match="already there"):
        secret.create_key_file(path)
    assert os.path.getsize(path) > 0
