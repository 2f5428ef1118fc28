"""Review 92 (scale settings on CPU: --dtype bf16/fp16, --base-quant, --perturbation, plan, resume, export/eval of
adapters on 16-bit / quantized bases, ZOTrainer bf16). Each test fails on the code it was written against.

1. A checkpoint directory that transformers saved quantized by bitsandbytes (`quantization_config` in its
   config.json: the common "*-bnb-4bit" checkpoints) given as `--model DIR` to train / eval / generate ends in
   "error: internal error (ValueError: You cannot cast a bitsandbytes model in a new `dtype` ...); please report
   it", exit code 1, after the model was loaded: no one-line refusal naming the checkpoint and what to do.
2. `slimtune plan --model DIR` (built on the meta device from its config.json) sizes such a checkpoint as a dense
   model and recommends trainings of it (full-parameter `--peft none`, an added `--base-quant`) that train refuses
   as in 1: the checkpoint's quantization_config is silently ignored.
3. The Python entry point the tests and the trainer use (`TrainConfig` -> `prepare` -> `train`): an FZOO run
   built from a TrainConfig with the default `OptimizerArgs()` cannot be resumed with the very same TrainConfig:
   `prepare` records n_spsa 8 (FZOO's default, filled in by optim/defaults.py) in config.json, and the resume
   compares it with the unresolved 1 ("settings differ ... (optim.n_spsa: 8 -> 1)"). The CLI and `slimtune.train`
   resume the same run fine.
"""

import importlib.util
import json
import re
import warnings

import pytest

from conftest import DEMO, cli, one_line_error

TRAIN = str(DEMO / "sst2_demo_train.tsv")
DEV = str(DEMO / "sst2_demo_dev.tsv")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason='bitsandbytes is the optional extra "quant"')


def bnb_checkpoint(tmp_path, kind: str):
    """tiny-llama saved by transformers as a bitsandbytes int8 / NF4 checkpoint (what from_pretrained(...,
    quantization_config=BitsAndBytesConfig(...)).save_pretrained writes: a config.json with quantization_config)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from slimtune.data import get_task, read_examples
    from slimtune.models import load_model_and_tokenizer

    examples = read_examples(TRAIN, get_task("sst2"))
    model, tok = load_model_and_tokenizer("tiny-llama", texts=[e.prompt for e in examples])
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32) if kind == "int4"
              else BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = AutoModelForCausalLM.from_pretrained(dense, quantization_config=config, device_map="cpu")
    out = tmp_path / f"bnb-{kind}"
    quantized.save_pretrained(out)
    tok.save_pretrained(out)
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    return out


# -- 1. a bitsandbytes checkpoint as --model: internal error ---------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_a_bitsandbytes_checkpoint_as_model_is_refused_in_one_line(tmp_path, command):
    model = bnb_checkpoint(tmp_path, "int4")
    if command == "train":
        args = ["train", "--data", TRAIN, "--model", model, "--optimizer", "mezo", "--peft", "lora", "--steps", 1,
                "--batch-size", 4, "--out", tmp_path / "run"]
    elif command == "eval":
        args = ["eval", "--data", DEV, "--model", model]
    else:
        args = ["generate", "--prompt", "Review: good", "--model", model, "--max-new-tokens", 2]
    res = cli(*args)
    assert "internal error" not in res.output + (res.stderr or ""), res.output[-600:]
    line = one_line_error(res)
    assert str(model) in line or "quantiz" in line.lower(), line


# -- 2. plan sizes a pre-quantized checkpoint as dense ---------------------------------------------------------------
def test_plan_does_not_recommend_training_a_prequantized_checkpoint_as_dense(tmp_path):
    """A config.json with a bitsandbytes quantization_config (a 4-bit checkpoint): the planner's table and ranked
    list size it as a dense float32 model and recommend `--peft none` (full-parameter) rows, which train cannot do
    on it (finding 1). Either refuse in one line, or leave such rows out."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
              "vocab_size": 1000, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                      "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}}
    directory = tmp_path / "bnb-4bit"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    res = cli("plan", "--model", directory, "--batch-size", 4, "--max-length", 32)
    if res.exit_code == 2:
        assert "quantiz" in one_line_error(res).lower()
        return
    assert res.exit_code == 0, res.output[-600:]
    ranked = [line for line in res.output.splitlines() if re.match(r"\s*\d+\. --optimizer", line)]
    assert ranked, res.output[-600:]
    assert not any("--peft none" in line for line in ranked), "\n".join(ranked)


# -- 3. FZOO via TrainConfig: resume refused against its own config.json ---------------------------------------------
def test_an_fzoo_run_resumes_from_the_trainconfig_it_started_with(tmp_path):
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.train import TrainConfig, prepare, train

    def cfg(steps):
        return TrainConfig(out_dir=str(tmp_path / "run"), train_data=TRAIN, model="tiny-llama", optimizer="fzoo",
                           optim=OptimizerArgs(), peft=PeftSettings("none"), steps=steps, batch_size=4,
                           eval_every=0, checkpoint_every=1, progress=False, save="last", dtype="bfloat16")

    train(prepare(cfg(1)))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["n_spsa"] == 8
    summary = train(prepare(cfg(2), resume=True))  # today: SlimtuneError "settings differ (optim.n_spsa: 8 -> 1)"
    assert summary is not None
