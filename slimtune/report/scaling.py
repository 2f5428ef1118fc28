"""Fit the multiplicative joint scaling law of Zhang et al. (ICLR 2024): L(X, D_f) = A / (X^alpha * D_f^beta) + E.

X is a scaling factor (model size, or the PEFT parameter count), D_f the fine-tuning data size, L the dev loss.
Fitted by minimising the Huber loss of log-predictions (as the paper does) with L-BFGS from several starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScalingFit:
    A: float
    alpha: float
    beta: float
    E: float
    rmse_log: float

    def predict(self, x, d):
        x, d = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(d, dtype=torch.float64)
        return self.A / (x ** self.alpha * d ** self.beta) + self.E


def fit_scaling_law(x, d, loss, starts: int = 8) -> ScalingFit:
    x, d, loss = (torch.as_tensor(v, dtype=torch.float64) for v in (x, d, loss))
    if len(loss) < 3:
        raise ValueError("need at least 3 points to fit the scaling law")
    best = None
    gen = torch.Generator().manual_seed(0)
    for i in range(starts):
        init = torch.tensor([1.0 + i, 0.1, 0.3, float(loss.min().log()) - 1.0], dtype=torch.float64)
        init += 0.1 * torch.randn(4, generator=gen, dtype=torch.float64)
        params = init.clone().requires_grad_(True)  # log A, alpha, beta, log E
        opt = torch.optim.LBFGS([params], max_iter=500, line_search_fn="strong_wolfe")

        def objective():
            opt.zero_grad()
            log_a, alpha, beta, log_e = params
            pred = torch.logaddexp(log_a - alpha * x.log() - beta * d.log(), log_e.expand_as(x))
            value = torch.nn.functional.huber_loss(pred, loss.log(), delta=1e-3, reduction="sum")
            value.backward()
            return value

        opt.step(objective)
        with torch.no_grad():
            log_a, alpha, beta, log_e = params
            pred = torch.logaddexp(log_a - alpha * x.log() - beta * d.log(), log_e.expand_as(x))
            rmse = ((pred - loss.log()) ** 2).mean().sqrt().item()
        if torch.isfinite(torch.tensor(rmse)) and (best is None or rmse < best.rmse_log):
            best = ScalingFit(log_a.exp().item(), alpha.item(), beta.item(), log_e.exp().item(), rmse)
    return best


def plot_scaling(fits: dict[str, tuple[ScalingFit, list, list, list]], path) -> None:
    """fits: method -> (fit, X, D_f, L). One panel per method, one fitted curve over D_f per X."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 4), squeeze=False, sharey=True)
    for ax, (method, (fit, xs, ds, ls)) in zip(axes[0], fits.items()):
        grid = torch.logspace(torch.log10(torch.tensor(min(ds))), torch.log10(torch.tensor(max(ds))), 50)
        for x in sorted(set(xs)):
            measured = [(d, loss) for xi, d, loss in zip(xs, ds, ls) if xi == x]
            line = ax.scatter(*zip(*measured), label=f"X={x:,} (measured)")
            ax.plot(grid, fit.predict(x, grid), color=line.get_facecolor()[0], label=f"X={x:,} (fit)")
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning examples D_f")
        ax.set_title(f"{method}: L = {fit.A:.2f} / (X^{fit.alpha:.2f} D^{fit.beta:.2f}) + {fit.E:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("dev loss")
    fig.suptitle("Multiplicative joint scaling law (Zhang et al., 2024)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
