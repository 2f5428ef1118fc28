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
    """Make 'available memory' fall between MeZO+LoRA's and AdamW+LoRA's predicted peaks (on a tiny model they are
    about a megabyte apart: the process baseline is held fixed, or its drift between two reads decides)."""
    monkeypatch.setattr(memory_model, "held_mb", lambda *a, **k: 0.0)  # the library baseline alone
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


# -- issue 38: the planner decides (dtype, quantized base, configs of any size) ----------------------------------------
def llama_7b_config(tmp_path):
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False).save_pretrained(tmp_path / "7b")
    return tmp_path / "7b" / "config.json"


def test_a_7b_config_is_planned_on_the_meta_device(tmp_path):
    """Llama-2-7B's shape: AdamW full predicted far over 24 GB in any dtype, MeZO full in bf16 near the bf16 weights
    (13.5 GB), MeZO + LoRA on an int4 base under 6 GB."""
    model = memory_model.model_for_planning(str(llama_7b_config(tmp_path)))
    assert next(model.parameters()).device.type == "meta"
    peak = lambda opt, peft, dtype="float32", quant=None: memory_model.predict_run_mb(
        model, opt, peft, 8, 2, 64, "cpu", dtype=dtype, base_quant=quant)[0]
    assert peak("adamw", "none", "bfloat16") > 24 * 1024 and peak("adamw", "none") > 2 * 24 * 1024
    weights_bf16 = memory_model.ModelShape.from_model(model).total_params * 2 / 2**20
    assert weights_bf16 < peak("mezo", "none", "bfloat16") < 1.1 * (weights_bf16 + memory_model.RUNTIME_MB_CPU)
    assert peak("mezo", "lora", "bfloat16", "int4") < 6 * 1024 < peak("mezo", "lora", "bfloat16", "int8")


def test_plan_ranks_what_fits_by_expected_quality(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_model, "available_mb", lambda device: 16 * 1024 / memory_model.HEADROOM)
    res = CliRunner().invoke(app, ["plan", "--model", str(llama_7b_config(tmp_path)), "--batch-size", "2",
                                   "--max-length", "64"], env={"COLUMNS": "200"})  # (lead) rows unwrapped
    assert res.exit_code == 0, res.output
    ranked = res.stdout[res.stdout.index("what fits, best"):].splitlines()
    methods = [line for line in ranked if "--optimizer" in line]
    # (lead) the flags carry the planned shape (review 84); 14 GB: the best that fits in 16 GB
    assert "--optimizer adamw --peft lora --r 8 --batch-size 2 --max-length 64 --dtype bfloat16" in methods[0]
    assert not any("--peft none" in line and "adamw" in line for line in methods)
    assert any("--base-quant int4" in line for line in methods)


def test_plan_refuses_a_missing_config_file(tmp_path):
    res = CliRunner().invoke(app, ["plan", "--model", str(tmp_path / "nope.json")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_train_suggests_the_best_method_that_fits(tmp_path, demo_paths, monkeypatch):
    """Refused runs name the first method of the quality order that fits, as train flags, and it does fit."""
    between_zo_and_backprop(monkeypatch, 8, 12)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=demo_paths[0], model="tiny-llama", optimizer="adamw",
                      optim=OptimizerArgs(lr=1e-3), peft=PeftSettings("lora", r=2), steps=1, batch_size=8,
                      progress=False)
    with pytest.raises(SlimtuneError, match=r"best that fits: --optimizer \S+ --peft \S+.*MB\); what fits") as err:
        prepare(cfg)
    model, _ = load_model_and_tokenizer("tiny-llama", texts=["a b c"])
    rows = memory_model.ranked_methods(model, 8, 12, "cpu", 2)
    best = next(r for r in rows if r["fits"])
    assert memory_model.as_flags(best) in str(err.value)
    assert all(not r["fits"] for r in rows[:rows.index(best)])


def test_plan_takes_fo_layers_for_its_hybrid_rows():
    """`plan` planned every hybrid with 2 blocks by backprop while `train --fo-layers k` used k (review 9): the rows
    follow --fo-layers, a value beyond the model's blocks is one line, and the flags it proposes carry it."""
    model, _ = load_model_and_tokenizer("tiny-llama", texts=["a b c"])
    peaks = {k: {r["optimizer"]: r["peak_mb"] for r in memory_model.plan_rows(model, 4, 32, "cpu", 2, fo_layers=k)
                 if r["peft"] == "lora"} for k in (1, 2)}
    assert peaks[2]["hybrid"] > peaks[1]["hybrid"] and peaks[2]["mezo"] == peaks[1]["mezo"]
    assert memory_model.as_flags({"optimizer": "hybrid", "peft": "lora", "fo_layers": 1}).endswith("--fo-layers 1")
    res = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--fo-layers", "3"])
    assert res.exit_code == 2 and "--fo-layers 3" in res.stderr and "2 blocks" in res.stderr, res.output
