"""Issue 36's optimizers through the training loop: they train with no hyper-parameter given (the defaults table),
resume exactly, refuse settings they do not use, and DP-HiZOO's two releases per step are accounted."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune import SlimtuneError
from slimtune.optim import OptimizerArgs
from slimtune.optim.defaults import defaults_for
from slimtune.peft import PeftSettings
from slimtune.privacy import PrivacySpec
from slimtune.train import TrainConfig, prepare, train

NEW = ("hizoo", "hizoo-l", "sparse-mezo", "hybrid")


def config(tmp_path, demo_paths, name="run", **kw):
    train_path, dev_path = demo_paths
    base = dict(out_dir=str(tmp_path / name), train_data=train_path, eval_data=dev_path, model="tiny-llama",
                optimizer="hizoo", optim=OptimizerArgs(), peft=PeftSettings("lora", r=2), steps=4,
                batch_size=8, eval_every=2, checkpoint_every=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("optimizer", NEW)
@pytest.mark.parametrize("peft", ["lora", "none"])
def test_trains_with_no_hyperparameter_given(tmp_path, demo_paths, optimizer, peft):
    run = prepare(config(tmp_path, demo_paths, optimizer=optimizer, peft=PeftSettings(peft, r=2), steps=None))
    d = defaults_for(optimizer, peft)
    assert (run.config.optim.lr, run.config.optim.eps, run.config.steps) == (d.lr, d.eps, d.steps)
    for name, value in d.extra:
        assert getattr(run.config.optim, name) == value
    run.config.steps = 3  # the table's 2,000 steps, cut short for the test (the schedule keeps its 2,000)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    summary = train(run)
    assert summary["steps"] == 3 and summary["final_accuracy"] is not None
    after = dict(run.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # it trained


@pytest.mark.parametrize("optimizer,peft,extra", [("hizoo", "lora", {}), ("hizoo-l", "none", {}),
                                                  ("sparse-mezo", "none", {"mask_every": 3}),
                                                  ("hybrid", "lora", {"fo_layers": 1}),
                                                  ("hybrid", "none", {"fo_layers": 1}),
                                                  ("hizoo", "svfit", {"perturbation": "pool"}),
                                                  ("sparse-mezo", "adapter", {"perturbation": "pool"})])
def test_resume_reproduces_the_uninterrupted_trajectory(tmp_path, demo_paths, optimizer, peft, extra):
    kw = dict(optimizer=optimizer, peft=PeftSettings(peft, r=2), optim=OptimizerArgs(lr=1e-3, eps=1e-2, **extra),
              lr_scheduler="constant", steps=6, eval_every=3, checkpoint_every=3)
    straight = train(prepare(config(tmp_path, demo_paths, "straight", **kw)))
    train(prepare(config(tmp_path, demo_paths, "resumed", **{**kw, "steps": 4})))  # a checkpoint at step 4
    resumed = train(prepare(config(tmp_path, demo_paths, "resumed", **kw), resume=True))
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["final_accuracy"] == resumed["final_accuracy"]
    logged = lambda d: [(r.get("loss"), r.get("projected_grad"), r.get("curvature"))
                        for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert logged(tmp_path / "straight") == logged(tmp_path / "resumed")


@pytest.mark.parametrize("optimizer,setting,message", [
    ("mezo", {"sparsity": 0.5}, "--sparsity is a setting of sparse-mezo, not of --optimizer mezo"),
    ("hizoo", {"fo_lr": 1e-3}, "--fo-lr is a setting of hybrid"),
    ("hizoo", {"n_spsa": 2}, "--n-spsa 2: hizoo takes one direction per step"),
    ("sparse-mezo", {"sparsity": 1.0}, r"--sparsity 1.0: .* must be in \[0, 1\)"),
    ("hybrid", {"fo_layers": 0}, "--fo-layers must be >= 1"),
])
def test_settings_an_optimizer_cannot_use_are_refused_before_loading(tmp_path, demo_paths, monkeypatch, optimizer,
                                                                       setting, message):
    import slimtune.train.trainer as trainer
    monkeypatch.setattr(trainer, "load_model_and_data", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(SlimtuneError, match=message):
        prepare(config(tmp_path, demo_paths, optimizer=optimizer, optim=OptimizerArgs(**setting)))


def test_dphizoo_accounts_two_releases_per_step_and_logs_only_released_values(tmp_path, demo_paths):
    from slimtune.privacy.accountant import plan

    spec = PrivacySpec(target_epsilon=4.0, delta=1e-3)
    run = prepare(config(tmp_path, demo_paths, optimizer="dphizoo", privacy=spec, steps=4))
    assert run.accountant.releases == 2
    one = plan(spec, len(run.train_examples), 8, 4, 1, True)
    assert run.accountant.noise > one.noise  # the curvature release costs budget: more noise on each scalar
    summary = train(run)
    assert 0 < summary["epsilon"] <= 4.0 * 1.001
    keys = set().union(*(json.loads(l).keys() for l in (Path(tmp_path / "run" / "metrics.jsonl")).read_text()
                         .splitlines()))
    assert "loss" not in keys and "curvature_batch_size" not in keys and "curvature_clipped_fraction" not in keys


@pytest.mark.slow  # ~25 s: three CLI processes
def test_hizoo_data_parallel_follows_the_one_process_trajectory(tmp_path, demo_paths):
    """2 gloo ranks exchange only per-example losses (3 measurements a step); H and theta follow the one-process run."""
    import os
    import socket
    import subprocess
    import sys

    def launch(out, ranks):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = ["train", "--data", demo_paths[0], "--eval-data", demo_paths[1], "--model", "tiny-llama", "--optimizer",
                "hizoo", "--peft", "lora", "--peft-r", "2", "--lr", "1e-2", "--eps", "1e-2", "--steps", "4",
                "--batch-size", "8", "--eval-every", "2", "--eval-max", "40", "--checkpoint-every", "2",
                "--lr-scheduler", "constant", "--quiet", "--out", str(out)]
        cmd = [sys.executable, "-m", "slimtune.cli", *argv] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
             "127.0.0.1", "--master_port", str(port), "-m", "slimtune.cli", *argv]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    launch(tmp_path / "one", 1)
    launch(tmp_path / "two", 2)
    a = load_file(str(tmp_path / "one" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint" / "trainable.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a) and any(a[k].abs().sum() > 0 for k in a)
    curvature = lambda d: [r["curvature"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                           if "curvature" in r]
    assert curvature(tmp_path / "one") == pytest.approx(curvature(tmp_path / "two"), rel=1e-3)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["bytes_communicated"] == 4 * 3 * 2 * 16  # 3 gathers a step, 4 losses x 4 B per rank


def test_federated_local_epsilon_counts_dphizoos_two_releases():
    """A federated dphizoo client releases two noisy scalars a step: its local epsilon is DP-SGD's with two releases,
    never dpzero's one."""
    from dataclasses import replace

    from slimtune.federated.config import FederatedConfig
    from slimtune.federated.local_privacy import node_epsilon
    from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec

    cfg = FederatedConfig(data="unused.tsv", local_dp_noise=1.0)
    one, two = (node_epsilon(replace(cfg, local_optimizer=o), 1000, 100) for o in ("dpzero", "dphizoo"))
    spec = PrivacySpec(delta=cfg.local_dp_delta, noise_multiplier=1.0, clip=cfg.local_dp_clip)
    assert two == pytest.approx(PrivacyAccountant(spec, 1000, min(cfg.batch_size, 1000), 1.0, 2).epsilon(100))
    assert two > one
