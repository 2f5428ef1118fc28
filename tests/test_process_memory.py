"""The planner's process baseline and the measured peak are this process's own (CI's fresh venv maps its libraries
with ~60 MB more resident pages than an older venv of the same files, so a constant baseline under-predicted there;
ru_maxrss keeps a larger parent's peak across exec). Each test fails on the code before the fix."""

import os
import subprocess
import sys

import torch

from slimtune.report import memory_model
from slimtune.train.metrics import peak_memory_mb


def process_memory_mb(field: str) -> float:
    """This process's VmRSS / VmHWM in MB, read here (not the code under test)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":")) / 1024


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_a_run_in_this_process_is_planned_above_what_the_process_already_holds():
    """predict_run_mb plans a run in this process: its peak is at least what the process holds now. With 400 MB of
    other tensors held (a notebook's data, another model), the constant baseline (420 + 117 MB) planned a run below
    the process's current RSS, and check_fits compared it to a budget that counts that RSS as available."""
    model = _tiny_model()
    held = torch.ones(100 * 2**20)  # 400 MB, touched
    now = process_memory_mb("VmRSS")
    peak, _ = memory_model.predict_run_mb(model, "mezo", "lora", 2, 4, 16, "cpu")
    assert peak >= now, (peak, now)
    del held


def test_the_runtime_baseline_does_not_count_the_models_own_tensors_twice():
    """The model's weights are a part of the prediction of their own: the measured baseline leaves them out."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    big = LlamaForCausalLM(cfg)  # ~52 MB of fp32 weights (tied head), resident (random init writes them)
    weights = memory_model.resident_tensor_mb(big)
    assert weights > 40
    other = torch.ones(100 * 2**20)  # 400 MB held beside it: the measured baseline, not the library floor, decides
    held = process_memory_mb("VmRSS")
    runtime = memory_model.runtime_mb(big, "cpu")
    assert held - weights > memory_model.RUNTIME_MB_CPU + memory_model.RUNTIME_MB_BNB
    assert runtime <= held - 0.9 * weights + memory_model.RUNTIME_MB_RUN, (runtime, held, weights)
    assert runtime >= held - weights, (runtime, held, weights)
    del other


CHILD = """
import sys
from slimtune.train.metrics import peak_memory_mb
print(peak_memory_mb("cpu"))
"""


def test_the_measured_peak_is_the_runs_own_not_an_exec_parents():
    """A run started by exec from a larger process (a notebook, pytest's parent) reported the parent's peak:
    ru_maxrss is kept across exec. The peak is the process's own VmHWM."""
    parent = ("import os, sys, torch\n"
              "x = torch.ones(250 * 2**20)\n"  # 1,000 MB touched in the parent
              "del x\n"
              f"os.execv(sys.executable, [sys.executable, '-c', {CHILD!r}])\n")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    peak = float(out.stdout.strip().splitlines()[-1])
    assert peak < 900, peak  # the child imports torch and slimtune.train: ~500 MB, far below the parent's 1,000+


def test_available_memory_counts_what_the_process_holds_now_not_its_past_peak():
    """available_mb = MemAvailable + this process's memory: what it holds now (VmRSS), since memory it freed is
    already in MemAvailable; its past peak counted the freed part twice."""
    x = torch.ones(100 * 2**20)
    del x  # 400 MB peak, freed
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
    before = int(meminfo["MemAvailable"].split()[0]) / 1024 + process_memory_mb("VmRSS")
    got = memory_model.available_mb("cpu")
    assert abs(got - before) < 64, (got, before)
    assert peak_memory_mb("cpu") >= process_memory_mb("VmRSS")


SIBLING = """
import sys, time, torch
held = torch.ones(75 * 2**20)  # 300 MB, touched
open(sys.argv[1], "w").write("ready")
time.sleep(60)
"""

RANK = """
import sys, time
from pathlib import Path
while not Path(sys.argv[1]).exists():
    time.sleep(0.1)
time.sleep(0.5)
from slimtune.report import memory_model
from slimtune.train.metrics import process_memory_mb
own = process_memory_mb("VmRSS")
print(own, memory_model.ranks_rss_mb(2, own))
"""


def test_ranks_on_one_machine_are_counted_from_their_own_memory(tmp_path):
    """Two ranks started by one parent (as torchrun's agent starts them): what they hold is read from each, so a
    sibling holding 300 MB more than this rank counts with its 300 MB."""
    flag = tmp_path / "ready"
    parent = (f"import subprocess, sys\n"
              f"s = subprocess.Popen([sys.executable, '-c', {SIBLING!r}, {str(flag)!r}])\n"
              f"r = subprocess.run([sys.executable, '-c', {RANK!r}, {str(flag)!r}], capture_output=True, text=True)\n"
              f"s.kill()\n"
              f"print(r.stdout, r.stderr[-2000:])\n")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    own, both = (float(v) for v in out.stdout.split()[:2])
    assert both >= own + 250 + 100, (own, both, out.stdout[-2000:])  # the sibling: torch (~200 MB) + 300 MB held
