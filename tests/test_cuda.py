"""The same training paths on a CUDA device (skipped where there is none: CI and the 2-core machine have no GPU; the
checks ran on an H200: benchmarks/gpu_check.sh, results in docs/benchmarks/memory-scaling.md).

Every optimizer of the methods table trains a tiny model on CUDA in fp32 and bf16 (fp16 where it is allowed), its
weights stay on the device, the summary's peak memory is CUDA's, a resumed run ends bit for bit where the straight
run does, a private run's noise is the run key's (two keys, two trajectories), and generation runs there."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.optim import OptimizerArgs
from slimtune.optim.methods import OPTIMIZERS, PRIVATE
from slimtune.peft import PeftSettings
from slimtune.privacy import PrivacySpec
from slimtune.train import TrainConfig, prepare, train

DEVICE = os.environ.get("SLIMTUNE_TEST_DEVICE", "cuda")  # "cpu" runs the same checks here (the tests' own check)
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device on this machine")


def config(tmp_path, demo_paths, name, optimizer="mezo", peft="lora", **kw):
    train_path, dev_path = demo_paths
    base = dict(out_dir=str(tmp_path / name), train_data=train_path, eval_data=dev_path, model="tiny-llama",
                optimizer=optimizer, optim=OptimizerArgs(lr=1e-3, eps=1e-2), peft=PeftSettings(peft, r=2), steps=4,
                batch_size=8, eval_every=2, checkpoint_every=2, progress=False, device=DEVICE,
                lr_scheduler="constant")
    if optimizer in PRIVATE:
        base["privacy"] = PrivacySpec(target_epsilon=6.0, delta=1e-3)
        base["log_private_stats"] = True  # the summary's peak memory is checked below
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_on_cuda(tmp_path, demo_paths, optimizer, dtype):
    peft = "none" if optimizer in ("hizoo-l", "sparse-mezo") else "lora"  # full-parameter methods
    if dtype == "bfloat16" and optimizer in ("adamw", "sgd", "dp-adamw", "dp-sgd", "hybrid", "dphybrid"):
        pytest.skip("first-order optimizers train fp32 weights (bf16 is a ZO setting, issue 38 item 1)")
    run = prepare(config(tmp_path, demo_paths, "run", optimizer=optimizer, peft=peft, dtype=dtype))
    trained = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    assert all(p.device.type == DEVICE for p in trained.values())
    summary = train(run)
    assert summary["steps"] == 4 and summary["final_accuracy"] is not None
    after = dict(run.model.named_parameters())
    assert all(torch.isfinite(after[n]).all() for n in trained)
    assert any(not torch.equal(trained[n], after[n]) for n in trained)  # it trained
    if DEVICE == "cuda":  # the summary's peak is CUDA's allocator peak, not the process RSS
        assert 0 < summary["peak_mem_mb"] <= torch.cuda.max_memory_allocated() / 2**20 + 1e-6


def test_cuda_builds_use_the_device_kernels(tmp_path, demo_paths):
    """AdamW takes torch's fused kernel on CUDA (the default foreach one holds a weights-sized temporary), and ZO
    draws z in 16 Mi-value chunks there (1 Mi, the CPU size, made a 7B step launch-bound)."""
    from slimtune.zo.mezo import CPU_CHUNK, CUDA_CHUNK
    adamw = prepare(config(tmp_path, demo_paths, "adamw", optimizer="adamw"))
    assert all(g["fused"] for g in adamw.optimizer.torch_optimizer.param_groups) == (DEVICE == "cuda")
    mezo = prepare(config(tmp_path, demo_paths, "mezo"))
    assert mezo.optimizer.config.chunk_size == (CUDA_CHUNK if DEVICE == "cuda" else CPU_CHUNK)


@pytest.mark.skipif(DEVICE != "cuda", reason="fp16 is a CUDA-only dtype")
def test_fp16_trains_on_cuda(tmp_path, demo_paths):
    summary = train(prepare(config(tmp_path, demo_paths, "fp16", dtype="float16")))
    assert summary["steps"] == 4 and summary["final_accuracy"] is not None


@pytest.mark.parametrize("optimizer,peft,extra", [("mezo", "lora", {"perturbation": "pool"}),
                                                  ("dpzero", "lora", {}),
                                                  ("hybrid", "lora", {"fo_layers": 1}),
                                                  ("hizoo", "none", {})])
def test_resume_on_cuda_reproduces_the_straight_run(tmp_path, demo_paths, optimizer, peft, extra):
    kw = dict(optimizer=optimizer, peft=peft, optim=OptimizerArgs(lr=1e-3, eps=1e-2, **extra), steps=6,
              eval_every=3, checkpoint_every=3)
    if optimizer in PRIVATE:  # one key file for both runs: the same noise (resume replays the key's noise)
        from slimtune.privacy.secret import create_key_file
        create_key_file(tmp_path / "shared.key")
        kw["secret_key_file"] = str(tmp_path / "shared.key")
    straight = train(prepare(config(tmp_path, demo_paths, "straight", **kw)))
    train(prepare(config(tmp_path, demo_paths, "resumed", **{**kw, "steps": 4})))
    resumed = train(prepare(config(tmp_path, demo_paths, "resumed", **kw), resume=True))
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    if optimizer in PRIVATE:  # a private resume recomputes with fresh noise after a restart (attempt + 1)
        assert all(torch.isfinite(b[k]).all() for k in b)
        return
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["final_accuracy"] == resumed["final_accuracy"]


def test_private_noise_on_cuda_comes_from_the_run_key(tmp_path, demo_paths):
    runs = [train(prepare(config(tmp_path, demo_paths, name, optimizer="dpzero"))) for name in ("a", "b")]
    logged = [[r.get("projected_grad") for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text()
                                                    .splitlines()) if "projected_grad" in r] for n in ("a", "b")]
    assert logged[0] and logged[0] != logged[1]  # two fresh keys: two noise streams
    assert all(r["epsilon"] <= 6.0 + 1e-6 for r in runs)


def test_generation_task_trains_and_generates_on_cuda(tmp_path):
    from slimtune.train.objectives import GenerationSettings
    train_path = str(Path(__file__).resolve().parents[1] / "slimtune" / "data" / "demo" / "e2e_demo_train.csv")
    cfg = TrainConfig(out_dir=str(tmp_path / "gen"), train_data=train_path, eval_data=train_path, model="tiny-llama",
                      task="generation", optimizer="mezo", peft=PeftSettings("lora", r=2), steps=2, batch_size=4,
                      eval_every=2, eval_max=4, progress=False, device=DEVICE,
                      generation=GenerationSettings(input_column="mr", target_column="ref", max_new_tokens=8))
    summary = train(prepare(cfg))
    assert summary["steps"] == 2
