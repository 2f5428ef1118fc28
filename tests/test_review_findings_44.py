"""Review 44: the scale features used carelessly (the planner's predictions as upper bounds of measured peaks, train's
refusal and --force, configs planned on the meta device, data-parallel ranks on one machine). Each test fails on the
code it was written against and states the behaviour the docs claim."""

import json
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

from slimtune import SlimtuneError
from slimtune.optim import OptimizerArgs
from slimtune.peft import PeftSettings
from slimtune.report import memory_model
from slimtune.train import TrainConfig, prepare

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "slimtune" / "data" / "demo" / "sst2_demo_train.tsv"

MEASURE = """
import json, resource, sys
import slimtune.report.memory_model as mm
seen = []
real = mm.predict_run_mb
def spy(*a, **k):
    out = real(*a, **k)
    seen.append(out[0])
    return out
mm.predict_run_mb = spy
from slimtune.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))  # this process's own
# peak (ru_maxrss keeps the pytest parent's across fork and exec: ~1 GB in the full suite)
print("RESULT", json.dumps({"predicted_mb": seen[0], "peak_mb": hwm / 1024, "bitsandbytes": "bitsandbytes" in sys.modules}))
"""


@pytest.mark.parametrize("peft", ["none", "svfit"])
def test_the_planned_peak_of_a_zo_run_is_an_upper_bound_of_its_measured_peak(tmp_path, peft):
    """`slimtune train --optimizer mezo --peft none` on tiny-llama: train's own prediction (check_fits ->
    predict_run_mb) is ~449 MB, the process's peak RSS (train/metrics.peak_memory_mb, as benchmarks/zo_step.py
    measures) ~493 MB. Every run imports peft (peft/registry.adapter_kind, peft_summary), and peft imports
    bitsandbytes when the extra "quant" is installed (+117 MB, RUNTIME_MB_BNB), but imports_bitsandbytes() counts that
    only for LoRA / PiSSA / a quantized base: full-parameter, SVFit and adapter rows under-predict by the library."""
    got = planned_and_measured(tmp_path, "--optimizer", "mezo", "--peft", peft)
    assert got["predicted_mb"] >= got["peak_mb"], got


def planned_and_measured(tmp_path, *flags) -> dict:
    """{predicted_mb, peak_mb, bitsandbytes} of a 2-step `slimtune train` on tiny-llama with `flags`, in a child
    process: train's own prediction (check_fits -> predict_run_mb) and the child's own peak RSS."""
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", MEASURE, "train", "--model", "tiny-llama", "--data", str(DEMO),
                          "--steps", "2", "--batch-size", "16", "--eval-every", "0", "--quiet", "--out",
                          str(tmp_path / "run"), *flags],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT")]
    assert line, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads(line[0].split(" ", 1)[1])


def test_a_hizoo_checkpoint_does_not_copy_the_hessian_the_planner_never_counted(tmp_path):
    """HiZOO's state_dict() clones its fp32 diagonal Hessian (one value per trainable value) and save_checkpoint
    torch.saves it: every checkpoint transiently holds a second Hessian, + trainable x 4 bytes that predict_peak_mb
    (parts "hessian" only) does not plan. Full-parameter HiZOO on a 7B config: planned 53.9 GB, ~81 GB at each
    checkpoint. Measured here on an 11M-parameter llama: the process's peak grows by ~the Hessian's size while the
    checkpoint is written (MeZO: ~1 MB)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimtune.optim import build_optimizer
    from slimtune.train.checkpoint import save_checkpoint

    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024

    cfg = LlamaConfig(vocab_size=20000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    hessian_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    opt = build_optimizer("hizoo", model, OptimizerArgs(lr=1e-6, eps=1e-3))
    ids = torch.randint(0, 20000, (2, 8))
    opt.step(lambda: model(input_ids=ids, labels=ids).loss.reshape(1))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status_mb("VmRSS")
    save_checkpoint(tmp_path / "checkpoint", model, opt, {})
    growth = status_mb("VmHWM") - before
    assert growth < 0.25 * hessian_mb, (growth, hessian_mb)


def test_a_full_parameter_hybrid_planned_from_a_config_is_not_below_the_real_models_prediction(monkeypatch):
    """`plan --model CONFIG.json` builds the model on the meta device, where top_trainable_count's call-order probe
    raises and predict_run_mb falls back to fo_layers / layers of the trainable values. With --peft none the hybrid's
    backprop part also holds the final norm and the untied LM head, so the config's plan is below the real model's
    (llama 7B: 421M values planned for ~535M: ~1.4 GB of gradients and AdamW moments missing)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=4000, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    # (lead) the process baseline held fixed, as test_plan does: it drifted a few MB between the two predictions
    # (the real model allocated between them; under pytest-xdist the worker's history differs) and decided the test
    monkeypatch.setattr(memory_model, "held_mb", lambda *a, **k: 0.0)
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(cfg)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    planned = memory_model.predict_run_mb(meta, "hybrid", "none", 8, 16, 64, "cpu")[0]
    actual = memory_model.predict_run_mb(real, "hybrid", "none", 8, 16, 64, "cpu")[0]
    assert planned >= actual, (planned, actual)


def force_config(tmp_path, demo_paths, **kw):
    return TrainConfig(out_dir=str(tmp_path / "run"), train_data=demo_paths[0], model="tiny-llama", optimizer="mezo",
                       optim=OptimizerArgs(lr=1e-6, eps=1e-3), peft=PeftSettings("lora", r=2), steps=1, batch_size=8,
                       progress=False, **kw)


def test_force_past_a_predicted_overflow_is_not_silent(tmp_path, demo_paths, monkeypatch):
    """`--force` skips check_memory altogether (trainer._load: `if not config.force`): a run the planner predicts at
    10x the memory here starts without a word, and nothing records that it was forced past the prediction."""
    monkeypatch.setattr(memory_model, "available_mb", lambda device: 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(force_config(tmp_path, demo_paths, force=True))
    assert any("predicted" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_data_parallel_ranks_sharing_one_machine_are_planned_together(tmp_path, demo_paths, monkeypatch):
    """`torchrun --nproc_per_node 2 ... train` on CPU (the documented one-machine launch): each rank holds the runtime,
    the weights and its share of the batch in the same RAM, but check_memory plans one process at the global batch
    against all of the machine's memory. With room for 1.5 single processes, both ranks are told the run fits."""
    from slimtune.models import load_model_and_tokenizer
    from slimtune.train.trainer import check_memory

    model, tok = load_model_and_tokenizer("tiny-llama", texts=["a b c"])
    one, _ = memory_model.predict_run_mb(model, "mezo", "lora", 2, 8, 12, "cpu")
    monkeypatch.setattr(memory_model, "available_mb", lambda device: 1.5 * one / memory_model.HEADROOM)
    # the other rank holds nothing yet (it starts later): the ranks' pool is what is available now
    monkeypatch.setattr(memory_model, "ranks_rss_mb", lambda processes, own: own)
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):  # as torchrun sets them
        monkeypatch.setenv(name, value)
    cfg = force_config(tmp_path, demo_paths, max_length=12)
    with pytest.raises(SlimtuneError, match="predicted"):
        check_memory(cfg, model, tok, None)
