"""DPZero's adaptive clipping (issue 11): C tracks a quantile of |g_i| privately, and its cost is accounted."""

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

from slimtune.privacy.secret import KeyedNoise, RunKey
from slimtune import SlimtuneError
from slimtune.optim import OptimizerArgs
from slimtune.peft import PeftSettings
from slimtune.privacy import PrivacySpec, PrivateDifference
from slimtune.privacy.accountant import effective_noise, plan
from slimtune.train import TrainConfig, prepare, train


def test_clip_converges_to_the_target_quantile_of_the_scalars():
    torch.manual_seed(0)
    spec = PrivacySpec(clip=0.1, target_quantile=0.9, clip_lr=0.2, clip_multiplier=1.0)
    est = PrivateDifference(spec, noise_multiplier=1.0, expected_batch_size=200, noise=KeyedNoise(RunKey(bytes([1]) * 32)), quantile_noise=10.0)
    for _ in range(400):
        g = 5.0 * torch.randn(200)  # per-example finite differences with eps = 0.5
        est(g, torch.zeros(200), eps=0.5)
    quantile = 5.0 * 1.6449  # the 0.9 quantile of |N(0, 25)|
    assert est.clip == pytest.approx(quantile, rel=0.15)


def test_clip_is_scale_free():
    """Whatever the scale of the finite differences, the fraction clipped ends near 1 - target: no C to hand-tune."""
    for scale in (0.01, 1.0, 100.0):
        torch.manual_seed(0)
        est = PrivateDifference(PrivacySpec(clip=1.0, target_quantile=0.9, clip_multiplier=1.0), 1.0, 100, noise=KeyedNoise(RunKey(bytes([1]) * 32)),
                                quantile_noise=5.0)
        for _ in range(300):
            est(scale * torch.randn(100), torch.zeros(100), eps=0.5)
        g = scale * torch.randn(10000)
        assert (g.abs() > est.clip).float().mean().item() == pytest.approx(0.1, abs=0.05)


def test_adaptive_clipping_costs_are_in_the_reported_epsilon(tmp_path, demo_paths):
    train_path, dev_path = demo_paths
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=train_path, eval_data=dev_path, model="tiny-llama",
                      optimizer="dpzero", optim=OptimizerArgs(lr=1e-2, eps=1e-2), peft=PeftSettings("lora", r=2),
                      steps=5, batch_size=8, eval_every=0, progress=False,
                      privacy=PrivacySpec(target_epsilon=3.0, delta=1e-3))
    summary = train(prepare(cfg))
    sigma, sigma_b, q = summary["noise_multiplier"], summary["quantile_noise"], 8 / summary["train_examples"]
    assert sigma_b > 0  # adaptive by default for dpzero
    # the scalar and the count are released on the same batch: one Gaussian mechanism of both
    both = rdp.RdpAccountant()
    both.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(
        1 / math.sqrt(1 / sigma**2 + 1 / sigma_b**2))), 5)
    scalar_only = rdp.RdpAccountant()
    scalar_only.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 5)
    assert summary["epsilon"] == pytest.approx(both.get_epsilon(1e-3), rel=1e-6)
    assert scalar_only.get_epsilon(1e-3) < summary["epsilon"] <= 3.0 * 1.001
    clips = [json.loads(l)["clip"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert clips[0] == 2.0 and len(set(clips)) == 5  # C starts at 2 x --clip and moves every step (public, logged)


def test_adaptive_noise_split_costs_a_few_percent_of_scalar_noise():
    spec = PrivacySpec(target_epsilon=6.0, delta=1e-5)
    fixed = plan(spec, 67349, 16, 200)
    adaptive = plan(spec, 67349, 16, 200, adaptive=True)
    assert adaptive.epsilon(200) == pytest.approx(fixed.epsilon(200), rel=1e-3)
    assert effective_noise(adaptive.noise, 1, adaptive.quantile_noise) == pytest.approx(fixed.noise, rel=1e-6)
    assert 1.0 < adaptive.noise / fixed.noise <= 1.07


def test_adaptive_clipping_is_refused_where_it_is_not_implemented(tmp_path, demo_paths):
    train_path, _ = demo_paths
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=train_path, model="tiny-llama", optimizer="dp-sgd",
                      steps=2, progress=False, privacy=PrivacySpec(target_epsilon=3.0, delta=1e-3,
                                                                   clipping="adaptive"))
    with pytest.raises(SlimtuneError, match="--clipping adaptive"):
        prepare(cfg)
    with pytest.raises(SlimtuneError, match="Gaussian"):
        plan(PrivacySpec(target_epsilon=3.0, mechanism="laplace"), 1000, 10, 10, adaptive=True)


def test_clip_multiplier_clips_above_the_tracked_quantile():
    torch.manual_seed(0)
    spec = PrivacySpec(clip=1.0, target_quantile=0.9, clip_multiplier=2.0)
    est = PrivateDifference(spec, noise_multiplier=1.0, expected_batch_size=200, noise=KeyedNoise(RunKey(bytes([1]) * 32)), quantile_noise=10.0)
    for _ in range(400):
        est(5.0 * torch.randn(200), torch.zeros(200), eps=0.5)
    assert est.quantile == pytest.approx(5.0 * 1.6449, rel=0.15)  # still the 0.9 quantile
    assert est.clip == pytest.approx(2 * est.quantile)  # the scalar is clipped at twice that
