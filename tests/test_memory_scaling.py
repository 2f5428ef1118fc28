"""Memory model structure and the scaling-law fit."""

import pytest
import torch

from slimtune.report.memory_model import ModelShape, predict_peak_mb
from slimtune.report.scaling import fit_scaling_law, plot_scaling

SMOL = ModelShape(total_params=134_515_008, hidden=576, intermediate=1536, layers=30, heads=9, vocab=49152)


def test_memory_model_orders_optimizers_as_expected():
    full = SMOL.total_params
    p = lambda opt, trainable=full, batch=16: predict_peak_mb(SMOL, opt, trainable, batch, 64)["peak_mb"]
    assert p("adamw") > 2.5 * p("mezo")  # grads + two Adam moments on top of weights
    assert p("mezo") == pytest.approx(p("inference"), rel=0.02)  # ZO costs about what inference costs
    assert p("adamw", 460_800) < p("adamw")  # LoRA: no full-size optimizer state
    assert p("dp-adamw", 460_800) > p("adamw", 460_800)  # per-example gradients
    assert p("adamw", batch=64) > p("adamw", batch=16)  # activations grow with the batch
    parts = predict_peak_mb(SMOL, "adamw", full, 16, 64)["parts_mb"]
    assert parts["optimizer_state"] == pytest.approx(2 * parts["gradients"])


def test_scaling_law_fit_recovers_known_parameters():
    x = torch.tensor([1e3] * 4 + [1e5] * 4, dtype=torch.float64)
    d = torch.tensor([16, 64, 256, 1024] * 2, dtype=torch.float64)
    loss = 5.0 / (x ** 0.2 * d ** 0.4) + 0.3
    fit = fit_scaling_law(x, d, loss)
    assert fit.alpha == pytest.approx(0.2, abs=0.01) and fit.beta == pytest.approx(0.4, abs=0.01)
    assert fit.E == pytest.approx(0.3, abs=0.01)
    assert fit.predict(1e4, 100).item() == pytest.approx(5.0 / (1e4 ** 0.2 * 100 ** 0.4) + 0.3, rel=1e-3)


def test_scaling_plot_draws_one_panel_per_method(tmp_path):
    x = [1e3] * 3 + [1e5] * 3
    d = [16, 64, 256] * 2
    loss = [5.0 / (xi ** 0.2 * di ** 0.4) + 0.3 for xi, di in zip(x, d)]
    fit = fit_scaling_law(x, d, loss)
    plot_scaling({"lora": (fit, x, d, loss), "svfit": (fit, x, d, loss)}, tmp_path / "law.png")
    assert (tmp_path / "law.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
