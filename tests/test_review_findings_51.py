"""Review 51: today's changes (measured planner baseline, VmHWM reset, DP-SGD's per-example state, the ranks' resume
digest), as an adversary.

1. DP-SGD / DP-AdamW drop `grad_sample` / `summed_grad` after every step, "also a failed one". A step that fails
   after the forward (an out-of-memory in the loss or the backward, the commonest failure of a memory-bound run)
   leaves Opacus' `activations` on every trainable layer: the batch's detached inputs to each LoRA layer (layer 0's
   are the training tokens' normalised embeddings). They travel with torch.save(model) / deepcopy, and a second
   failure appends another batch.
2. resident_tensor_mb counts a storage at the average residency of the mapping it lies in; the kernel merges
   adjacent anonymous mappings, so 64 MB of fully written weights beside an untouched 256 MB allocation count as
   13 MB. held_mb then counts 51 MB of weights as runtime, and the prediction adds the weights again.
3. prepare() calls reset_peak_memory(config.device) before validate(): a TrainConfig built by hand with a CUDA
   device on a machine without one is an AttributeError traceback from torch, not validate's one line.
4. state_digest ("equal on two ranks exactly when they hold the same state") hashes repr() of anything that is not a
   tensor / dict / list / tuple: numpy arrays past 1000 values hash their elided repr (different states agree), and a
   set of strings hashes in PYTHONHASHSEED's order (each torchrun rank draws its own: the same state disagrees).
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune import SlimtuneError

ROOT = Path(__file__).resolve().parents[1]


def test_a_failed_dp_sgd_step_leaves_no_activations_of_the_batch_on_the_model(tiny):
    from test_review_findings_50 import dp_sgd_on_tiny
    model, opt, losses = dp_sgd_on_tiny(tiny)

    def out_of_memory_after_the_forward():
        losses()
        raise MemoryError("simulated: out of memory after the forward pass")

    with pytest.raises(MemoryError):
        opt.step(out_of_memory_after_the_forward)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    kept = [n for n, m in loaded.named_modules() if getattr(m, "activations", None)]
    assert not kept, f"after a failed DP-SGD step {len(kept)} pickled layers carry the batch's activations, " \
                     f"e.g. {kept[0]}"


def test_resident_weights_count_in_full_beside_an_untouched_allocation():
    from slimtune.report.memory_model import resident_tensor_mb

    n = 64 * 2**20 // 4
    weights = torch.ones(n)  # every page written: 64 MB resident
    spare = torch.empty(4 * n)  # noqa: F841  another allocation of the process, never touched
    model = torch.nn.Linear(1, 1)
    model.weight = torch.nn.Parameter(weights.view(n, 1))
    counted = resident_tensor_mb(model)
    assert counted >= 60, f"64 MB of written weights counted as {counted:.1f} MB resident (the merged mapping's " \
                          "average residency)"


def test_prepare_with_a_cuda_device_this_machine_lacks_is_one_line(tmp_path, demo_paths):
    from slimtune.train import TrainConfig, prepare

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=demo_paths[0], model="tiny-llama", optimizer="mezo",
                      steps=1, device="cuda:99")
    with pytest.raises(SlimtuneError, match="--device"):
        prepare(cfg)


def test_state_digest_tells_apart_numpy_arrays_that_differ_past_their_repr():
    import numpy as np

    from slimtune.distributed import state_digest

    a, b = np.zeros(5000), np.zeros(5000)
    b[2500] = 1.0
    assert state_digest({"m": a}) != state_digest({"m": b})


def test_state_digest_of_the_same_set_agrees_across_processes():
    code = ("from slimtune.distributed import state_digest;"
            "print(state_digest({'seen': {'alpha', 'beta', 'gamma', 'delta', 'epsilon'}}))")
    digests = set()
    for seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-1000:]
        digests.add(res.stdout.strip())
    assert len(digests) == 1, f"one state, {len(digests)} digests under different PYTHONHASHSEED (one per rank)"

