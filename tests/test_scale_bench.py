"""benchmarks/scale.py (issue 38, item 3) at a tiny size: models built from configs on the meta device and
materialised cheaply (dense, or quantized layer by layer), one configuration measured in-process, the planner's
verdict and the README table; the Gemma 3 270M rows of benchmarks/defaults.py (item 5)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {"llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False),
        "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, vocab_size=300)}


@pytest.fixture
def scale(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import scale as module
    for arch, values in TINY.items():
        monkeypatch.setitem(module.CONFIGS[arch], "tiny", values)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "scale.json")
    return module


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_a_built_model_matches_its_config_and_computes_finite_losses(scale, arch):
    model = scale.build(arch, "tiny", "bfloat16", None)
    meta = scale.meta_model(arch, "tiny", torch.bfloat16)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in meta.named_parameters()]
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    spec = dict(arch=arch, size="tiny", method="mezo-full-bf16", batch=2, seq=16, steps=2, threads=1)
    out = scale.child(spec)
    assert out["forward_s"] > 0 and out["step_s"] > 0 and torch.isfinite(torch.tensor(out["loss"]))
    assert out["trainable"] == sum(p.numel() for p in model.parameters())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="the optional extra quant")
def test_a_quantized_base_is_built_layer_by_layer_and_trains_lora(scale):
    spec = dict(arch="llama", size="tiny", method="mezo-lora-int4", batch=2, seq=16, steps=2, threads=1)
    out = scale.child(spec)
    assert out["trainable"] == 2 * (8 * (64 + 64) + 8 * (32 + 64))  # 2 layers x LoRA r 8 on q_proj (64x64), v_proj (32x64)
    model = scale.build("llama", "tiny", "bfloat16", "int4")
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 2 * 7


def test_the_planner_refuses_before_a_process_is_started(scale, monkeypatch):
    monkeypatch.setattr(scale.subprocess, "Popen", lambda *a, **k: pytest.fail("started a process"))
    spec = dict(arch="llama", size="7b", method="adamw-full", batch=2, seq=64, steps=3, threads=1)
    row = scale.run_one(spec, budget=24 * 1024)
    assert row["status"] == "refused by the planner" and row["predicted_mb"] > 24 * 1024
    assert row["params"] == pytest.approx(6.74e9, rel=0.01)


def test_table_rows_show_measured_over_planned_and_refusals(scale):
    rows = {"a": dict(arch="llama", size="7b", method="adamw-full", predicted_mb=110000.0, params=6.7e9,
                      status="refused by the planner"),
            "b": dict(arch="llama", size="1b", method="mezo-lora-int4", predicted_mb=1500.0, params=1.2e9,
                      status="ran", peak_rss_mb=1600.0, measured_over_predicted=1600 / 1500, step_s=3.0,
                      step_over_two_forwards=1.1)}
    scale.RESULTS.write_text(json.dumps({"rows": rows}))
    table = scale.scale_table().splitlines()
    assert table[2].startswith("| llama-1b | 1.20B | mezo-lora-int4 | 1,500 | 1,600 | 1.07 | 3.0 | 1.10 |")
    assert table[3] == "| llama-7b | 6.70B | adamw-full | 110,000 | refused by the planner |  |  |  |"


def test_gemma_defaults_rows_run_gemma_and_are_judged_against_their_own_rows(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import defaults as d

    for name in ("gemma-adamw-lora", "gemma-mezo-lora", "gemma-dpzero-lora-eps6"):
        flags = d.RUNS[name][0]
        assert flags[flags.index("--model") + 1] == "gemma3-270m" and name in d.TARGETS
    row = lambda final, **kw: {"final_accuracy": final, "saved_adapter": "best (step 9)", "zero_shot_accuracy": 0.5,
                               "epsilon": None, **kw}
    res = {"adamw-lora": row(0.86), "gemma-adamw-lora": row(0.85), "gemma-mezo-lora": row(0.80),
           "gemma-dpzero-lora-eps6": row(0.79, epsilon=5.9)}
    assert d.verdict("gemma-adamw-lora", res)[0] is True  # 0.85 >= 0.86 - 0.02
    assert d.verdict("gemma-mezo-lora", res)[0] is False  # 0.80 < 0.85 - 0.04
    assert d.verdict("gemma-dpzero-lora-eps6", res)[0] is True
    res.update({"mezo-lora": row(0.83), "mezo-lora-bf16": row(0.815)})
    assert d.RUNS["mezo-lora-bf16"][0][-2:] == ["--dtype", "bf16"]
    assert d.verdict("mezo-lora-bf16", res)[0] is False  # 0.815 < 0.83 - 0.01: bf16 costs more than a point
