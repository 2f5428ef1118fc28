"""The memory planner (issue 16): `slimtune plan` marks what fits; `train` refuses a run predicted not to fit."""

import pytest
from typer.testing import CliRunner

from slimtune import SlimtuneError
from slimtune.cli import app
from slimtune.models import load_model_and_tokenizer
from slimtune.optim import OptimizerArgs
from slimtune.peft import PeftSettings, apply_peft, peft_summary
from slimtune.report import memory_model
from slimtune.train import TrainConfig, prepare


@pytest.mark.parametrize("method", ["lora", "svfit", "adapter", "none"])
def test_planned_trainable_counts_match_the_applied_peft(method):
    model, _ = load_model_and_tokenizer("tiny-llama", texts=["a b c"])
    planned = memory_model.trainable_count(model, method, 4)
    assert planned == peft_summary(apply_peft(model, PeftSettings(method, r=4)))["trainable_params"]


def between_zo_and_backprop(monkeypatch, batch, seq_len):
    """Make 'available memory' fall between MeZO+LoRA's and AdamW+LoRA's predicted peaks."""
    model, _ = load_model_and_tokenizer("tiny-llama", texts=["a b c"])
    peaks = {(r["optimizer"], r["peft"]): r["peak_mb"] for r in memory_model.plan_rows(model, batch, seq_len, "cpu", 2)}
    budget = (peaks["mezo", "lora"] + peaks["adamw", "lora"]) / 2
    monkeypatch.setattr(memory_model, "available_mb", lambda device: budget / memory_model.HEADROOM)


def test_plan_cli_marks_what_fits(monkeypatch):
    between_zo_and_backprop(monkeypatch, 4, 32)
    res = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--batch-size", "4", "--max-length", "32",
                                   "--r", "2"])
    assert res.exit_code == 0, res.output
    rows = [l for l in res.stdout.splitlines() if "lora" in l]
    assert any("mezo" in l and "yes" in l for l in rows) and any("adamw" in l and "no" in l for l in rows)


def test_train_refuses_a_run_predicted_not_to_fit(tmp_path, demo_paths, monkeypatch):
    between_zo_and_backprop(monkeypatch, 8, 12)  # the demo prompts are ~12 tokens
    cfg = dict(out_dir=str(tmp_path / "run"), train_data=demo_paths[0], model="tiny-llama", optimizer="adamw",
               optim=OptimizerArgs(lr=1e-3), peft=PeftSettings("lora", r=2), steps=1, batch_size=8, progress=False)
    with pytest.raises(SlimtuneError, match=r"predicted to peak at .* what fits: .*mezo\+lora.*--force"):
        prepare(TrainConfig(**cfg))
    assert not (tmp_path / "run" / "checkpoint").exists()
    prepare(TrainConfig(**cfg, force=True))  # --force: try anyway
