"""The planner covers every optimizer `slimtune train` takes, and a private run's refusal proposes only private
methods (a user told "best that fits: --optimizer adamw" for a DPZero run is told to drop its privacy)."""


import pytest
from typer.testing import CliRunner

from slimtune import SlimtuneError
from slimtune.cli import app
from slimtune.optim.methods import METHODS, OPTIMIZERS
from slimtune.report import memory_model



@pytest.fixture(scope="module")
def tiny():
    return memory_model.model_for_planning("tiny-llama")


def test_plan_rows_cover_every_optimizer_train_takes(tiny):
    rows = memory_model.plan_rows(tiny, 4, 32, "cpu", 2)
    planned = {r["optimizer"] for r in rows}
    assert planned == set(OPTIMIZERS), sorted(set(OPTIMIZERS) - planned)


def test_private_first_order_plans_its_per_example_gradients_above_its_base(tiny):
    rows = {(r["optimizer"], r["peft"]): r["peak_mb"] for r in memory_model.plan_rows(tiny, 16, 32, "cpu", 2)}
    assert rows["dp-sgd", "none"] > rows["sgd", "none"]
    assert rows["dphybrid", "lora"] > rows["hybrid", "lora"]


def test_a_private_runs_refusal_proposes_only_private_methods(tiny, monkeypatch):
    """DPZero + full parameters over budget: the suggestion and the 'what fits' list name private optimizers only."""
    peaks = {(r["optimizer"], r["peft"]): r["peak_mb"] for r in memory_model.plan_rows(tiny, 4, 32, "cpu", 2)}
    budget = (peaks["dpzero", "lora"] + peaks["dpzero", "none"]) / 2
    assert peaks["adamw", "lora"] < budget or peaks["mezo", "lora"] < budget  # a non-private method fits
    monkeypatch.setattr(memory_model, "available_mb", lambda device: budget / memory_model.HEADROOM)
    with pytest.raises(SlimtuneError) as err:
        memory_model.check_fits(tiny, "dpzero", "none", 2, 4, 32, "cpu")
    msg = str(err.value)
    named = msg[msg.index("best that fits"):] if "best that fits" in msg else msg[msg.index("what fits"):]
    offered = {word.split("+")[0] for word in named.replace(",", " ").split() if "+" in word}
    offered |= {named.split("--optimizer ")[1].split()[0]} if "--optimizer " in named else set()
    assert offered and all(METHODS[o].private for o in offered), msg
    assert "dpzero+lora" in msg, msg


def test_plan_private_ranks_only_private_methods(monkeypatch):
    monkeypatch.setattr(memory_model, "available_mb", lambda device: 64 * 1024)
    res = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--batch-size", "4", "--max-length", "32",
                                   "--r", "2", "--private"])
    assert res.exit_code == 0, res.output
    ranked = res.stdout[res.stdout.index("what fits"):]
    optimizers = [line.split("--optimizer ")[1].split()[0] for line in ranked.splitlines() if "--optimizer " in line]
    assert optimizers and all(METHODS[o].private for o in optimizers), optimizers
    assert "dpzero" in optimizers


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,peft,extra", [("dp-sgd", "none", ["--epsilon", "8"]),
                                                  ("lozo-m", "none", [])])
def test_a_newly_planned_rows_prediction_bounds_its_measured_peak(tmp_path, optimizer, peft, extra):
    from test_review_findings_44 import planned_and_measured
    got = planned_and_measured(tmp_path, "--optimizer", optimizer, "--peft", peft, *extra)
    assert got["predicted_mb"] >= got["peak_mb"], got


def test_a_model_without_linear_blocks_is_never_planned_on_a_quantized_base(monkeypatch):
    """(review 68) GPT-2's blocks are Conv1D: --base-quant quantizes nothing there and train refuses it, so the
    planner neither ranks quantized-base rows for it nor plans its --base-quant table."""
    monkeypatch.setattr(memory_model, "available_mb", lambda device: 64 * 1024)
    gpt2 = memory_model.model_for_planning("tiny-gpt2")
    ranked = memory_model.ranked_methods(gpt2, 4, 32, "cpu", 2)
    assert ranked and not any(row["base_quant"] for row in ranked)
    with pytest.raises(SlimtuneError, match="--base-quant int4"):
        memory_model.plan_rows(gpt2, 4, 32, "cpu", 2, base_quant="int4")
