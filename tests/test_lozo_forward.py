"""LOZO's forward-hook perturbation: the same trajectory as perturbing the weights in place, W never perturbed."""

import copy

import pytest
import torch

from slimtune.train.classification import encode, label_token_ids, per_example_losses
from slimtune.data import get_task
from slimtune.zo import LOZO, LOZOConfig


def _setup(tiny, **cfg):
    model, tok, examples = tiny
    for p in model.parameters():
        p.requires_grad_(True)
    batch = encode(tok, examples[:8])
    ids = label_token_ids(tok, get_task("sst2"))
    return model, (lambda m: (lambda: per_example_losses(m, batch, ids))), LOZOConfig(**cfg)


def _run(model, closure, cfg, hooks: bool, steps: int):
    opt = LOZO(list(model.named_parameters()), copy.deepcopy(cfg), model=model if hooks else None)
    grads = [opt.step(closure).info["projected_grad"] for _ in range(steps)]
    return opt, grads


@pytest.mark.parametrize("momentum,n_spsa", [(0.0, 1), (0.9, 1), (0.0, 2)])
def test_hooked_lozo_follows_the_in_place_trajectory(tiny, momentum, n_spsa):
    model, make_closure, cfg = _setup(tiny, lr=1e-3, eps=1e-2, rank=2, nu=3, seed=3, momentum=momentum,
                                      n_spsa=n_spsa, weight_decay=0.01)
    twin = copy.deepcopy(model)
    hooked, g_hooked = _run(model, make_closure(model), cfg, hooks=True, steps=5)
    plain, g_plain = _run(twin, make_closure(twin), cfg, hooks=False, steps=5)
    assert hooked.hooked and not plain.hooked
    assert g_hooked == pytest.approx(g_plain, rel=1e-3, abs=1e-4)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_hooks_cover_every_linear_and_embedding_weight_and_nothing_else(tiny):
    model, make_closure, cfg = _setup(tiny)
    opt = LOZO(list(model.named_parameters()), cfg, model=model)
    hooked = {opt.params[i][0] for i in opt.hooked}
    linear_or_embedding = {n for n, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Embedding)}
    expected = {f"{n}.weight" for n in linear_or_embedding} & {n for n, _, _ in opt.params}
    assert hooked == expected and hooked
    assert all(p.ndim == 2 for i, (_, p, _) in enumerate(opt.params) if i in opt.hooked)
    assert any(p.ndim == 1 for _, p, _ in opt.params)  # norms: perturbed in place


def test_hooked_matrices_are_never_perturbed_so_restore_is_exact(tiny):
    """With lr 0 a step must leave hooked weights bit-identical (in place, +eps, -2 eps, +eps drifts a few ulp)."""
    model, make_closure, cfg = _setup(tiny, lr=0.0, eps=1e-2, rank=2, nu=3)
    opt = LOZO(list(model.named_parameters()), cfg, model=model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    closure = make_closure(model)

    def watching():
        seen.append(all(torch.equal(p, before[n]) for n, p in model.named_parameters()
                        if n in {opt.params[i][0] for i in opt.hooked}))
        return closure()

    out = opt.step(watching)
    assert seen == [True, True]  # measured with W untouched: the hooks carried the perturbation
    assert out.info["projected_grad"] != 0  # ... and the perturbation did change the loss
    for i in opt.hooked:
        name, p, _ = opt.params[i]
        assert torch.equal(p, before[name]), name
    assert opt._shift == 0.0


def test_hooks_are_inert_outside_a_measurement(tiny):
    model, make_closure, cfg = _setup(tiny, lr=1e-3, eps=1e-2)
    closure = make_closure(model)
    with torch.inference_mode():
        reference = closure()
    opt = LOZO(list(model.named_parameters()), cfg, model=model)
    with torch.inference_mode():
        assert torch.equal(closure(), reference)
    opt.remove_hooks()
    assert not opt.hooked and not any(m._forward_hooks for m in model.modules())


def test_an_optimizer_rebuilt_each_round_leaves_no_hooks_behind(tiny):
    """Federated clients build one optimizer per round on the same model: old hooks must go with old optimizers."""
    import gc
    model, make_closure, cfg = _setup(tiny, lr=1e-3, eps=1e-2)
    for _ in range(3):
        opt = LOZO(list(model.named_parameters()), cfg, model=model)
        opt.step(make_closure(model))
        del opt
        gc.collect()
    assert not any(m._forward_hooks for m in model.modules())
