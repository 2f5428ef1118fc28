"""Review 62: settings you can trust, attacked as a careless user (config files, a run's config.json, --resume from
another directory, federate's client-level DP). Each test fails on the code it was written against."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slimtune import SlimtuneError

from conftest import cli, one_line_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo"
TRAIN, DEV = str(DEMO / "sst2_demo_train.tsv"), str(DEMO / "sst2_demo_dev.tsv")
TINY = ["--model", "tiny-llama"]


def resolved(res) -> dict:
    """The configuration a `train --dry-run` prints (the JSON after the hyper-parameters line)."""
    assert res.exit_code == 0, res.output[-800:]
    return json.loads(res.stdout[res.stdout.index("\n{") + 1:])


def run_config(tmp_path, *flags) -> dict:
    """A run's config.json as a run stores it (the nested TrainConfig): that of a dry run with these flags."""
    return resolved(cli("train", "--data", TRAIN, *TINY, "--steps", "4", "--batch-size", "4", "--out",
                        tmp_path / "source", "--dry-run", *flags))


# -- a run's own config.json, edited -----------------------------------------------------------------------------------
def test_a_misspelt_key_in_a_runs_config_json_is_refused(tmp_path):
    """`slimtune train --config RUN/config.json` after editing the file: settings.train.from_run_config keeps only the
    keys it knows (`return {k: v for k, v in flat.items() if k in known}`), so `"stepz": 5` or `"optim": {"lrr": 0.5}`
    is dropped silently and the run trains with the old value (exit 0). A flat settings file refuses the same key as
    'unknown setting'."""
    for edit in ({"stepz": 5}, {"optim": "lrr"}):
        stored = run_config(tmp_path, "--optimizer", "mezo")
        if "optim" in edit:
            stored["optim"]["lrr"] = 0.5
        else:
            stored.update(edit)
        path = tmp_path / "config.json"
        path.write_text(json.dumps(stored))
        message = one_line_error(cli("train", "--config", path, "--out", tmp_path / "new", "--dry-run"))
        assert "config.json" in message and ("stepz" in message or "lrr" in message), message


def test_an_epsilon_added_to_a_non_private_runs_config_json_is_not_dropped(tmp_path):
    """A MeZO run's config.json edited into a private run: `"optimizer": "dpzero"` and `"epsilon": 1.0` (the flat
    key every other settings file takes). from_run_config pops every DP setting when the stored "privacy" is null
    ("a non-private run: the DP settings stay at their defaults"), so the epsilon the user wrote is dropped and the run
    is calibrated to the default budget, epsilon 6 (exit 0): six times the privacy loss asked for."""
    stored = run_config(tmp_path, "--optimizer", "mezo")
    assert stored["privacy"] is None
    stored.update(optimizer="dpzero", epsilon=1.0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(stored))
    res = cli("train", "--config", path, "--out", tmp_path / "new", "--dry-run")
    if res.exit_code == 0:
        assert resolved(res)["privacy"]["target_epsilon"] == 1.0, "epsilon 1.0 in the file became the default 6"
    else:
        assert "epsilon" in one_line_error(res)


def test_a_setting_given_twice_in_a_runs_config_json_is_refused(tmp_path):
    """config.json with both `"epsilon": 1.0` (flat) and `"privacy": {"target_epsilon": 2.0}` (nested), or both `"lr"`
    and `"optim": {"lr"}`: from_run_config flattens them onto one name and the later key wins silently (the run trains
    at epsilon 2 and lr 1e-3, exit 0). A flat file refuses `lr` and `LR`/`l-r` given twice."""
    stored = run_config(tmp_path, "--optimizer", "dpzero", "--epsilon", "2")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"epsilon": 1.0, "lr": 0.5, **stored}))
    message = one_line_error(cli("train", "--config", path, "--out", tmp_path / "new", "--dry-run"))
    assert "twice" in message or "epsilon" in message, message


# -- flat config files ----------------------------------------------------------------------------------------------
def test_an_unfilled_epsilon_in_a_yaml_config_is_refused_not_the_default_budget(tmp_path):
    """`epsilon: ${EPS}` rendered (envsubst) with EPS unset is `epsilon:`, YAML null. Review 12 refused null for
    settings that may not be None (`out:`, `optimizer:`), but epsilon may be None (its default), so the private run
    is silently calibrated to the default epsilon 6 (exit 0), where `--epsilon ""` is refused."""
    config = tmp_path / "private.yaml"
    config.write_text("optimizer: dpzero\nepsilon:\n")
    res = cli("train", "--config", config, "--data", TRAIN, *TINY, "--out", tmp_path / "new", "--dry-run")
    message = one_line_error(res)
    assert "private.yaml" in message and "epsilon" in message, message


def test_a_missing_data_file_named_in_a_config_file_names_that_file(tmp_path):
    """`data: train.tsv` in a config file, run from another directory (relative paths are read from the working
    directory, which nothing documents): the error is '--data train.tsv: no such file' (TrainSettings.check ->
    require_input_file(self.data, "--data")), naming a flag the user never typed and not the file the value came from.
    Type and range errors of the same key name the file ('run.yaml: setting ...')."""
    config = tmp_path / "run.yaml"
    config.write_text("data: no-such-train.tsv\n")
    message = one_line_error(cli("train", "--config", config, *TINY, "--out", tmp_path / "new", "--dry-run"))
    assert "run.yaml" in message and "no-such-train.tsv" in message, message


# -- resume ------------------------------------------------------------------------------------------------------------
def test_resume_from_another_directory_does_not_train_on_another_file(tmp_path):
    """A run started with a relative `--data train.tsv` records `"train_data": "train.tsv"`; `--resume` from another
    working directory reads that name there: another file with the same name is trained on, and resume.differences
    sees the same string (no refusal, no record of the change: 'changed': {'steps': [2, 4]} only). Resume is meant to
    be 'exact or refused'."""
    rows = (DEMO / "sst2_demo_train.tsv").read_text().splitlines()
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "train.tsv").write_text("\n".join(rows[:41]) + "\n")
    (second / "train.tsv").write_text("\n".join([rows[0], *rows[41:81]]) + "\n")
    run = tmp_path / "run"
    cwd = os.getcwd()
    try:
        os.chdir(first)
        res = cli("train", "--data", "train.tsv", *TINY, "--steps", "2", "--batch-size", "2", "--eval-every", "0",
                  "--save", "last", "--checkpoint-every", "1", "--out", run, "--quiet", "--r", "2")
        assert res.exit_code == 0, res.output[-800:]
        os.chdir(second)
        res = cli("train", "--resume", "--out", run, "--steps", "4", "--dry-run")
    finally:
        os.chdir(cwd)
    message = one_line_error(res)
    assert "train" in message, message


# -- federate ----------------------------------------------------------------------------------------------------------
def test_a_client_dp_delta_without_client_dp_noise_is_refused():
    """`slimtune federate --client-dp-clip 1 --client-dp-delta 1e-6` (the noise forgotten): --client-dp-delta applies
    to `client_dp` (clip > 0), but with --client-dp-noise 0 FederatedConfig.client_level_dp is False, no accountant is
    built (server_app._client_dp_accountant) and the delta is never used: accepted silently, and the run releases
    clipped but un-noised aggregates the user set a DP delta for."""
    from slimtune.settings.federate import FederateSettings
    with pytest.raises(SlimtuneError, match="client-dp"):
        FederateSettings.build({"data": TRAIN, "model": "tiny-llama", "client_dp_clip": 1.0,
                                "client_dp_delta": 1e-6})
