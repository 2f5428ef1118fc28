"""Sparse MeZO (zo/sparse.py): only small-magnitude weights move, masks bit-packed and fixed within a step, exact
restore with every perturbation source, convergence, and exact resume across a mask refresh."""


import pytest
import torch
from torch import nn
from zo_resume import resumed

from slimtune.zo import MeZO, MeZOConfig
from slimtune.zo.sparse import SparseMeZO, SparseMeZOConfig, pack_mask, threshold, unpack_mask


def test_mask_packing_round_trips_any_length():
    torch.manual_seed(0)
    for n in (1, 7, 8, 9, 1000, 4099):
        w = torch.randn(n)
        h = threshold(w, 0.6)
        expect = (w.abs() <= h).to(torch.uint8)
        packed = pack_mask(w, h, chunk=16)
        assert packed.numel() == -(-n // 8)
        assert torch.equal(unpack_mask(packed, 0, n), expect)
        if n > 16:
            assert torch.equal(unpack_mask(packed, 16, n - 16), expect[16:])
    assert abs(expect.float().mean().item() - 0.4) < 0.02


@pytest.mark.parametrize("source", ["gaussian", "rademacher", "pool"])
def test_only_the_small_weights_move_and_restore_is_exact(source):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(200, 50))
    opt = SparseMeZO([("w", p)], SparseMeZOConfig(lr=1e-2, eps=1e-3, sparsity=0.75, chunk_size=4096,
                                                  perturbation=source, pool_size=1 << 16))
    theta = p.detach().clone()
    small = theta.abs() <= threshold(theta, 0.75)
    perturbations = []

    def closure():
        perturbations.append(p.detach() - theta)
        return (p ** 2).sum().reshape(1)

    opt.step(closure)
    for delta in perturbations:
        assert bool((delta[~small] == 0).all())  # large weights are never perturbed
        assert bool((delta[small] != 0).all())
    moved = p.detach() - theta
    assert bool((moved[~small] == 0).all()) and bool((moved[small] != 0).all())
    assert 0.23 < small.float().mean().item() < 0.27
    opt.config.lr = 0.0  # the restore alone: back to theta to a few ulp
    before = p.detach().clone()
    opt.step(lambda: (p ** 2).sum().reshape(1))
    ulp = torch.finfo(torch.float32).eps * (before.abs() + 2e-3 * 8)
    assert bool(((p.detach() - before).abs() <= 4 * ulp).all())


def test_converges_on_a_quadratic_over_the_masked_weights():
    """With the mask fixed, the step is ZO-SGD on the masked coordinates: their part of the loss goes to 0, the rest
    never moves (Sparse MeZO leaves the large weights as they are)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 6))
    target = torch.randn(8, 6)
    small = w.detach().abs() <= threshold(w.detach(), 0.5)
    loss = lambda: ((w - target) ** 2).sum().reshape(1)
    opt = SparseMeZO([("w", w)], SparseMeZOConfig(lr=2e-2, eps=1e-3, sparsity=0.5, mask_every=10**9, seed=1))
    start, large = ((w.detach() - target) ** 2)[small].sum().item(), w.detach()[~small].clone()
    for _ in range(1000):
        opt.step(loss)
    assert ((w.detach() - target) ** 2)[small].sum().item() < 1e-3 * start
    assert torch.equal(w.detach()[~small], large)


def test_fewer_values_are_perturbed_than_mezo_and_resume_across_a_mask_refresh_is_exact():
    def make():
        torch.manual_seed(0)
        w, b = nn.Parameter(torch.randn(16, 12)), nn.Parameter(torch.randn(12))
        cfg = SparseMeZOConfig(lr=1e-2, eps=1e-3, sparsity=0.8, mask_every=3, perturbation="pool", pool_size=1 << 12,
                               weight_decay=0.1)
        return w, b, SparseMeZO([("layer.weight", w), ("layer.bias", b)], cfg)

    loss = lambda w, b: ((w @ b - 1) ** 2).sum().reshape(1)
    w1, b1, o1 = make()
    for _ in range(8):
        o1.step(lambda: loss(w1, b1))
    assert 0.18 < o1.perturbed_fraction < 0.22
    w3, b3, o3 = resumed(make, loss, 4, 4)  # stops between refreshes (masks from step 3), resumes, refreshes at step 6
    assert torch.equal(w1.detach(), w3.detach()) and torch.equal(b1.detach(), b3.detach())


def test_sparsity_zero_is_mezo():
    def run(cls, cfg):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(6, 5))
        opt = cls([("w", w)], cfg)
        for _ in range(5):
            opt.step(lambda: (w ** 2).sum().reshape(1))
        return w.detach()

    sparse = run(SparseMeZO, SparseMeZOConfig(lr=1e-2, eps=1e-3, sparsity=0.0, seed=3))
    dense = run(MeZO, MeZOConfig(lr=1e-2, eps=1e-3, seed=3))
    assert torch.equal(sparse, dense)


def test_bad_settings_are_refused():
    w = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="sparsity"):
        SparseMeZO([("w", w)], SparseMeZOConfig(sparsity=1.0))
    with pytest.raises(ValueError, match="mask_every"):
        SparseMeZO([("w", w)], SparseMeZOConfig(mask_every=0))
