"""HiZOO / HiZOO-L (zo/hizoo.py): preconditioned direction, curvature learning, convergence, exact restore and resume,
perturbation sources, and DP-HiZOO's private curvature release."""

import math

import pytest
import torch
from torch import nn
from zo_resume import resumed

from slimtune.zo.hizoo import HiZOO, HiZOOConfig, MeanCurvature, PrivateCurvature


def quadratic(top=2, shape=(4, 3)):
    """0.5 sum a w^2 with curvatures a from 1 to 10^top (a rank-1 grid, so HiZOO-L's factors can hold it exactly)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape))
    a = torch.logspace(0, top, w.numel()).reshape(shape)
    return w, a, lambda: (0.5 * a * w ** 2).sum().reshape(1)


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("seed", [0, 2])
def test_converges_on_an_ill_conditioned_quadratic_and_learns_its_curvature(factored, seed):
    """Curvatures 1..100 over 6 values; alpha kappa ~ 0.3 at the start (kappa ~ tr A / 2), the regime where the
    update is stable. lr 5e-3 is twice MeZO's stability limit at H = 1 (2 / (a_max (d + 2))): H grows first."""
    w, a, loss = quadratic(shape=(3, 2))
    opt = HiZOO([("w", w)], HiZOOConfig(lr=5e-3, eps=1e-3, hessian_smooth=3e-3, factored=factored, seed=seed))
    start = loss().item()
    for _ in range(4000):
        opt.step(loss)
    assert loss().item() < 1e-2 * start
    h = opt.hessian[0].block(0, 3).flatten()
    corr = torch.corrcoef(torch.stack([h.log(), a.flatten().log()]))[0, 1]
    assert corr > 0.95  # H ranks the coordinates by curvature
    d = a.numel()
    assert (h / a.flatten()).median().item() == pytest.approx(d / 2 + 1, rel=0.3)  # H -> (d/2 + 1) diag(A)


def test_the_step_is_the_gradient_preconditioned_by_h_inverse():
    """With H fixed (alpha ~ 0), E[step] = -lr H^{-1} grad."""
    w, a, loss = quadratic(shape=(6,))
    h = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    grad = a * w.detach()
    total = torch.zeros(6)
    n = 4000
    for s in range(n):
        opt = HiZOO([("w", w)], HiZOOConfig(lr=1e-3, eps=1e-4, hessian_smooth=1e-12, seed=2))
        opt.hessian[0].h = h.clone().view(1, 6)
        opt.step_count = s
        before = w.detach().clone()
        opt.step(loss)
        total += (w.detach() - before) / -1e-3
        with torch.no_grad():
            w.copy_(before)
    mean = total / n
    cos = torch.nn.functional.cosine_similarity(mean, grad / h, dim=0)
    assert cos > 0.98 and (mean.norm() / (grad / h).norm()).item() == pytest.approx(1.0, rel=0.1)
    assert torch.nn.functional.cosine_similarity(mean, grad, dim=0) < 0.9  # not the raw gradient


@pytest.mark.parametrize("source", ["gaussian", "rademacher", "pool"])
@pytest.mark.parametrize("factored", [False, True])
def test_restore_is_exact_to_a_few_ulp_and_h_is_updated(source, factored):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(300, 37))
    opt = HiZOO([("w", p)], HiZOOConfig(lr=0.0, eps=1e-3, chunk_size=4096, perturbation=source, pool_size=1 << 16,
                                        factored=factored, hessian_smooth=0.1))
    for _ in range(3):  # H != 1 after the first step: the restore must use the same H^{-1/2} z as the perturbation
        theta = p.detach().clone()
        opt.step(lambda: (p ** 2).sum().reshape(1))
        drift = (p.detach() - theta).abs()
        ulp = torch.finfo(torch.float32).eps * (theta.abs() + 2e-3 * 8)
        assert bool((drift <= 4 * ulp).all()), f"max drift {drift.max().item()}"
    h = opt.hessian[0].block(0, 300)
    assert not torch.allclose(h, torch.ones_like(h))


@pytest.mark.parametrize("factored", [False, True])
def test_state_round_trip_reproduces_the_trajectory_bit_for_bit(factored):
    def make():
        torch.manual_seed(0)
        w, b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6))
        cfg = HiZOOConfig(lr=1e-2, eps=1e-3, hessian_smooth=0.05, factored=factored, weight_decay=0.1,
                          perturbation="pool", pool_size=1 << 12)
        return w, b, HiZOO([("layer.weight", w), ("layer.bias", b)], cfg)

    loss = lambda w, b: ((w @ b - 1) ** 2).sum().reshape(1)
    w1, b1, o1 = make()
    for _ in range(7):
        o1.step(lambda: loss(w1, b1))
    w3, b3, o3 = resumed(make, loss, 4, 3)
    assert torch.equal(w1.detach(), w3.detach()) and torch.equal(b1.detach(), b3.detach())
    assert all(torch.equal(x, y) for h1, h3 in zip(o1.hessian, o3.hessian)
               for x, y in zip(h1.state().values(), h3.state().values()))


def test_hizoo_l_keeps_rows_plus_columns_per_matrix():
    w, v = nn.Parameter(torch.randn(64, 48)), nn.Parameter(torch.randn(48))
    full = HiZOO([("w", w), ("v", v)], HiZOOConfig())
    light = HiZOO([("w", w), ("v", v)], HiZOOConfig(factored=True))
    assert full.hessian_values == 64 * 48 + 48
    assert light.hessian_values == 64 + 48 + 48  # the vector keeps a full diagonal


def test_refuses_n_spsa_and_bad_alpha():
    w = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="one direction per step"):
        HiZOO([("w", w)], HiZOOConfig(n_spsa=2))
    with pytest.raises(ValueError, match="hessian_smooth"):
        HiZOO([("w", w)], HiZOOConfig(hessian_smooth=1.0))


def test_curvature_scalar_is_the_mean_second_difference():
    l0, lp, lm = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0]), torch.tensor([1.5, 2.5])
    kappa, _ = MeanCurvature()(l0, lp, lm, eps=0.1)
    assert kappa == pytest.approx(abs((1.0 + 0.5) / 2) / (2 * 0.01))


class _Clipped:
    """A PrivateDifference stand-in without noise: (sum clip((a - b) / 2e)) / B."""

    def __init__(self, clip, batch):
        self.clip, self.batch = clip, batch

    def __call__(self, a, b, e):
        per = ((a - b) / (2 * e)).clamp(-self.clip, self.clip)
        return per.sum().item() / self.batch, {"clip": self.clip}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_private_curvature_clips_each_examples_second_difference():
    """Replacing one example moves the released curvature by at most 2 C / B (before noise): its sensitivity is the
    clip, as for DPZero's scalar; an outlier cannot dominate it."""
    curvature = PrivateCurvature(_Clipped(clip=5.0, batch=4))
    eps = 1e-2
    l0 = torch.zeros(4)
    lp = torch.tensor([1e-4, 2e-4, 1e-4, 1e-4])
    lm = torch.tensor([1e-4, 0.0, 1e-4, 1e-4])
    base, info = curvature(l0, lp, lm, eps)
    assert base == pytest.approx((1 + 1 + 1 + 1) / 4)  # per example (lp + lm) / (2 eps^2) = 1
    outlier = lp.clone()
    outlier[0] = 10.0  # an example with a huge curvature
    moved, _ = curvature(l0, outlier, lm, eps)
    assert abs(moved - base) <= 2 * 5.0 / 4 + 1e-12
    assert info == {"curvature_clip": 5.0}


def test_private_curvature_shares_the_runs_noise_without_reusing_a_draw():
    """dphizoo's two releases draw from one KeyedNoise: different values within a step, the same on a replay."""
    pytest.importorskip("slimtune.privacy.secret").KeyedNoise
    from slimtune.optim.builders import private_pair
    from slimtune.privacy.accountant import PrivacySpec
    from slimtune.privacy.secret import KeyedNoise, RunKey

    def releases(key):
        grad, curvature = private_pair((PrivacySpec(noise_multiplier=1.0, clipping="fixed"), 1.0, 4,
                                        KeyedNoise(key, run=0)))  # one run: the same nonce
        zeros = torch.zeros(4)
        return grad(zeros, zeros, 1e-2)[0], curvature(zeros, zeros, zeros, 1e-2)[0]

    key = RunKey(b"k" * 32)
    g, k = releases(key)
    assert g != 0 and k != 0 and not math.isclose(abs(g), k)  # pure noise, two different draws
    assert releases(key) == (g, k)
