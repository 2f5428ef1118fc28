"""Zeroth-order engine: unbiasedness, in-place restore, seed reproducibility, LOZO structure and U consistency."""

import torch
from torch import nn

from slimtune.zo import LOZO, LOZOConfig, MeZO, MeZOConfig


class Quadratic(nn.Module):
    def __init__(self, dim=(4, 3)):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(dim))
        self.target = torch.randn(dim)
        self.a = torch.rand(dim) + 0.5

    def loss(self):
        return (0.5 * self.a * (self.w - self.target) ** 2).sum().reshape(1)

    def grad(self):
        return self.a * (self.w.detach() - self.target)


def estimate_direction(opt_cls, cfg, model, step):
    """Return the applied update / (-lr) for one step: the gradient estimate."""
    opt = opt_cls(model.named_parameters(), cfg)
    opt.step_count = step
    before = model.w.detach().clone()
    opt.step(model.loss)
    est = (model.w.detach() - before) / (-cfg.lr)
    with torch.no_grad():
        model.w.copy_(before)
    return est


def test_mezo_gradient_estimate_is_unbiased_for_a_quadratic():
    model = Quadratic()
    cfg = MeZOConfig(lr=1e-3, eps=1e-4, seed=1)
    n = 3000
    mean = sum(estimate_direction(MeZO, cfg, model, s) for s in range(n)) / n
    true = model.grad()
    assert torch.linalg.norm(mean - true) / torch.linalg.norm(true) < 0.1


def test_lozo_gradient_estimate_is_unbiased_for_a_quadratic():
    model = Quadratic((6, 5))
    n = 3000
    total = torch.zeros(6, 5)
    for s in range(n):  # fresh V each step (nu=1) so the expectation is over both U and V
        total += estimate_direction(LOZO, LOZOConfig(lr=1e-3, eps=1e-4, seed=2, rank=2, nu=1), model, s)
    true = model.grad()
    assert torch.linalg.norm(total / n - true) / torch.linalg.norm(true) < 0.15


def test_perturb_and_restore_drift_is_bounded_by_a_few_ulp():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(1000, 37))
    opt = MeZO([("w", p)], MeZOConfig(eps=1e-3, chunk_size=4096))
    theta = p.detach().clone()
    for alpha in (1e-3, -2e-3, 1e-3):
        opt._sweep(seed=123, op="add", alpha=alpha)
    drift = (p.detach() - theta).abs()
    ulp = torch.finfo(torch.float32).eps * (theta.abs() + 2e-3 * 6)  # |z| < 6 for 37k Gaussian draws
    assert bool((drift <= 4 * ulp).all()), f"max drift {drift.max().item()}"


def test_perturbation_is_in_place_and_chunked():
    p = nn.Parameter(torch.zeros(10_000))
    ptr = p.data_ptr()
    opt = MeZO([("w", p)], MeZOConfig(chunk_size=1000))
    opt._sweep(seed=7, op="add", alpha=1.0)
    assert p.data_ptr() == ptr
    assert opt._buffers[(p.device, p.dtype)].numel() == 1000  # temporaries bounded by the chunk, not the weight
    assert 0.9 < p.detach().std().item() < 1.1


def test_same_seed_same_trajectory_and_different_seed_differs():
    def run(seed):
        model = Quadratic()
        opt = MeZO(model.named_parameters(), MeZOConfig(lr=1e-2, eps=1e-3, seed=seed))
        for _ in range(5):
            opt.step(model.loss)
        return model.w.detach().clone()

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_weight_decay_skips_biases_and_norms():
    w, b = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3))
    opt = MeZO([("layer.weight", w), ("layer.bias", b)], MeZOConfig(lr=0.1, weight_decay=0.5, eps=1e-3))
    opt.step(lambda: torch.zeros(2))  # zero loss difference: only decay acts
    assert torch.allclose(w.detach(), torch.full((3, 3), 0.95), atol=1e-5)
    assert torch.allclose(b.detach(), torch.ones(3), atol=1e-5)


def test_n_spsa_averages_estimates():
    model = Quadratic()
    opt = MeZO(model.named_parameters(), MeZOConfig(lr=1e-2, eps=1e-3, n_spsa=4))
    before = model.loss().item()
    for _ in range(30):
        opt.step(model.loss)
    assert model.loss().item() < before


def _lozo_update_and_perturbation(step, nu=3):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 6))
    cfg = LOZOConfig(lr=0.1, eps=1e-2, rank=2, nu=nu, seed=5)
    opt = LOZO([("w", w)], cfg)
    for _ in range(step):  # advance to `step`, possibly a V-resample step
        opt.step(lambda: (w ** 2).sum().reshape(1))
    theta = w.detach().clone()
    seen = {}

    def closure():
        if "plus" not in seen:
            seen["plus"] = w.detach() - theta  # eps * Z as applied for the measurement
        return (w ** 2).sum().reshape(1) * (1 + len(seen))

    opt.step(closure)
    return seen["plus"], w.detach() - theta, cfg


def test_lozo_update_uses_the_same_u_as_the_measurement_on_resample_steps():
    for step in (0, 1, 3, 6):  # 0, 3, 6 are resample steps for nu=3
        perturbation, update, cfg = _lozo_update_and_perturbation(step)
        cos = torch.nn.functional.cosine_similarity(perturbation.flatten(), update.flatten(), dim=0).abs()
        assert cos > 0.9999, f"step {step}: update not along the measured direction (cos={cos:.4f})"


def test_lozo_update_has_rank_r():
    _, update, cfg = _lozo_update_and_perturbation(4)
    s = torch.linalg.svdvals(update)
    assert (s > 1e-6 * s[0]).sum().item() == cfg.rank


def test_lozo_m_momentum_is_compressed_and_projected():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 12))
    opt = LOZO([("w", w)], LOZOConfig(lr=1e-3, eps=1e-3, rank=3, nu=2, momentum=0.9))
    target = torch.randn(16, 12)
    loss = lambda: ((w - target) ** 2).sum().reshape(1)
    start = loss().item()
    for _ in range(200):
        opt.step(loss)
    assert opt.momentum[0].shape == (16, 3)  # m x r, never m x n
    assert loss().item() < 0.75 * start


def test_lozo_state_round_trip_reproduces_the_trajectory():
    def make():
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(8, 6))
        return w, LOZO([("w", w)], LOZOConfig(lr=1e-2, eps=1e-3, rank=2, nu=3, momentum=0.9))

    w1, o1 = make()
    for _ in range(7):
        o1.step(lambda: (w1 ** 2).sum().reshape(1))
    w2, o2 = make()
    for _ in range(4):
        o2.step(lambda: (w2 ** 2).sum().reshape(1))
    state, weights = o2.state_dict(), w2.detach().clone()
    w3, o3 = make()
    with torch.no_grad():
        w3.copy_(weights)
    o3.load_state_dict(state)
    for _ in range(3):
        o3.step(lambda: (w3 ** 2).sum().reshape(1))
    assert torch.equal(w1.detach(), w3.detach())


def test_fzoo_step_follows_the_gradient_normalised_by_the_loss_spread():
    from slimtune.zo import FZOO, FZOOConfig
    model = Quadratic((6, 4))
    total = torch.zeros(6, 4)
    for s in range(400):
        total += estimate_direction(FZOO, FZOOConfig(lr=1e-3, eps=1e-4, seed=3, n_perturbations=8), model, s)
    true = model.grad()
    cos = torch.nn.functional.cosine_similarity(total.flatten(), true.flatten(), dim=0)
    assert cos > 0.9  # E[step] is along the gradient
    # sigma ~ eps |grad|: a step's size does not scale with the gradient's magnitude (normalised SGD)
    small = Quadratic((6, 4))
    with torch.no_grad():
        small.w.copy_(small.target + 1e-3 * (model.w - model.target))  # 1000x smaller gradient
    big_step = estimate_direction(FZOO, FZOOConfig(lr=1e-3, eps=1e-6, seed=3), model, 0).norm()
    small_step = estimate_direction(FZOO, FZOOConfig(lr=1e-3, eps=1e-6, seed=3), small, 0).norm()
    assert 0.2 < (small_step / big_step).item() < 5
