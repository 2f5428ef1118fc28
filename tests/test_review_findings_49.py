"""Review 49: the planner's measured CPU baseline (runtime_mb = this process's VmRSS beyond the model's tensors) and
the VmHWM / VmRSS readings of 9e1c6d4, used by a careless user (a checkpoint directory, a notebook, torchrun ranks on
one machine, a refused hybrid). Each test fails on the code it was written against."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune import SlimtuneError
from slimtune.report import memory_model

ROOT = Path(__file__).resolve().parents[1]


def status_mb(field: str) -> float:
    """This process's VmRSS / VmHWM in MB, read here (not the code under test)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":")) / 1024


def test_a_checkpoints_mmapped_weights_are_not_subtracted_from_the_baseline_before_they_are_resident(tmp_path):
    """transformers 5 keeps a safetensors checkpoint's weights memory-mapped: after `slimtune train --model DIR`
    loads it (models/loading.load_local), the weights are not yet in VmRSS (measured: +15 MB for a 197 MB model),
    but resident_tensor_mb counts every CPU storage in full, so runtime_mb = VmRSS - weights removes memory that
    the process does not hold yet and the measured baseline falls back to the library constant. Whatever else the
    process holds (a notebook's data, the CI venv's extra library pages the commit was about) is then missing from
    the plan, by up to the weights' size. Here: 400 MB held, a ~200 MB checkpoint: planned ~200 MB below what the
    process holds plus the weights the run will touch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.models.loading import load_model_and_tokenizer, tiny_tokenizer

    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    ckpt = tmp_path / "ckpt"
    model = LlamaForCausalLM(cfg)
    weights = sum(p.numel() for p in model.parameters()) * 4 / 2**20  # ~197 MB of fp32 weights
    model.save_pretrained(ckpt)
    tiny_tokenizer(["a b c"]).save_pretrained(ckpt)
    del model
    held = torch.ones(100 * 2**20)  # 400 MB the process holds beside the run (touched)
    before = status_mb("VmRSS")  # everything here is not the model's
    model, _ = load_model_and_tokenizer(str(ckpt))
    peak, _ = memory_model.predict_run_mb(model, "mezo", "none", 8, 1, 8, "cpu")
    assert peak >= before + weights, (peak, before, weights, status_mb("VmRSS"))
    del held


def _fake_machine(monkeypatch, mem_available_mb: float, own_rss_mb: float) -> None:
    """/proc/meminfo's MemAvailable and this process's VmRSS as given (the functions under test read them)."""
    import io

    from slimtune.train import metrics

    real_open = open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            return io.StringIO(f"MemTotal: 99999999 kB\nMemAvailable: {int(mem_available_mb * 1024)} kB\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(memory_model, "open", fake_open, raising=False)
    monkeypatch.setattr(metrics, "process_memory_mb", lambda field: own_rss_mb)
    # (lead) and its sibling ranks as holding as much: ranks_rss_mb reads the real siblings where this process's
    # parent has exactly `processes` children (pytest-xdist's workers under their controller: 2 on 2 cores)
    monkeypatch.setattr(memory_model, "ranks_rss_mb", lambda processes, own: processes * own)


def test_data_parallel_ranks_do_not_count_the_other_ranks_memory_twice(tiny, monkeypatch):
    """check_fits(processes=2) budgets (MemAvailable + this rank's RSS) x 0.9 / 2. torchrun starts the ranks together:
    when one checks, the other already holds about as much (its libraries, its model), and that is already missing
    from MemAvailable; dividing by 2 takes it off a second time. Two ranks holding 1,400 MB each with 1,000 MB free:
    the machine has 3,800 MB for them, 1,710 MB each at 90%, and a ~1,470 MB MeZO+LoRA rank is refused (budget
    1,080 MB). For a 7B bf16 model on 2 ranks the share is ~6 GB short."""
    model, _, _ = tiny
    _fake_machine(monkeypatch, mem_available_mb=1000, own_rss_mb=1400)
    peak, _ = memory_model.predict_run_mb(model, "mezo", "lora", 2, 4, 16, "cpu")
    share = (1000 + 2 * 1400) * memory_model.HEADROOM / 2
    assert peak < share - 100, (peak, share)  # the scenario: the rank fits its share with room to spare
    memory_model.check_fits(model, "mezo", "lora", 2, 4, 16, "cpu", processes=2)


def test_a_refused_hybrid_is_not_listed_as_fitting_at_another_fo_layers(monkeypatch):
    """check_fits gets the run's fo_layers (and targets) but computes its "best that fits" and "what fits" lists with
    ranked_methods / plan_rows at the default (2 blocks, default targets): `train --optimizer hybrid --peft lora
    --fo-layers 4` is refused, and the same message says "what fits: ... hybrid+lora (N MB)" - the pair it just
    refused, priced at another --fo-layers the message does not name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    runtime = memory_model.runtime_mb(model, "cpu")
    monkeypatch.setattr(memory_model, "runtime_mb", lambda *a, **k: runtime)  # one baseline for every row
    at = {k: memory_model.predict_run_mb(model, "hybrid", "lora", 8, 64, 256, "cpu", fo_layers=k)[0] for k in (2, 4)}
    assert at[4] > at[2] + 50, at
    budget = (at[2] + at[4]) / 2
    monkeypatch.setattr(memory_model, "available_mb", lambda device: budget / memory_model.HEADROOM)
    with pytest.raises(SlimtuneError) as caught:
        memory_model.check_fits(model, "hybrid", "lora", 8, 64, 256, "cpu", fo_layers=4)
    message = str(caught.value)
    assert "hybrid+lora (" not in message.split("what fits:", 1)[1], message
    assert "best that fits: --optimizer hybrid --peft lora (" not in message, message


def test_plan_names_what_is_wrong_in_a_config_transformers_refuses(tmp_path):
    """`slimtune plan --model config.json` with hidden_size 64 and 3 attention heads: transformers' message is two
    lines ("Class validation error for validator 'validate_architecture':" then the ValueError naming the sizes), and
    first_line keeps the first: the one-line error names no field ("... not a usable transformers config (Class
    validation error for validator 'validate_architecture':)"). The same for head_dim 7 (validate_rope)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 3, "vocab_size": 100,
                                  "max_position_embeddings": 64}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "slimtune.cli", "plan", "--model", str(config), "--max-length", "16"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    errors = [line for line in out.stderr.splitlines() + out.stdout.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "attention heads" in errors[0] or "num_attention_heads" in errors[0], errors[0]


def test_the_memory_benchmarks_baseline_is_its_own_process_not_an_exec_parents_peak():
    """benchmarks/memory_model.py measures the process baseline it feeds predict_peak_mb with ru_maxrss in a child:
    ru_maxrss keeps a larger parent's peak across exec (the reason 9e1c6d4 moved peak_memory_mb to VmHWM), so the
    baseline of a child started by a big process (a notebook, a harness) is the parent's peak, not the libraries'."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory_model as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    parent = ("import os, sys, torch\n"
              "x = torch.ones(400 * 2**20)\n"  # 1,600 MB touched in the parent
              "del x\n"
              f"os.execv(sys.executable, [sys.executable, '-c', {bench.BASELINE!r}])\n")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    baseline = float(out.stdout.strip().splitlines()[-1])
    assert baseline < 1400, baseline  # torch + transformers + peft + slimtune.train: ~600 MB, not the parent's 1,600+


def test_a_second_run_in_one_python_process_reports_its_own_peak(tmp_path, demo_paths):
    """slimtune.train in a notebook: peak_mem_mb (metrics.jsonl, summary.json) is VmHWM, the process's peak since it
    started, so a tiny run after anything bigger in the same kernel (a first run, a dataset, a freed tensor) reports
    that earlier peak as its own. Here a 1,200 MB tensor freed before a tiny-llama MeZO run: the run reports ~1,700
    MB for a ~500 MB process (the run could reset the peak at its start: /proc/self/clear_refs "5")."""
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.train import TrainConfig, prepare
    from slimtune.train.trainer import train

    x = torch.ones(300 * 2**20)  # 1,200 MB, touched, then freed
    del x
    before = status_mb("VmRSS")
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=demo_paths[0], model="tiny-llama", optimizer="mezo",
                      optim=OptimizerArgs(lr=1e-6, eps=1e-3), peft=PeftSettings("lora", r=2), steps=2, batch_size=4,
                      progress=False)
    summary = train(prepare(cfg))
    assert summary["peak_mem_mb"] < before + 600, (summary["peak_mem_mb"], before)
