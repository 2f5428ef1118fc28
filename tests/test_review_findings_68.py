"""Review 68 (scale features as a careless user uses them: --dtype bf16/fp16, --base-quant int8/int4, merge/eval of
what they produce). Each test fails on the code it was written against.

Checked and found working (no test): every optimizer x PEFT x {bf16, int8, int4} pair `slimtune train` accepts
(126 of 400: backprop on 16-bit trainable weights and --base-quant without LoRA are refused in --dry-run, one line
naming the flag) trains 2 steps on tiny-llama, records the dtype/base_quant it trained with in adapter/slimtune.json,
saves the trainable tensors in the dtype it trained them in, and `slimtune eval --adapter` reproduces the run's
final_eval loss exactly (PiSSA in bf16 excepted: known, warned, review 56); bf16 runs of lozo-m, hizoo, hizoo-l,
sparse-mezo, fzoo, svfit, adapter, hybrid+int8, mezo+int4, --perturbation pool and --n-spsa 2 resume bit for bit.
"""

from __future__ import annotations

import json
import sys

import pytest

from test_review_findings import DEV, TRAIN, cli

needs_bnb = pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None,
                               reason='bitsandbytes is the optional extra "quant"')


def evaluate(*args) -> dict:
    res = cli("eval", "--data", DEV, *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output[res.output.index("{"):])


def test_a_merged_bf16_checkpoint_is_evaluated_in_bf16(tmp_path):
    """MEDIUM-LOW. `slimtune merge` of a `--dtype bf16` run writes a bf16 checkpoint and records "dtype": "bfloat16"
    in merged/slimtune.json (docs/how-to/export.md), but `slimtune eval --model merged/` (and generate, and
    `train --model merged/`'s default) loads every local checkpoint with load_model_and_tokenizer's default float32:
    the bf16 weights are upcast and the model computed in fp32, another model than the run evaluated (and twice the
    memory: a 7B bf16 merge takes 28 GB to evaluate). With --peft none nothing is merged arithmetically, so the
    merged model IS the run's: its eval must equal the run's final_eval (0.6941301 vs 0.6941486 today; loading the
    merged directory in bf16 gives exactly the run's number)."""
    run = tmp_path / "run"
    res = cli("train", "--data", TRAIN, "--eval-data", DEV, "--model", "tiny-llama", "--optimizer", "mezo",
              "--peft", "none", "--dtype", "bf16", "--steps", 2, "--eval-every", 2, "--batch-size", 4,
              "--save", "last", "--quiet", "--out", run)
    assert res.exit_code == 0, res.output
    final = json.loads((run / "summary.json").read_text())["final_eval"]["loss"]
    assert evaluate("--model", "tiny-llama", "--adapter", run / "adapter")["loss"] == pytest.approx(final, rel=1e-9)
    res = cli("merge", run / "adapter", "--model", "tiny-llama", "--out", tmp_path / "merged")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "merged" / "slimtune.json").read_text())["dtype"] == "bfloat16"
    got = evaluate("--model", tmp_path / "merged")["loss"]
    assert got == pytest.approx(final, rel=1e-9), \
        f"eval of the merged bf16 checkpoint ran in float32: {got!r} vs the run's {final!r}"


@needs_bnb
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_base_quant_on_a_model_without_nn_linear_layers_is_not_silently_dense(tmp_path, kind):
    """MEDIUM (flag silently ignored). quantize.quantizable() takes `type(m) is nn.Linear` only; GPT-2's blocks
    (tiny-gpt2, and any local GPT-2-family checkpoint) are transformers' Conv1D, so `--model tiny-gpt2 --base-quant
    int4` quantizes nothing: LoRA trains on the dense fp32 base (no memory saved), while config.json and
    adapter/slimtune.json record base_quant int4 and `slimtune plan` ranks `--base-quant int4` rows for it. Expected:
    quantize the Conv1D layers (their weight is the transposed Linear's), or refuse with one line naming
    --base-quant before training."""
    from slimtune import SlimtuneError
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.train import TrainConfig, prepare

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=TRAIN, model="tiny-gpt2", optimizer="mezo",
                      optim=OptimizerArgs(lr=1e-3, eps=1e-2), peft=PeftSettings("lora", r=2), base_quant=kind,
                      steps=2, batch_size=4, eval_every=0, progress=False)
    try:
        run = prepare(cfg)
    except SlimtuneError as exc:
        assert "--base-quant" in str(exc) and "\n" not in str(exc), str(exc)
        return
    layers = {type(m).__name__ for m in run.model.modules()}
    assert layers & {"Linear8bitLt", "Linear4bit"}, \
        f"--base-quant {kind} on tiny-gpt2 accepted, but no layer was quantized: {sorted(layers)}"


@needs_bnb
def test_eval_of_a_quantized_adapter_without_bitsandbytes_names_the_adapter(tmp_path, monkeypatch):
    """LOW (message). `slimtune eval --adapter RUN/adapter` of an int4 run on a machine without bitsandbytes says
    'error: --base-quant needs bitsandbytes: ...': eval has no --base-quant flag (the quantization comes from the
    adapter's slimtune.json), so the line names a flag the user never gave and cannot change. Expected: one line
    naming the adapter (its recorded int4 base) and the extra to install."""
    run = tmp_path / "run"
    res = cli("train", "--data", TRAIN, "--model", "tiny-llama", "--optimizer", "mezo", "--peft", "lora",
              "--base-quant", "int4", "--steps", 1, "--eval-every", 0, "--batch-size", 4, "--save", "last",
              "--quiet", "--out", run)
    assert res.exit_code == 0, res.output
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    res = cli("eval", "--data", DEV, "--model", "tiny-llama", "--adapter", run / "adapter")
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "slimtune[quant]" in line and str(run / "adapter") in line, line
