"""A GGUF file carries the prompt its adapter learned (llama.cpp users prompt it by hand: without the template and
label words the file is scored or prompted in another form than it was trained in). Fails on the code before it
(the file held the weights and the tokenizer only, and export said nothing of the prompt)."""

import json

import torch
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.models.loading import SMOLLM2_GGUF, smollm2_gguf_dir, tiny_model
from slimtune.peft import PeftSettings, apply_peft, save_peft
from slimtune.peft.registry import ADAPTER_META

runner = CliRunner()


def test_an_exported_gguf_records_the_learned_prompt(tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)
    model = apply_peft(tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id),
                       PeftSettings("lora", r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    adapter = tmp_path / "run" / "adapter"
    save_peft(model, adapter)
    tok.save_pretrained(adapter)
    prompt = {"task": "sst2", "template": "Review: {sentence}\nSentiment:", "label_words": "0=negative,1=positive"}
    meta = json.loads((adapter / ADAPTER_META).read_text()) if (adapter / ADAPTER_META).exists() else {}
    (adapter / ADAPTER_META).write_text(json.dumps({**meta, "model": "tiny-llama", **prompt}))
    out = tmp_path / "model.gguf"
    res = runner.invoke(app, ["export", str(adapter), "--model", "tiny-llama", "--quant", "f16", "--out", str(out),
                              "--no-verify"])
    assert res.exit_code == 0, res.output
    fields = GGUFReader(str(out)).fields
    assert "general.description" in fields, sorted(fields)
    field = fields["general.description"]
    description = bytes(field.parts[field.data[0]]).decode()
    recorded = json.loads(description.split("slimtune prompt: ", 1)[1])
    assert recorded == prompt, description
    assert "Review: {sentence}" in res.output  # said where the user reads it too
