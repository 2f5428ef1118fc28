"""Private hybrid (`--optimizer dphybrid`, optim/hybrid.py DPHybrid): DPZero's scalar below, DP-AdamW's clipped and
noised per-example gradient on the top blocks, two releases a step in the accountant; what a private run may log."""

import json
from pathlib import Path

import pytest
import torch

from slimtune import SlimtuneError
from slimtune.optim import OptimizerArgs, build_optimizer
from slimtune.peft import PeftSettings, apply_peft
from slimtune.privacy import PrivacySpec
from slimtune.privacy.secret import KeyedNoise, RunKey
from slimtune.train import TrainConfig, prepare, train


def config(tmp_path, demo_paths, name="run", **kw):
    train_path, dev_path = demo_paths
    base = dict(out_dir=str(tmp_path / name), train_data=train_path, eval_data=dev_path, model="tiny-llama",
                optimizer="dphybrid", optim=OptimizerArgs(), peft=PeftSettings("lora", r=2), steps=4,
                batch_size=8, eval_every=2, checkpoint_every=2, progress=False,
                privacy=PrivacySpec(target_epsilon=4.0, delta=1e-3))
    base.update(kw)
    return TrainConfig(**base)


def tiny_lora(seed=0):
    from slimtune.models.loading import tiny_model
    return apply_peft(tiny_model("tiny-llama", 100, 0, 1, seed=seed), PeftSettings("lora", r=2))


def private(sigma, key=b"k" * 32, clip=1.0, batch=4.0):
    spec = PrivacySpec(noise_multiplier=sigma, clip=clip, clipping="fixed")
    return spec, sigma, batch, KeyedNoise(RunKey(key), run=7)


def losses_of(model, ids, scale=None):
    """Per-example next-token losses; `scale` multiplies each example's loss (a hostile row: x1e4)."""
    out = model(input_ids=ids).logits[:, :-1]
    per_token = torch.nn.functional.cross_entropy(out.transpose(1, 2), ids[:, 1:], reduction="none")
    losses = per_token.mean(dim=1)
    return losses * scale if scale is not None else losses


def test_trains_with_no_hyperparameter_given_and_accounts_two_releases(tmp_path, demo_paths):
    from slimtune.privacy.accountant import plan
    run = prepare(config(tmp_path, demo_paths))
    assert run.accountant.releases == 2  # the ZO scalar and the top gradient
    one = plan(run.config.privacy, len(run.train_examples), 8, 4, 1, True)
    assert run.accountant.noise > one.noise  # the second release costs budget: more noise on each
    summary = train(run)
    assert 0 < summary["epsilon"] <= 4.0 * 1.001
    records = [json.loads(line) for line in Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*(r.keys() for r in records))
    assert "loss" not in keys and "batch_size" not in keys and "clipped_fraction" not in keys
    assert (tmp_path / "run" / "adapter").exists()


def test_one_examples_influence_on_the_top_update_is_clipped_and_nothing_is_recorded_below():
    """With no noise the top gradient AdamW receives is (sum_i clip_S(grad_i)) / E: its norm is at most B S / E,
    however large one example's gradient is (its loss x 1e4 here)."""
    model = tiny_lora()
    ids = torch.randint(0, 100, (4, 6))
    fo_clip = 1e-3
    opt = build_optimizer("dphybrid", model, OptimizerArgs(lr=1e-3, eps=1e-2, fo_layers=1, fo_clip=fo_clip),
                          private=private(0.0, batch=4.0))
    scale = torch.tensor([1e4, 1.0, 1.0, 1.0])
    opt.step(lambda: losses_of(model, ids, scale))
    top = [p for _, p in opt.top]
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in top)).item()
    assert 0 < norm <= 4 * fo_clip / 4.0 + 1e-9
    assert all(getattr(p, "grad_sample", None) is None for p in top)  # not kept after the step (B x the top)
    low = [p for _, p, _ in opt.params]
    assert low and all(getattr(p, "grad_sample", None) is None and p.grad is None for p in low)
    assert all(p.requires_grad for p in model.parameters() if p in set(top) | set(low))


def test_the_top_noise_comes_from_the_run_key():
    """Same key, same step: the same update; another key: another (no torch generator involved)."""
    ids = torch.randint(0, 100, (4, 6))
    after = {}
    for name, key in (("a", b"a" * 32), ("a again", b"a" * 32), ("b", b"b" * 32)):
        model = tiny_lora()
        opt = build_optimizer("dphybrid", model, OptimizerArgs(lr=1e-3, eps=1e-2, fo_layers=1),
                              private=private(1.0, key=key))
        torch.manual_seed(123)
        opt.step(lambda: losses_of(model, ids))
        after[name] = torch.cat([p.detach().flatten() for _, p in opt.top])
    assert torch.equal(after["a"], after["a again"]) and not torch.equal(after["a"], after["b"])


def test_an_empty_poisson_batch_still_releases_noise():
    model = tiny_lora()
    opt = build_optimizer("dphybrid", model, OptimizerArgs(lr=1e-3, eps=1e-2, fo_layers=1), private=private(1.0))
    before = torch.cat([p.detach().flatten().clone() for _, p in opt.top])
    out = opt.step(lambda: torch.zeros(0))
    after = torch.cat([p.detach().flatten() for _, p in opt.top])
    assert not torch.equal(before, after) and torch.isfinite(after).all()
    assert out.info["batch_size"] == 0


def test_settings_are_checked_before_any_work(tmp_path, demo_paths):
    from slimtune.settings.train import TrainSettings
    train_path, dev_path = demo_paths
    base = dict(data=train_path, eval_data=dev_path, out=str(tmp_path / "x"), model="tiny-llama")
    with pytest.raises(SlimtuneError, match="--fo-clip"):
        TrainSettings.build({**base, "optimizer": "hybrid", "fo_clip": 0.5})
    with pytest.raises(SlimtuneError, match="laplace"):
        TrainSettings.build({**base, "optimizer": "dphybrid", "mechanism": "laplace"})
    with pytest.raises(SlimtuneError, match="fo-clip"):
        TrainSettings.build({**base, "optimizer": "dphybrid", "fo_clip": 0})
    settings = TrainSettings.build({**base, "optimizer": "dphybrid", "fo_clip": 0.5, "fo_layers": 1, "epsilon": 2})
    cfg = settings.to_config()
    assert cfg.optim.fo_clip == 0.5 and cfg.privacy.target_epsilon == 2


@pytest.mark.parametrize("kind,peft", [("tiny-gpt2", "none"), ("tiny-llama", "svfit"), ("tiny-llama", "adapter")])
def test_removing_one_example_moves_the_top_sum_by_at_most_s_and_the_scalar_by_at_most_c(kind, peft):
    """Add/remove-one sensitivity of both releases (no noise here), one hostile example (loss x 1e4) removed. --peft
    none on a model whose LM head shares the embedding (tiny-gpt2; so do Llama-3.2-1B and Qwen2-0.5B): the tied
    weight is low (ZO), yet the head's layer sits on the backward path of the top, and Opacus' hook there (no
    activations: its weight is frozen during that forward) failed every step. SVFit and adapters: their own layers."""
    from slimtune.models.loading import tiny_model
    fo_clip, clip, expected = 1e-3, 1e-3, 4.0
    ids, scale = torch.randint(2, 100, (4, 6)), torch.tensor([1e4, 1.0, 1.0, 1.0])

    def released_sums(rows):
        model = apply_peft(tiny_model(kind, 100, 0, 1, seed=0), PeftSettings(peft, r=2)).eval()
        opt = build_optimizer("dphybrid", model, OptimizerArgs(lr=1e-3, eps=1e-2, fo_layers=1, fo_clip=fo_clip),
                              private=private(0.0, clip=clip, batch=expected))
        out = opt.step(lambda: losses_of(model, ids[rows], scale[rows]))
        assert opt.params and (kind != "tiny-gpt2" or any("wte" in n for n, _, _ in opt.params))  # tied: low
        return (torch.cat([p.grad.double().flatten() for _, p in opt.top]) * expected,
                out.info["projected_grad"] * expected)

    (top, zo), (top_without, zo_without) = released_sums([0, 1, 2, 3]), released_sums([1, 2, 3])
    assert (top - top_without).norm().item() <= fo_clip * (1 + 1e-6)
    assert abs(zo - zo_without) <= clip * (1 + 1e-6)


def test_fo_clip_reaches_the_optimizer_from_python_and_from_the_hf_trainer():
    """slimtune.DPHybrid(fo_clip=...) and ZOArguments(optimizer="dphybrid", fo_clip=...) were silently clipped at 1
    (the Python API dropped the keyword; ZOArguments had no such field) while `settings` reported the given value."""
    import slimtune
    from slimtune.hf import ZOArguments
    dp = slimtune.DPHybrid(tiny_lora(), epsilon=3.0, dataset_size=400, batch_size=8, steps=3, fo_layers=1,
                           fo_clip=0.01)
    assert dp.impl.config.fo_clip == 0.01 and dp.impl.fo.max_grad_norm == 0.01 and dp.settings["fo_clip"] == 0.01
    built = ZOArguments(optimizer="dphybrid", fo_clip=0.02, fo_layers=1).build(
        tiny_lora(), lr=None, weight_decay=0.0, seed=0, dataset_size=400, batch_size=8, steps=3)
    assert built.impl.fo.max_grad_norm == 0.02
    with pytest.raises(SlimtuneError, match="fo.clip"):
        slimtune.DPHybrid(tiny_lora(), epsilon=3.0, dataset_size=400, batch_size=8, steps=3, fo_clip=0.0)


def test_laplace_from_python_is_refused_before_loading_and_names_the_optimizer(tmp_path, demo_paths, monkeypatch):
    """A TrainConfig with Laplace noise and dphybrid's two releases: refused before the model loads, and the
    message names what releases two values (it used to blame an --n-spsa 2 the user never set)."""
    import slimtune.train.trainer as trainer
    monkeypatch.setattr(trainer, "_load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded first")))
    spec = PrivacySpec(target_epsilon=4.0, delta=1e-3, mechanism="laplace", clipping="fixed")
    with pytest.raises(SlimtuneError, match="dphybrid") as err:
        prepare(config(tmp_path, demo_paths, privacy=spec))
    assert "--n-spsa 2" not in str(err.value)


def test_a_federated_dphybrid_client_takes_eps():
    """The ZO part of a (dp)hybrid local optimizer perturbs with --eps: the federated settings accept it."""
    from slimtune.settings.federate import FederateSettings
    from slimtune.settings.base import spec_of
    rule = spec_of(FederateSettings.__dataclass_fields__["eps"]).applies
    from types import SimpleNamespace
    assert rule is not None and rule.test(SimpleNamespace(local_optimizer="dphybrid", mode="lora"))
    assert rule.test(SimpleNamespace(local_optimizer="hybrid", mode="lora"))
    assert not rule.test(SimpleNamespace(local_optimizer="adamw", mode="lora"))
