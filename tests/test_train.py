"""Training loop: exact resume, early stopping, privacy budget stop, clear errors, nothing overwritten."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune import SlimtuneError
from slimtune.optim import OptimizerArgs
from slimtune.peft import PeftSettings
from slimtune.privacy import PrivacySpec
from slimtune.train import TrainConfig, prepare, train


def config(tmp_path, demo_paths, name="run", **kw):
    train_path, dev_path = demo_paths
    base = dict(out_dir=str(tmp_path / name), train_data=train_path, eval_data=dev_path, model="tiny-llama",
                optimizer="mezo", optim=OptimizerArgs(lr=1e-2, eps=1e-2), peft=PeftSettings("lora", r=2), steps=6,
                batch_size=8, eval_every=3, checkpoint_every=3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir):
    return load_file(str(Path(run_dir) / "checkpoint" / "trainable.safetensors"))


@pytest.mark.parametrize("optimizer,peft", [("mezo", "lora"), ("lozo-m", "svfit"), ("adamw", "lora"), ("fzoo", "lora"),
                                            ("dpzero", "none"), ("lozo", "adapter"),
                                            ("dp-adamw", "lora")])
def test_resume_reproduces_the_uninterrupted_trajectory(tmp_path, demo_paths, monkeypatch, optimizer, peft):
    from slimtune.privacy.secret import create_key_file
    private = optimizer.startswith("dp")
    if private:  # both private runs share one key file and (patched) nonce, so their noise is the same
        create_key_file(tmp_path / "shared.key")
        monkeypatch.setattr("slimtune.train.trainer.fresh_nonce", lambda: 12345)
    kw = dict(optimizer=optimizer, peft=PeftSettings(peft, r=2),
              optim=OptimizerArgs(lr=1e-2, eps=1e-2, rank=2, nu=2), lr_scheduler="constant",  # steps differ below
              privacy=PrivacySpec(delta=1e-3, noise_multiplier=1.0) if private else None,
              secret_key_file=str(tmp_path / "shared.key") if private else None)
    straight = train(prepare(config(tmp_path, demo_paths, "straight", **kw)))
    half = config(tmp_path, demo_paths, "resumed", **{**kw, "steps": 3})
    train(prepare(half))
    resumed = train(prepare(config(tmp_path, demo_paths, "resumed", **kw), resume=True))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["final_accuracy"] == resumed["final_accuracy"]
    logged = lambda d: [(r.get("loss"), r.get("projected_grad"), r.get("epsilon"))
                        for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert logged(tmp_path / "straight") == logged(tmp_path / "resumed")


def test_metrics_lines_have_loss_time_memory_and_privacy(tmp_path, demo_paths):
    train(prepare(config(tmp_path, demo_paths, "plain")))
    for line in [json.loads(l) for l in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()][1:]:
        assert line["step_time_s"] > 0 and line["peak_mem_mb"] > 0 and line["loss"] > 0
    cfg = config(tmp_path, demo_paths, optimizer="dpzero", privacy=PrivacySpec(target_epsilon=4.0, delta=1e-3))
    summary = train(prepare(cfg))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if l["step"] > 0]
    assert len(steps) == 6
    for line in steps:
        assert line["delta"] == 1e-3 and 0 < line["epsilon"] <= 4.0 * 1.001
    assert [l["epsilon"] for l in steps] == sorted(l["epsilon"] for l in steps)
    assert lines[0]["step"] == 0 and "eval_accuracy" in lines[0]  # zero-shot starting point
    assert summary["epsilon"] == pytest.approx(steps[-1]["epsilon"])
    assert summary["time_per_step_s"] is None and summary["peak_mem_mb"] is None  # measured on private batches


def test_refuses_to_overwrite_an_existing_run(tmp_path, demo_paths):
    train(prepare(config(tmp_path, demo_paths, steps=2)))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(SlimtuneError, match="already holds a run"):
        prepare(config(tmp_path, demo_paths, steps=2))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_privacy_budget_exhaustion_stops_with_a_checkpoint(tmp_path, demo_paths):
    from slimtune.privacy.secret import create_key_file
    create_key_file(tmp_path / "run.key")  # (lead) a completed run is extended only with a key file of the user's
    kw = dict(optimizer="dpzero", privacy=PrivacySpec(target_epsilon=3.0, delta=1e-3),
              secret_key_file=str(tmp_path / "run.key"))
    train(prepare(config(tmp_path, demo_paths, steps=4, **kw)))  # noise calibrated for 4 steps
    summary = train(prepare(config(tmp_path, demo_paths, steps=20, **kw), resume=True))
    assert summary["stop_reason"] == "privacy budget exhausted"
    assert summary["steps"] == 4 and summary["epsilon"] <= 3.0 * 1.001
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["step"] == 4


def test_early_stopping(tmp_path, demo_paths):
    cfg = config(tmp_path, demo_paths, steps=40, eval_every=1, patience=2, optimizer="sgd", optim=OptimizerArgs(lr=0.0))
    summary = train(prepare(cfg))  # SGD at lr 0 leaves every weight exactly as it was (ZO's restore moves them by
    # an ulp), never better than zero-shot, so it stops after `patience` evaluations
    assert summary["stop_reason"] == "early stopping"
    assert summary["steps"] == 2 and summary["best_step"] == 0


def test_nan_loss_is_a_clear_error(tmp_path, demo_paths):
    cfg = config(tmp_path, demo_paths, optimizer="sgd", optim=OptimizerArgs(lr=1e30), peft=PeftSettings("none"),
                 steps=10, checkpoint_every=1)
    with pytest.raises(SlimtuneError, match="training loss is nan.*lower --lr"):
        train(prepare(cfg))


def test_k_shot_is_balanced_and_seeded(tmp_path, demo_paths):
    a = prepare(config(tmp_path, demo_paths, "a", k_shot=4, seed=1))
    b = prepare(config(tmp_path, demo_paths, "b", k_shot=4, seed=1))
    c = prepare(config(tmp_path, demo_paths, "c", k_shot=4, seed=2))
    assert sorted(e.label for e in a.train_examples) == [0] * 4 + [1] * 4
    assert [e.prompt for e in a.train_examples] == [e.prompt for e in b.train_examples]
    assert [e.prompt for e in a.train_examples] != [e.prompt for e in c.train_examples]


@pytest.mark.parametrize("optimizer,mechanism", [("dp-adamw", "gaussian"), ("dplozo", "gaussian"),
                                                 ("dpzero", "laplace")])
def test_private_variants_train_and_account(tmp_path, demo_paths, optimizer, mechanism):
    cfg = config(tmp_path, demo_paths, optimizer=optimizer, steps=4, optim=OptimizerArgs(lr=1e-3, eps=1e-2),
                 privacy=PrivacySpec(target_epsilon=5.0, delta=1e-3, mechanism=mechanism))
    run = prepare(cfg)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    summary = train(run)
    assert 0 < summary["epsilon"] <= 5.0 * 1.001 and summary["noise_multiplier"] > 0
    after = dict(run.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # it trained


def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path, demo_paths, capsys):
    cfg = config(tmp_path, demo_paths, steps=40, eval_every=20, progress=True, optimizer="adamw",
                 optim=OptimizerArgs(lr=1e-3))
    train(prepare(cfg))
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert len(lines) == 20  # every 2 steps (5% of 40), evaluations included
    assert lines[-1].startswith("step 40/40 | loss ") and "accuracy" in lines[-1] and "s/step" in lines[-1]
    assert "ETA 0m00s" in lines[-1]
