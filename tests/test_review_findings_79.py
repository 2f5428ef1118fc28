"""Review 79: after training — generate, merge, export, report — driven by a careless user and an adversary (tampered
adapter files). Only behaviour that breaks the project's rules is here: a damaged adapter must be one line with exit
code 2 before any output, never a silent base model; a verification must not pass a model it did not check."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DEMO, cli, one_line_error


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A finished one-step LoRA run on tiny-llama (the adapter, its tokenizer and slimtune.json, as train writes them)."""
    run = tmp_path_factory.mktemp("r79") / "run"
    res = cli("train", "--model", "tiny-llama", "--data", DEMO / "sst2_demo_train.tsv", "--steps", 1,
              "--batch-size", 4, "--eval-every", 0, "--quiet", "--out", run)
    assert res.exit_code == 0, res.output[-800:]
    return run / "adapter"


def tampered(adapter: Path, tmp_path: Path, weights=None, config=None, raw_config: str | None = None) -> Path:
    """A copy of the adapter with its weights (a function of the saved tensors) or adapter_config.json changed."""
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    if weights is not None:
        save_file(weights(load_file(str(adapter / "adapter_model.safetensors"))),
                  str(copy / "adapter_model.safetensors"))
    if config is not None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps(config(cfg)))
    if raw_config is not None:
        (copy / "adapter_config.json").write_text(raw_config)
    return copy


TAMPERINGS = {
    # the file holds no tensors at all: peft leaves every LoRA pair at its initialisation (B = 0), i.e. the base model
    "empty weights file": dict(weights=lambda w: {}),
    # every lora_B tensor missing: the same, B = 0
    "lora_B tensors missing": dict(weights=lambda w: {k: v for k, v in w.items() if "lora_B" not in k}),
    # tensors under other names (another model's layer names): none is loaded, each is ignored
    "tensors renamed": dict(weights=lambda w: {k.replace("layers", "blocks"): v for k, v in w.items()}),
    # the config targets q_proj only: the file's v_proj tensors are dropped without a word
    "config targets fewer modules": dict(config=lambda c: {**c, "target_modules": ["q_proj"]}),
}


@pytest.mark.parametrize("how", list(TAMPERINGS))
def test_merge_refuses_a_lora_adapter_whose_tensors_do_not_all_load(tmp_path, adapter, how):
    """merge of an adapter whose adapter_model.safetensors lacks tensors its config needs (or holds tensors no layer
    takes) exits 0 and writes "merged checkpoint written to ..." — the base model, or part of the adapter — where
    slimtune's own adapters (peft/tuner.py: load, "every saved tensor must find its layer and vice versa") and whole
    checkpoints (models/loading.py: load_local, missing keys) are refused. peft only warns ("Found missing adapter
    keys"). Expected: one line naming the adapter, exit 2, nothing written."""
    bad = tampered(adapter, tmp_path, **TAMPERINGS[how])
    out = tmp_path / "merged"
    res = cli("merge", bad, "--out", out)
    line = one_line_error(res)
    assert str(bad) in line or "adapter_model.safetensors" in line
    assert not out.exists()


@pytest.mark.parametrize("how", ["empty weights file", "tensors renamed"])
def test_generate_refuses_a_lora_adapter_whose_tensors_do_not_load(tmp_path, adapter, how):
    """generate (and eval: the same loader, peft/registry.py read_adapter) with the same tampered adapter answers with
    the base model's completion, exit 0: the user believes they see their fine-tuned model."""
    bad = tampered(adapter, tmp_path, **TAMPERINGS[how])
    out = tmp_path / "gen.jsonl"
    res = cli("generate", "--adapter", bad, "--prompt", "a great movie", "--max-new-tokens", 2, "--output", out)
    one_line_error(res)
    assert not out.exists()


@pytest.mark.parametrize("raw", ["{not json", "[]"])
def test_a_damaged_adapter_config_is_named_not_blamed_on_the_base_model(tmp_path, adapter, raw):
    """adapter_config.json that is not JSON (or not an object) is reported as "this LoRA adapter does not fit the model
    (Expecting property name ...); use the base model it was trained on": the file is not named and the advice sends
    the user after the wrong thing (the base is the right one). Expected: the line names adapter_config.json and does
    not tell them to change the base model."""
    bad = tampered(adapter, tmp_path, raw_config=raw)
    line = one_line_error(cli("merge", bad, "--out", tmp_path / "merged"))
    assert "adapter_config.json" in line, line
    assert "use the base model it was trained on" not in line, line


def test_export_verification_does_not_pass_a_model_whose_logits_are_nan(tmp_path):
    """export's verification (export/gguf.py: compare_logits) takes max(worst, nan), which keeps `worst` (every
    comparison with NaN is false), and argmax of all-NaN rows agrees with itself: an adapter whose weights are NaN (a
    diverged or damaged one) is exported with "max_abs_diff_over_std": 0.0, "top1_agreement": 1.0, "verified": true,
    exit 0, and a useless .gguf. Expected: not verified (exit 2, no file). Uses test_export's approach: a tiny llama
    with SmolLM2's tokenizer, which llama.cpp's converter knows."""
    from transformers import AutoTokenizer

    from slimtune.models.loading import SMOLLM2_GGUF, smollm2_gguf_dir, tiny_model
    from slimtune.peft import PeftSettings, apply_peft, save_peft

    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)
    model = apply_peft(tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id), PeftSettings("lora", r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(float("nan"))
    directory = tmp_path / "run" / "adapter"
    save_peft(model, directory)
    tok.save_pretrained(directory)
    out = tmp_path / "nan.gguf"
    res = cli("export", directory, "--model", "tiny-llama", "--quant", "f32", "--out", out)
    assert res.exit_code == 2, res.output[-600:]
    assert not out.exists()


def test_a_merged_checkpoint_holding_nan_is_refused_at_load(tmp_path, tiny, demo_paths):
    """(lead) The fixer's note: whole checkpoints (a --peft none run, a merge) loaded through models/loading.load_local
    got no finite check, so `eval` printed an accuracy of a NaN model (argmax of NaN rows) and generate produced
    garbage without a word. Every checkpoint directory read as a model is refused the way adapters are."""
    model, tok, _ = tiny
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "mlp" in n).fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan-model")
    tok.save_pretrained(tmp_path / "nan-model")
    res = cli("eval", "--model", tmp_path / "nan-model", "--data", demo_paths[1])
    line = one_line_error(res)
    assert "NaN or inf" in line and "nan-model" in line, line
