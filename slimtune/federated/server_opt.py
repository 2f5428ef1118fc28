"""Server-side optimizers on the aggregated LoRA update (Reddi et al., "Adaptive Federated Optimization", 2021;
Flower's FedAvgM / FedAdam / FedYogi semantics and defaults).

The round's aggregate Delta_t (weighted mean of client deltas, or the clipped and noised mean under client-level DP:
the optimizer only post-processes what DP released) is treated as a pseudo-gradient step:

    fedavg:   theta <- theta + eta Delta                               (eta = 1: plain FedAvg / FedIT)
    fedavgm:  m <- beta m + Delta;                theta <- theta + eta m
    fedadam:  m <- b1 m + (1 - b1) Delta;  v <- b2 v + (1 - b2) Delta^2;                theta <- theta + eta m / (sqrt(v) + tau)
    fedyogi:  m as fedadam;  v <- v - (1 - b2) Delta^2 sign(v - Delta^2);              theta <- theta + eta m / (sqrt(v) + tau)

Tensors whose update is identically zero (A under FFA-LoRA) stay unchanged under every rule. The state (m, v) stays
on the server; only Q(theta) is ever broadcast.

Optionally the server also keeps an exponential moving average of its iterates (`--server-average beta`):

    theta_bar_1 = theta_1;   theta_bar_t = beta theta_bar_{t-1} + (1 - beta) theta_t

Clients keep training from (and receiving) Q(theta_t); theta_bar is the server's model: the one it evaluates, saves
and measures the attacks against. Averaging the iterates of a noisy trajectory (client sampling, non-IID shards,
server momentum) is Polyak-Ruppert averaging: it damps round-to-round oscillation, and it takes for the server the
gain that clients could otherwise get by averaging the broadcasts they kept (attacks.py, estimate (c)).
theta_bar is a function of the released theta_t only, so client-level DP covers it as post-processing.
"""

from __future__ import annotations

import torch

from slimtune import SlimtuneError

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
DEFAULT_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-1, "fedyogi": 1e-2}  # Flower's defaults
DEFAULT_TAU = {"fedadam": 1e-9, "fedyogi": 1e-3}

# The server step a run gets when --server-optimizer is not given, by the clients' local optimizer family:
# (optimizer, server lr, iterate-average decay, fedavgm momentum), applied as a unit. benchmarks/federated_sweep.py
# (SST-2, 8 non-IID clients, 4 per round, 4-bit broadcast, 10 rounds, scored on 200 held-out *training* rows by the
# mean of the last 3 rounds) scored FedAdam at server lr 3e-3 with averaging 0.8: 0.853, FedAvgM momentum 0.5 (lr 1,
# no averaging): 0.850, FedAdam 1e-3: 0.800, FedAvgM 0.9: 0.772, FedAdam 3e-3 without averaging: 0.725. FedAdam was
# the default until the hostile-client rows (benchmarks/federated_attacks.py) showed what its per-coordinate
# normalisation does to a consistent push: one sign-flipping client of 8, a quarter of the aggregate in half the
# rounds, took theta from 0.865 to 0.79 late in training, when the honest replies are small and disagree and the
# hostile one is turned into full steps. FedAvgM (0.5), a tie in the sweep, moves theta by what the replies add up to,
# so a reply within the norm bound moves it by at most its share times 1 / (1 - beta) over the rounds (momentum
# replays a round's aggregate: 2x at 0.5; a review measured 1.875x after four rounds). Other local optimizers were not
# swept and keep plain FedAvg: FedAdam's normalisation would also turn any delta, however small or noisy (a ZO
# client's), into a step of ~server-lr per coordinate.
FEDAVGM_MOMENTUM = 0.9  # --server-momentum when --server-optimizer fedavgm is chosen without it
SWEPT_DEFAULTS = {"adamw": ("fedavgm", 1.0, 0.0, 0.5)}
UNSWEPT_DEFAULT = ("fedavg", None, 0.0, FEDAVGM_MOMENTUM)  # fedavg has no momentum: the value only fills the config


def server_defaults(local_optimizer: str, mode: str = "lora") -> tuple[str, float | None, float, float]:
    """(server optimizer, server lr, iterate-average decay, momentum) for a run that does not choose its server
    step."""
    clients_run = "mezo" if mode == "zo-seeds" else local_optimizer  # zo-seeds clients always run MeZO
    return SWEPT_DEFAULTS.get(clients_run, UNSWEPT_DEFAULT)


class ServerOptimizer:
    def __init__(self, name: str = "fedavg", lr: float | None = None, momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float | None = None):
        if name not in SERVER_OPTIMIZERS:
            raise SlimtuneError(f"--server-optimizer {name!r}: choose one of {', '.join(SERVER_OPTIMIZERS)}")
        self.name, self.lr = name, DEFAULT_LR[name] if lr is None else lr
        if not self.lr > 0:
            raise SlimtuneError(f"--server-lr must be > 0, got {self.lr}")
        self.momentum, self.beta1, self.beta2 = momentum, beta1, beta2
        self.tau = DEFAULT_TAU.get(name, 0.0) if tau is None else tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the moments (after a step the server refused to take)."""
        self.m, self.v = {}, {}

    def finite(self) -> bool:
        return all(torch.isfinite(t).all() for state in (self.m, self.v) for t in state.values())

    def apply(self, theta: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        new = {}
        for k, value in theta.items():
            d = delta[k].float()
            if self.name == "fedavg":
                step = d
            elif self.name == "fedavgm":
                self.m[k] = self.momentum * self.m.get(k, torch.zeros_like(d)) + d
                step = self.m[k]
            else:
                m = self.m[k] = self.beta1 * self.m.get(k, torch.zeros_like(d)) + (1 - self.beta1) * d
                v, d2 = self.v.get(k, torch.zeros_like(d)), d * d
                v = self.beta2 * v + (1 - self.beta2) * d2 if self.name == "fedadam" else \
                    v - (1 - self.beta2) * d2 * torch.sign(v - d2)
                self.v[k] = v
                step = m / (v.sqrt() + self.tau)
                step = torch.where(v > 0, step, torch.zeros_like(step))  # never-updated tensors stay put
            new[k] = value + self.lr * step
        return new


class IterateAverage:
    """theta_bar_t = beta theta_bar_{t-1} + (1 - beta) theta_t, started at the first update (beta = 0: theta_t)."""

    def __init__(self, beta: float = 0.0):
        if not 0 <= beta < 1:
            raise SlimtuneError(f"--server-average {beta:g}: must be in [0, 1) (0: off; 0.8 averages ~5 rounds)")
        self.beta = beta
        self.value: dict[str, torch.Tensor] | None = None

    def update(self, theta: dict[str, torch.Tensor]) -> None:
        if self.value is None or self.beta == 0:
            self.value = {k: v.detach().clone() for k, v in theta.items()}
            return
        self.value = {k: self.beta * self.value[k] + (1 - self.beta) * v for k, v in theta.items()}
