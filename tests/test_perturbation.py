"""Perturbation sources for MeZO (gaussian, rademacher, pool): restore exactness, seed replay, statistics, resume."""

import pytest
import torch
from torch import nn

from slimtune import SlimtuneError
from slimtune.zo import MeZO, MeZOConfig
from slimtune.zo.perturbation import SOURCES

from test_zo import Quadratic, estimate_direction


def z_of(source, seed, n=50_000, chunk=4096, pool_size=1 << 16):
    p = nn.Parameter(torch.zeros(n))
    MeZO([("w", p)], MeZOConfig(chunk_size=chunk, perturbation=source, pool_size=pool_size, seed=3))._sweep(
        seed=seed, op="add", alpha=1.0)
    return p.detach().clone()


@pytest.mark.parametrize("source", SOURCES)
def test_restore_is_exact_to_a_few_ulp_and_seeds_replay(source):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(1000, 37))
    opt = MeZO([("w", p)], MeZOConfig(eps=1e-3, chunk_size=4096, perturbation=source, pool_size=1 << 14))
    theta = p.detach().clone()
    for alpha in (1e-3, -2e-3, 1e-3):
        opt._sweep(seed=123, op="add", alpha=alpha)
    ulp = torch.finfo(torch.float32).eps * (theta.abs() + 2e-3 * 6)
    assert bool(((p.detach() - theta).abs() <= 4 * ulp).all())
    assert torch.equal(z_of(source, 5), z_of(source, 5)) and not torch.equal(z_of(source, 5), z_of(source, 6))


@pytest.mark.parametrize("source", SOURCES)
def test_directions_have_identity_second_moment(source):
    z = torch.stack([z_of(source, s, n=8192, chunk=1024) for s in range(200)])  # 200 directions
    second = (z * z).mean().item()
    assert abs(second - 1) < 0.05  # E[z_i^2] = 1
    cross = (z[:, :1024] * z[:, 1024:2048]).mean(0)  # two chunks: independent signs make E[z_i z_j] = 0
    assert cross.abs().mean().item() < 0.1
    if source == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("source", ["rademacher", "pool"])
def test_fast_sources_give_an_unbiased_gradient_estimate(source):
    model = Quadratic((8, 4))  # 4 chunks of 8; relative error of the mean ~ sqrt(d / n) = 0.09 (+ O(1/sqrt(P)))
    cfg = MeZOConfig(lr=1e-3, eps=1e-4, seed=1, perturbation=source, pool_size=1 << 14, chunk_size=8)
    n = 4000
    mean = sum(estimate_direction(MeZO, cfg, model, s) for s in range(n)) / n
    true = model.grad()
    assert torch.linalg.norm(mean - true) / torch.linalg.norm(true) < 0.2


def test_pool_must_hold_a_chunk_and_fast_sources_are_for_mezo_only(tmp_path, demo_paths):
    with pytest.raises(SlimtuneError, match="smaller than a chunk"):
        z_of("pool", 1, n=10_000, chunk=4096, pool_size=1024)
    from typer.testing import CliRunner
    from slimtune.cli import app
    for optimizer in ("adamw", "lozo"):
        res = CliRunner().invoke(app, ["train", "--data", demo_paths[0], "--model", "tiny-llama", "--optimizer",
                                       optimizer, "--perturbation", "pool", "--out", str(tmp_path / optimizer)])
        assert res.exit_code == 2 and "applies only to --optimizer mezo" in " ".join(res.output.split())


def test_pool_runs_resume_bit_for_bit(tmp_path, demo_paths):
    import json
    from test_train import config, weights
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.train import prepare, train

    kw = dict(optim=OptimizerArgs(lr=1e-2, eps=1e-2, perturbation="pool"), peft=PeftSettings("none"),
              lr_scheduler="constant")
    straight = train(prepare(config(tmp_path, demo_paths, "straight", **kw)))
    train(prepare(config(tmp_path, demo_paths, "resumed", **{**kw, "steps": 3})))
    train(prepare(config(tmp_path, demo_paths, "resumed", **kw), resume=True))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["optim"]["perturbation"] == "pool"
    assert straight["steps"] == 6
