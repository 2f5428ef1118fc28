"""Keep the best model (adapter/ is the best-evaluated one) and learning-rate schedules by transformers' names."""

import json

import pytest
import torch

from slimtune import SlimtuneError
from slimtune.models import load_model_and_tokenizer
from slimtune.optim import OptimizerArgs
from slimtune.optim.schedule import SCHEDULES, lr_multiplier
from slimtune.peft import PeftSettings, load_peft
from slimtune.train import TrainConfig, prepare, train
from slimtune.train.classification import evaluate


def config(tmp_path, demo_paths, name="run", **kw):
    train_path, dev_path = demo_paths
    base = dict(out_dir=str(tmp_path / name), train_data=train_path, eval_data=dev_path, model="tiny-llama",
                optimizer="adamw", optim=OptimizerArgs(lr=3e-2), peft=PeftSettings("lora", r=2), steps=8,
                batch_size=8, eval_every=2, eval_max=40, checkpoint_every=4, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def adapter_accuracy(run):
    base, tok = load_model_and_tokenizer("tiny-llama", texts=[e.prompt for e in run.train_examples + run.eval_examples])
    model = load_peft(base, f"{run.config.out_dir}/adapter")
    return evaluate(model, tok, run.eval_examples, run.label_ids)


def test_adapter_is_the_best_evaluated_one(tmp_path, demo_paths, monkeypatch):
    import slimtune.train.trainer as trainer
    scores = iter([(0.50, 1.0), (0.70, 0.9), (0.60, 0.8), (0.55, 0.7), (0.40, 0.6)])  # best at step 2
    real = trainer._evaluate
    seen = {}

    def scripted(run):  # real evaluation, scripted scores: the best is not the last
        step_result = real(run)
        acc, loss = next(scores)
        seen[acc] = step_result
        return {"eval_accuracy": acc, "eval_loss": loss}

    monkeypatch.setattr(trainer, "_evaluate", scripted)
    run = prepare(config(tmp_path, demo_paths))
    summary = train(run)
    assert summary["best_step"] == 2 and summary["best_accuracy"] == 0.70 and summary["final_accuracy"] == 0.40
    assert summary["saved_adapter"] == "best (step 2)"
    saved = adapter_accuracy(run)
    assert saved["loss"] == pytest.approx(seen[0.70]["eval_loss"], rel=1e-5)  # the step-2 model, not the last
    assert saved["loss"] != pytest.approx(seen[0.40]["eval_loss"], rel=1e-5)


def test_save_last_keeps_the_final_adapter(tmp_path, demo_paths):
    run = prepare(config(tmp_path, demo_paths, save="last"))
    summary = train(run)
    assert summary["saved_adapter"] == "last"
    final = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert adapter_accuracy(run)["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_no_run_ends_below_zero_shot(tmp_path, demo_paths):
    run = prepare(config(tmp_path, demo_paths, optim=OptimizerArgs(lr=50.0)))  # diverges: every step is worse
    summary = train(run)
    zero = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    saved = adapter_accuracy(run)
    assert saved["accuracy"] >= zero["eval_accuracy"]
    assert summary["best_accuracy"] >= zero["eval_accuracy"]


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_follow_transformers(name):
    f = lr_multiplier(name, total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.0)  # every schedule warms up from 0
    assert f(10) == pytest.approx(1.0)
    if name in ("linear", "cosine", "polynomial"):
        assert f(100) == pytest.approx(0.0, abs=1e-6) and f(55) < f(20)
    assert lr_multiplier("constant", 100)(73) == 1.0


def test_the_schedule_drives_every_optimizer_lr(tmp_path, demo_paths):
    for optimizer in ("mezo", "adamw"):
        run = prepare(config(tmp_path, demo_paths, optimizer, optimizer=optimizer, lr_scheduler="linear",
                             warmup_steps=2, eval_every=0))
        train(run)
        lrs = [json.loads(l)["lr"] for l in (tmp_path / optimizer / "metrics.jsonl").read_text().splitlines()]
        expected = [3e-2 * lr_multiplier("linear", 8, 2)(t) for t in range(8)]
        assert lrs == pytest.approx(expected)


def test_bad_schedule_settings_are_clear_errors(tmp_path, demo_paths):
    with pytest.raises(SlimtuneError, match="--lr-scheduler 'warmup'"):
        prepare(config(tmp_path, demo_paths, lr_scheduler="warmup"))
    with pytest.raises(SlimtuneError, match="--warmup-steps"):
        prepare(config(tmp_path, demo_paths, warmup_steps=8))
    with pytest.raises(SlimtuneError, match="--save"):
        prepare(config(tmp_path, demo_paths, save="final"))
