"""DPZero: clipping bounds sensitivity, calibration agrees with the accountant, budgets are enforced, Poisson rate."""

import pytest
import torch

from slimtune.privacy.secret import KeyedNoise, RunKey
from slimtune import SlimtuneError
from slimtune.data import PoissonSampler
from slimtune.privacy import PrivacySpec, PrivateDifference, calibrate_noise
from slimtune.privacy.accountant import PrivacyAccountant, plan


def test_clipping_bounds_one_examples_influence_on_the_pre_noise_update():
    spec = PrivacySpec(clip=0.5)
    est = PrivateDifference(spec, noise_multiplier=1.0, expected_batch_size=8, noise=KeyedNoise(RunKey(bytes([0]) * 32)))
    torch.manual_seed(0)
    lp, lm = torch.randn(8), torch.randn(8)
    base, _ = est.clipped_sum(lp, lm, eps=1e-3)
    for value in (1e6, -1e6, 0.0, float(3)):
        lp2 = lp.clone()
        lp2[3] = value  # change one example arbitrarily
        changed, _ = est.clipped_sum(lp2, lm, eps=1e-3)
        assert abs(changed - base) <= 2 * spec.clip + 1e-9  # replace-one: |clip(a) - clip(b)| <= 2C
    removed, _ = est.clipped_sum(torch.cat([lp[:3], lp[4:]]), torch.cat([lm[:3], lm[4:]]), eps=1e-3)
    assert abs(removed - base) <= spec.clip + 1e-9  # add/remove-one (Poisson): C


def test_noise_has_the_calibrated_scale():
    spec = PrivacySpec(clip=2.0)
    est = PrivateDifference(spec, noise_multiplier=1.5, expected_batch_size=1, noise=KeyedNoise(RunKey(bytes([1]) * 32)))
    draws = torch.tensor([est.noise() for _ in range(20000)])
    assert abs(draws.std().item() - 3.0) < 0.1
    assert abs(draws.mean().item()) < 0.1


def test_laplace_noise_scale():
    spec = PrivacySpec(clip=1.0, mechanism="laplace")
    est = PrivateDifference(spec, noise_multiplier=2.0, expected_batch_size=1, noise=KeyedNoise(RunKey(bytes([1]) * 32)))
    draws = torch.tensor([est.noise() for _ in range(20000)])
    assert abs(draws.abs().mean().item() - 2.0) < 0.1  # E|Laplace(b)| = b


@pytest.mark.parametrize("target,n,batch,steps", [(2.0, 20000, 64, 500), (6.0, 20000, 64, 500),
                                                  (6.0, 67349, 16, 100)])  # tiny q: epsilon is steep in sigma
def test_sigma_calibration_matches_the_accountants_own_epsilon(target, n, batch, steps):
    spec = PrivacySpec(target_epsilon=target, delta=1e-5)
    sigma = calibrate_noise(spec, n, batch, steps)
    eps = PrivacyAccountant(spec, n, batch, sigma).epsilon(steps)
    assert eps <= target * 1.001
    assert abs(eps - target) / target < 0.01


def test_budget_that_cannot_be_met_is_refused():
    with pytest.raises(SlimtuneError, match="over the requested budget"):
        plan(PrivacySpec(target_epsilon=1.0, delta=1e-5, noise_multiplier=0.3), 10000, 100, 1000)
    with pytest.raises(SlimtuneError, match="delta"):
        plan(PrivacySpec(target_epsilon=1.0, delta=0.01), 1000, 10, 10)


def test_poisson_sampling_rate_is_right_in_distribution():
    sampler = PoissonSampler(num_examples=1000, expected_batch_size=50, seed=0)
    sizes = torch.tensor([len(sampler.indices(t)) for t in range(400)], dtype=torch.float)
    assert abs(sizes.mean().item() - 50) < 1.5  # binomial(1000, 0.05): mean 50, sd 6.9/sqrt(400)
    assert abs(sizes.var().item() - 1000 * 0.05 * 0.95) < 12
    counts = torch.zeros(1000)
    for t in range(400):
        counts[sampler.indices(t)] += 1
    assert abs(counts.mean().item() / 400 - 0.05) < 0.003  # each example included with probability q


def test_epsilon_grows_with_steps_and_shuffle_uses_replace_one():
    spec = PrivacySpec(delta=1e-5)
    acc = PrivacyAccountant(spec, 1000, 10, 1.0)
    assert 0 < acc.epsilon(10) < acc.epsilon(100)
    with pytest.warns(UserWarning, match="Poisson"):
        shuffled = PrivacyAccountant(PrivacySpec(delta=1e-5, sampling="shuffle"), 1000, 10, 1.0)
    assert shuffled.epsilon(100) > 0
