"""The server's aggregation rules on a synthetic federation with label skew: which replies each rule keeps, and how
far the aggregate moves along the task's direction, with 0, 1 or 2 sign-flipping clients of 8 (issue 35).

Why a model: the real rows (benchmarks/federated_attacks.py) take ~28 min of one core each and give one seed on 200
dev examples (one standard error ~2.5 points); this shows the mechanism behind them in two minutes. Each honest
client c sends

    Delta_c = tau t + s_c b + n_c,   |t| = |b| = 1,  s_c = +1 for 4 clients and -1 for the other 4,  n_c ~ N(0, 0.25 / d)

t is the task's direction (what every client learns), b the pull of a client's label skew (Dirichlet 0.5 gives each
client mostly one label, so half the clients push one way and half the other), tau their ratio. A sign-flipping
client sends -Delta_c. 4 of 8 clients are sampled per round, 30 rounds, 40 trials; the aggregate is sum_k w_k Delta_k
over the kept replies with w_k = 1/4 (a dropped reply's weight goes to nobody, as in bounds.aggregate). Reported:
progress along t summed over the rounds (all-honest mean: 30 tau), |drift along b|, the share of honest and of
flipped replies each rule keeps.

Rules: mean (--robust none); median (coordinate-wise); direction (the default for LoRA replies: cos with the median
of all the round's replies > 0, bounds.agreeing); direction-loo (an experiment, measured on the real rows as
*-direction-loo: cos with the median of the *other* replies > 0); standing (tried as --robust standing on the
real rows, *-standing, and withdrawn: keep while the client's leave-one-out agreement summed over the rounds it
replied in stays > 0); trust (--robust trust, FLTrust: each reply weighted by max(0, cos) with the server's own
update on root data with both labels, modelled as tau t + n_0, and rescaled to its norm; bounds.trusted). A reply
counts as kept when its trust weight is > 0.
Usage: python benchmarks/robust_rules.py [--trials 40]   Results: benchmarks/results/robust_rules.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from slimtune.federated.bounds import agreeing, coordinate_median, cosine, trusted

OUT = Path(__file__).resolve().parent / "results" / "robust_rules.json"
RULES = ("mean", "median", "direction", "direction-loo", "standing", "trust")
TAUS = (2.0, 1.0, 0.5)  # task / label-skew pull: early rounds (task-dominated) to late ones (skew-dominated)
DIM, CLIENTS, PER_ROUND, ROUNDS = 4000, 8, 4, 30


def leave_one_out_agreement(deltas: list[dict], theta: dict) -> list[float]:
    """cos(Delta_k, m_-k) per reply, m_-k the coordinate-wise median of the *other* replies (1.0 for a lone reply)."""
    cosines = []
    for k, d in enumerate(deltas):
        others = deltas[:k] + deltas[k + 1:]
        if not others:
            cosines.append(1.0)
            continue
        reference = {name: coordinate_median([o[name] for o in others]) for name in theta}
        cosines.append(round(cosine(d, reference, theta), 4))
    return cosines


class Standing:
    """Each client's leave-one-out agreement summed over the rounds it replied in; a reply is kept iff the sum, this
    round included, is > 0. The idea: under label skew the b term of one round's cosine averages out over rounds while
    the t term keeps its sign. On the real rows it failed: with two flippers the early rounds, which they dominate,
    gave honest clients negative sums that later rounds did not undo (sign-flip-2of8-standing)."""

    def __init__(self):
        self.scores: dict[int, float] = {}

    def keep(self, nodes: list[int], cosines: list[float]) -> list[bool]:
        for node, cos in zip(nodes, cosines):
            self.scores[node] = self.scores.get(node, 0.0) + cos
        return [self.scores[node] > 0 for node in nodes]


def kept(rule: str, replies: list[torch.Tensor], clients: list[int], standing: Standing) -> list[bool]:
    if rule in ("mean", "median"):
        return [True] * len(replies)
    deltas, theta = [{"x": r} for r in replies], {"x": replies[0]}
    if rule == "direction":
        return agreeing(deltas, theta)
    cosines = leave_one_out_agreement(deltas, theta)
    if rule == "direction-loo":
        return [c > 0 for c in cosines]
    return standing.keep(clients, cosines)


def federation(rule: str, tau: float, flipped: int, rng: random.Random, gen: torch.Generator) -> dict:
    t = torch.randn(DIM, generator=gen)
    b = torch.randn(DIM, generator=gen)
    t, b = t / t.norm(), b / b.norm()
    skew = [1] * (CLIENTS // 2) + [-1] * (CLIENTS // 2)
    rng.shuffle(skew)
    standing = Standing()
    progress = drift = 0.0
    counts = {"honest": [0, 0], "flipped": [0, 0]}  # [kept, sent]
    for _ in range(ROUNDS):
        clients = rng.sample(range(CLIENTS), PER_ROUND)
        replies = []
        for c in clients:
            honest = tau * t + skew[c] * b + 0.5 * torch.randn(DIM, generator=gen) / DIM ** 0.5
            replies.append(-honest if c < flipped else honest)
        # the server's own update (trust): the task's pull and noise, no label's pull (its root data has both
        # labels); drawn for every rule, so that every rule sees the same federations
        reference = {"x": tau * t + 0.5 * torch.randn(DIM, generator=gen) / DIM ** 0.5}
        if rule == "trust":
            cosines: list = []
            update = trusted([{"x": r} for r in replies], reference, reference, [1 / PER_ROUND] * PER_ROUND,
                             cosines)["x"]
            keep = [c > 0 for c in cosines]
        elif rule == "median":
            update, keep = coordinate_median(replies), [True] * len(replies)
        else:
            keep = kept(rule, replies, clients, standing)
            update = sum((r for r, k in zip(replies, keep) if k), torch.zeros(DIM)) / PER_ROUND
        progress += float(update @ t)
        drift += float(update @ b)
        for c, k in zip(clients, keep):
            side = counts["flipped" if c < flipped else "honest"]
            side[0] += k
            side[1] += 1
    return {"progress": progress, "drift": abs(drift), **counts}


def measure(trials: int) -> dict:
    rows = {}
    for tau in TAUS:
        for flipped in (0, 1, 2):
            for rule in RULES:
                rng, gen = random.Random(0), torch.Generator().manual_seed(0)  # the same federations for every rule
                runs = [federation(rule, tau, flipped, rng, gen) for _ in range(trials)]
                honest = [sum(r["honest"][i] for r in runs) for i in (0, 1)]
                flip = [sum(r["flipped"][i] for r in runs) for i in (0, 1)]
                rows[f"tau{tau:g}-{flipped}of8-{rule}"] = {
                    "tau": tau, "flipped": flipped, "rule": rule,
                    "progress": sum(r["progress"] for r in runs) / trials,
                    "all_honest_mean_progress": ROUNDS * tau,
                    "drift": sum(r["drift"] for r in runs) / trials,
                    "honest_kept": honest[0] / honest[1],
                    "flipped_kept": flip[0] / flip[1] if flip[1] else None}
    return {"trials": trials, "dim": DIM, "clients": CLIENTS, "per_round": PER_ROUND, "rounds": ROUNDS, "rows": rows}


def table(results: dict | None) -> str:
    if not results:
        return "(not run yet: `python benchmarks/robust_rules.py`)"
    lines = ["| tau (task / skew) | flipping clients | rule | progress along t (all-honest mean: 30 tau) | "
             "drift along b | honest replies kept | flipped replies kept |", "|" + "---|" * 7]
    for r in results["rows"].values():
        flipped = "-" if r["flipped_kept"] is None else f"{r['flipped_kept']:.2f}"
        lines.append(f"| {r['tau']:g} | {r['flipped']} of 8 | {r['rule']} | {r['progress']:.1f} | {r['drift']:.1f} | "
                     f"{r['honest_kept']:.2f} | {flipped} |")
    return "\n".join(lines) + (f"\n\n{results['trials']} trials of {results['rounds']} rounds, "
                               f"{results['per_round']} of {results['clients']} clients a round, d = {results['dim']}.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = measure(args.trials)
    OUT.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
