"""GGUF export: merge, convert with llama.cpp's converter, reload with transformers, logits match."""

import json

import pytest
import torch
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.models.loading import SMOLLM2_GGUF, smollm2_gguf_dir, tiny_model
from slimtune.peft import PeftSettings, apply_peft, save_peft

runner = CliRunner()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter (non-zero B) on a tiny llama that uses SmolLM2's tokenizer (the converter knows its vocab)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id)
    model = apply_peft(model, PeftSettings("lora", r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    out = tmp_path_factory.mktemp("run") / "adapter"
    save_peft(model, out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_export_writes_a_gguf_that_reproduces_the_merged_model(tmp_path, adapter_dir, quant):
    out = tmp_path / f"model-{quant}.gguf"
    res = runner.invoke(app, ["export", str(adapter_dir), "--model", "tiny-llama", "--quant", quant, "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["verified"] and out.exists() and report["bytes"] == out.stat().st_size
    assert report["max_abs_diff_over_std"] < (0.02 if quant == "f16" else 0.25) and report["top1_agreement"] >= 0.75

    from slimtune.models import load_model_and_tokenizer
    from transformers import AutoModelForCausalLM
    base, tok = load_model_and_tokenizer("tiny-llama", tokenizer_dir=str(adapter_dir))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    ids = tok("name[Aromi], area[riverside]", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        moved = (reloaded(input_ids=ids).logits - base(input_ids=ids).logits).abs().max()
    assert moved > 0.05  # the file holds the adapted model, not the base one

    again = runner.invoke(app, ["export", str(adapter_dir), "--model", "tiny-llama", "--out", str(out)])
    assert again.exit_code == 2 and "nothing was overwritten" in again.output


def test_bad_export_settings_are_one_line_errors(tmp_path, adapter_dir):
    for args, message in ((["--quant", "q4_k"], "--quant 'q4_k'"), (["--format", "onnx"], "--format 'onnx'")):
        res = runner.invoke(app, ["export", str(adapter_dir), "--model", "tiny-llama", "--out",
                                  str(tmp_path / "x.gguf"), *args])
        assert res.exit_code == 2 and message in res.output and not (tmp_path / "x.gguf").exists()
