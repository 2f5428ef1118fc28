"""How much of the server's theta can clients rebuild from what they receive? (FedLPP's model-IP measurements)

A client only ever holds the broadcasts Q(theta_1) .. Q(theta_T) (dequantized). Three estimates of theta, each scored
on the server's evaluation data next to theta itself:

(a) received:    theta_hat = Q(theta_T), the model a client takes away after the last round.
(c) multi-round: theta_hat = (1/W) sum_{t=T-W+1..T} Q(theta_t), the mean of the last W broadcasts. With a
                 deterministic quantizer the rounding error e_t = Q(theta_t) - theta_t is a fixed function of theta_t:
                 while theta moves less than one quantization step the e_t are (nearly) equal and averaging removes
                 nothing; only theta's own motion across level boundaries acts as a dither that averaging can exploit.
(b) coalition:   k clients pool their data and fine-tune from the better of (a) and (c) for the compute one client
                 gets in the whole run (rounds x local_steps steps of the local optimizer, its non-private version).

The report gives each estimate's accuracy (or loss), the best attack, and the recovered fraction
(score(attack) - score(Q)) / (score(theta) - score(Q)). A reference that is not a reconstruction: the coalition
fine-tuning a fresh LoRA of its own (`scratch_start`) for the same steps — what its data alone is worth.
"""

from __future__ import annotations

from collections import deque

import torch

from slimtune.data import EpochSampler
from slimtune.federated.config import FederatedConfig
from slimtune.federated.model import load_lora_state, lora_state
from slimtune.federated.root_reference import reference_optimizer
from slimtune.optim import OptimizerArgs, build_optimizer



class BroadcastHistory:
    """The last `window` broadcasts as a client dequantizes them (what a colluding client can keep)."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"attack window must be >= 1, got {window}")
        self.items: deque[dict[str, torch.Tensor]] = deque(maxlen=window)

    def add(self, received: dict[str, torch.Tensor]) -> None:
        self.items.append({k: v.detach().clone() for k, v in received.items()})

    def mean(self) -> dict[str, torch.Tensor]:
        """theta_hat = (1/W) sum_t Q(theta_t) over the kept broadcasts."""
        if not self.items:
            raise ValueError("no broadcast recorded yet")
        return {k: torch.stack([s[k] for s in self.items]).mean(0) for k in self.items[0]}


def coalition_data(cfg: FederatedConfig, train: list, split: tuple[list[int], list[str], int]) -> list:
    """The pooled training examples of clients 0..k-1 (the same Dirichlet split the clients use); `split`:
    model.build_model_and_split's rows of the reading `train` comes from."""
    from slimtune.federated.partition import dirichlet_partition

    labels, keys, num_labels = split
    parts = dirichlet_partition(labels, keys, cfg.num_clients, cfg.dirichlet_alpha, cfg.seed, num_labels=num_labels)
    return [train[i] for p in parts[:cfg.attack_coalition] for i in p]


def coalition_finetune(model, objective, start: dict[str, torch.Tensor], examples: list, cfg: FederatedConfig,
                       steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Fine-tune the LoRA state `start` on the coalition's pooled `examples` for `steps` steps; returns the result.
    Leaves `model` holding that result (callers reload what they need)."""
    if not examples:
        raise ValueError("the coalition holds no training examples")
    load_lora_state(model, start)
    name = reference_optimizer(cfg.local_optimizer)  # attackers fine-tune their own pooled data without DP
    optimizer = build_optimizer(name, model, OptimizerArgs(lr=cfg.lr, eps=cfg.eps, seed=seed), None)
    sampler = EpochSampler(len(examples), cfg.batch_size, seed)
    model.train(not optimizer.zeroth_order)
    for step in range(steps):
        batch = objective.encode([examples[i] for i in sampler.indices(step)], cfg.max_length)
        optimizer.step(lambda: objective.losses(model, batch))
    model.eval()
    return lora_state(model)


def recovered(attack: float | None, received: float | None, theta: float | None) -> float | None:
    """Fraction of the gap between Q(theta) and theta that an attack closes (1: it rebuilt theta's quality)."""
    if None in (attack, received, theta) or abs(theta - received) < 1e-12:
        return None
    return (attack - received) / (theta - received)


def attack_report(score, higher_is_better: bool, theta: dict, history: BroadcastHistory, model, objective,
                  examples: list, cfg: FederatedConfig, scratch_start: dict | None = None) -> dict:
    """Scores of theta, (a), (c) and (b); `score(state)` evaluates a LoRA state on the server's eval data."""
    best_of = max if higher_is_better else min
    received, averaged = history.items[-1], history.mean()
    scores = {"theta": score(theta), "received": score(received), "multi_round": score(averaged)}
    start = received if best_of(scores["received"], scores["multi_round"]) == scores["received"] else averaged
    steps = cfg.rounds * cfg.local_steps
    attacked = coalition_finetune(model, objective, start, examples, cfg, steps, seed=cfg.seed + 7919)
    scores["coalition"] = score(attacked)
    if scratch_start is not None:
        scores["scratch"] = score(coalition_finetune(model, objective, scratch_start, examples, cfg, steps,
                                                     seed=cfg.seed + 7919))
    best = best_of(scores["received"], scores["multi_round"], scores["coalition"])
    return {"attack_theta_score": scores["theta"], "attack_received_score": scores["received"],
            "attack_multi_round_score": scores["multi_round"], "attack_coalition_score": scores["coalition"],
            "attack_coalition_from_scratch_score": scores.get("scratch"),
            "attack_best_score": best, "attack_recovered_fraction": recovered(best, scores["received"], scores["theta"]),
            "attack_coalition_clients": cfg.attack_coalition, "attack_coalition_examples": len(examples),
            "attack_coalition_steps": steps, "attack_window": len(history.items)}
