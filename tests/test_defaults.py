"""Per-method defaults: unset hyper-parameters come from one table (optim/defaults.py), are printed and stored."""

import json

import pytest
from typer.testing import CliRunner

from slimtune import SlimtuneError
from slimtune.cli import app
from slimtune.optim import FO_OPTIMIZERS, HYBRID_OPTIMIZERS, ZO_OPTIMIZERS
from slimtune.optim.defaults import FAMILY, TABLE, defaults_for
from slimtune.peft.registry import PEFT_METHODS
from slimtune.optim.schedule import SCHEDULES

runner = CliRunner()


def test_every_optimizer_and_peft_pair_has_defaults():
    for optimizer in FO_OPTIMIZERS + ZO_OPTIMIZERS + HYBRID_OPTIMIZERS:
        for peft in PEFT_METHODS:
            d = defaults_for(optimizer, peft)
            assert d.lr > 0 and d.lr_scheduler in SCHEDULES and d.steps > 0 and d.source
            assert (d.eps is not None) == (optimizer not in FO_OPTIMIZERS)
    assert defaults_for("dpzero", "lora") == defaults_for("mezo", "lora")  # DP variants share their base's entry
    with pytest.raises(SlimtuneError, match="no default"):
        defaults_for("mezo", "prefix")
    assert len(TABLE) == len(set(FAMILY.values())) * len(PEFT_METHODS)
    assert defaults_for("dphizoo", "none") == defaults_for("hizoo", "none")
    assert defaults_for("hybrid", "pissa").setting("fo_lr") == defaults_for("adamw", "pissa").lr  # not swept
    assert defaults_for("hybrid", "lora").setting("fo_lr") == 3e-3  # defaults_sweep hybrid+lora's selection


def _train(tmp_path, demo_paths, name, *flags):
    res = runner.invoke(app, ["train", "--data", demo_paths[0], "--model", "tiny-llama", "--out",
                              str(tmp_path / name), "--quiet", "--peft", "lora", "--r", "2", "--batch-size", "8",
                              *flags])
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split()), json.loads((tmp_path / name / "config.json").read_text())


def test_unset_hyperparameters_come_from_the_table_and_are_printed_and_stored(tmp_path, demo_paths):
    out, cfg = _train(tmp_path, demo_paths, "zo", "--optimizer", "mezo", "--steps", "2")
    d = defaults_for("mezo", "lora")
    assert (cfg["optim"]["lr"], cfg["optim"]["eps"], cfg["lr_scheduler"], cfg["warmup_steps"], cfg["steps"]) == \
        (d.lr, d.eps, d.lr_scheduler, 0, 2)
    assert f"lr {d.lr:g}" in out and f"eps {d.eps:g}" in out and "table defaults for lr, eps" in out
    out, cfg = _train(tmp_path, demo_paths, "fo", "--optimizer", "adamw", "--steps", "40", "--lr", "1e-3")
    d = defaults_for("adamw", "lora")
    assert (cfg["optim"]["lr"], cfg["lr_scheduler"], cfg["warmup_steps"]) == (1e-3, d.lr_scheduler, 2)  # 5% of 40
    assert "lr 0.001" in out and ", eps " not in out and "table defaults for lr_scheduler, warmup_steps" in out


def test_a_config_written_with_defaults_reproduces_them(tmp_path, demo_paths):
    _, first = _train(tmp_path, demo_paths, "a", "--optimizer", "mezo", "--steps", "2")
    out, again = _train(tmp_path, demo_paths, "b", "--config", str(tmp_path / "a" / "config.json"))
    assert {**first, "out_dir": None} == {**again, "out_dir": None}
    assert "table defaults" not in out  # every value came from the file
