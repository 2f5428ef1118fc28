"""LoRA on a frozen int8 / int4 base (issue 38, item 2; slimtune/models/quantize.py, bitsandbytes): the blocks' linear
layers are quantized, LoRA trains on top through the quantized forward, the base never changes, and a run prints
nothing of the library."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune import SlimtuneError
from slimtune.data import get_task, read_examples
from slimtune.models import load_model_and_tokenizer
from slimtune.optim import OptimizerArgs, build_optimizer
from slimtune.peft import PeftSettings, apply_peft
from slimtune.report.memory_model import ModelShape
from slimtune.train import TrainConfig, prepare, train
from slimtune.train.classification import encode, label_token_ids, per_example_losses

ROOT = Path(__file__).resolve().parents[1]
needs_bnb = pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None,
                               reason='bitsandbytes is the optional extra "quant"')


def quantized_tiny(demo_paths, kind, dtype=torch.float32):
    task = get_task("sst2")
    examples = read_examples(demo_paths[0], task)[:16]
    model, tok = load_model_and_tokenizer("tiny-llama", dtype, texts=[e.prompt for e in examples], base_quant=kind)
    batch, ids = encode(tok, examples), label_token_ids(tok, task)
    return model, (lambda m: per_example_losses(m, batch, ids))


@needs_bnb
@pytest.mark.parametrize("kind,dtype", [("int8", torch.float32), ("int4", torch.float32), ("int4", torch.bfloat16)])
def test_lora_trains_on_a_quantized_base_that_stays_untouched(demo_paths, kind, dtype):
    model, losses = quantized_tiny(demo_paths, kind, dtype)
    layers = {type(m).__name__ for m in model.modules()}
    assert ("Linear8bitLt" if kind == "int8" else "Linear4bit") in layers
    assert any(p.dtype in (torch.int8, torch.uint8) for p in model.parameters())
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype.is_floating_point}
    quantized = [m for m in model.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")]
    before = layer_outputs(quantized, dtype)
    model = apply_peft(model, PeftSettings("lora", r=4))
    model.eval()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    opt = build_optimizer("mezo", model, OptimizerArgs(lr=1e-2, eps=1e-2))
    with torch.no_grad():
        start = losses(model).mean().item()
    for _ in range(25):
        opt.step(lambda: losses(model))
    with torch.no_grad():
        end = losses(model).mean().item()
    assert end < start - 0.01, (start, end)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], dense[n]) for n in dense)  # embeddings, norms, head: unchanged
    after = layer_outputs(quantized, dtype)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the quantized layers compute what they did


def layer_outputs(layers, dtype):
    """Each quantized layer's output on a fixed input (bitsandbytes repacks 4-bit weights for its CPU kernel on
    the first inference call, so the stored bytes change layout; what the layer computes must not)."""
    outs = []
    with torch.inference_mode():
        for layer in layers:
            x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
            layer.eval()
            layer(x)
            outs.append(layer(x).clone())
    return outs


@needs_bnb
def test_the_planner_sizes_a_quantized_model_as_its_dense_self(demo_paths):
    dense, _ = load_model_and_tokenizer("tiny-llama", texts=["a b c"])
    quantized, _ = load_model_and_tokenizer("tiny-llama", texts=["a b c"], base_quant="int4")
    a, b = ModelShape.from_model(dense), ModelShape.from_model(quantized)
    assert a == b and a.quantizable > 0 and a.largest_linear == 32 * 64


@needs_bnb
@pytest.mark.parametrize("quant", [["--base-quant", "int8", "--dtype", "bf16"], []])
def test_runs_print_nothing_of_bitsandbytes(tmp_path, demo_paths, quant):
    """With the extra installed, `import peft` imports bitsandbytes in every LoRA run, quantized or not."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "slimtune.cli", "train", "--data", demo_paths[0], "--model",
                          "tiny-llama", "--optimizer", "mezo", "--peft", "lora", *quant, "--steps", "2",
                          "--batch-size", "4", "--save", "last", "--quiet", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    for noise in ("bitsandbytes", "kernels", "MatMul8bitLt", "Failed to load"):
        assert noise not in res.stderr + res.stdout
    assert json.loads((out / "config.json").read_text())["base_quant"] == (quant[1] if quant else None)


def test_base_quant_is_refused_without_lora_before_loading(tmp_path, demo_paths, monkeypatch):
    import slimtune.train.objectives as objectives
    monkeypatch.setattr(objectives, "load_model_and_data", lambda *a, **k: pytest.fail("loaded the model"))
    cfg = TrainConfig(out_dir=str(tmp_path / "r"), train_data=demo_paths[0], model="tiny-llama", optimizer="mezo",
                      peft=PeftSettings("none"), base_quant="int4", steps=1, progress=False)
    with pytest.raises(SlimtuneError, match="--base-quant int4 trains LoRA .* use --peft lora"):
        prepare(cfg)


def test_base_quant_flag_applies_to_lora_only(tmp_path, demo_paths):
    from typer.testing import CliRunner

    from slimtune.cli import app
    res = CliRunner().invoke(app, ["train", "--data", demo_paths[0], "--model", "tiny-llama", "--peft", "svfit",
                                   "--base-quant", "int8", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--base-quant" in res.output and "lora" in res.output


def test_a_frozen_head_multiplies_one_matrix_not_a_copy_per_example(demo_paths):
    """logits_to_keep=1 hands the head a [B, 1, d] slice; with a frozen head (LoRA, quantized bases) torch.matmul would
    multiply by a [B, d, vocab] expanded copy of the weight unless the slice has plain strides (models/loading.py)."""
    model, losses = quantized_tiny(demo_paths, None)
    for p in model.parameters():
        p.requires_grad_(False)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].stride()))
    with torch.inference_mode():
        losses(model)
    hidden = model.config.hidden_size
    assert seen and seen[0][0] == hidden and seen[0][1:] == (hidden, 1)


@needs_bnb
def test_int4_layers_trim_the_heap_once_after_their_first_forward(demo_paths, monkeypatch):
    """bitsandbytes repacks a CPU NF4 weight on its first no-grad forward through int32 temporaries; the heap keeps
    them unless trimmed (scale.py measured 1.12x / 1.23x the planner's peak at 1B / 3B before, 1.00x after).
    Each int4 layer trims once, after its first forward, and then drops the hook."""
    from slimtune.models import quantize
    trims = []
    monkeypatch.setattr(quantize, "release_freed_memory", lambda: trims.append(1))
    model, losses = quantized_tiny(demo_paths, "int4")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    built = len(trims)  # one per layer while building
    with torch.no_grad():
        losses(model)
    assert len(trims) - built == len(layers)
    assert all(not m._forward_hooks for m in layers)
    with torch.no_grad():
        losses(model)
    assert len(trims) - built == len(layers)
