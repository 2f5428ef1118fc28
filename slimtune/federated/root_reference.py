"""The server's own update on its root data: the reference of --robust trust (FLTrust, Cao et al., NDSS 2021).

Each round the server starts from Q(theta), exactly what the clients received, and runs one client's round on a
small labelled set of its own (`--root-data`, e.g. 100 examples of the task, never the evaluation data):

    Delta_0 = train(Q(theta); root data, local_steps steps of batch_size) - Q(theta)

with the clients' recipe (lr, steps, batch size) and the non-private form of their optimizer (dp-adamw -> adamw: the
root data is the server's, so there is nothing to protect; the clients' own DP is unchanged). bounds.trusted then
weighs each reply by its cosine with Delta_0. No client can move Delta_0, which is what the round's median (the
direction filter) lacked: two sign-flipping clients of 8 are a third of some rounds' replies.

What it changes in the threat model: the server needs a few labelled examples of the task (FLTrust: 100 suffice),
and its root data must resemble the clients' task (not their label mix: a balanced set is what makes honest replies
with skewed labels agree with it). The root data never leaves the server, and nothing about it is sent to clients.
"""

from __future__ import annotations

import torch

from slimtune.federated.local_steps import release_hooks, run_steps
from slimtune.federated.model import load_lora_state, lora_state
from slimtune.optim import OptimizerArgs, build_optimizer
from slimtune.optim.base import mix_seed
from slimtune.optim.methods import METHODS

ROOT_STREAM = 2**32 - 1  # the root data's batch order: a seed stream no client's partition id reaches


def reference_optimizer(local_optimizer: str) -> str:
    """The clients' optimizer without DP (a private one's family in optim/methods.py, e.g. dp-adamw -> adamw): the
    server's on its root data, and the coalition attack's on its own pooled data (attacks.py)."""
    method = METHODS[local_optimizer]
    return method.family if method.private else method.name


def load_root_data(path: str, objective, tokenizer) -> list:
    """The root data's examples through the task's objective (the same reader and checks as the clients' data)."""
    raw, _ = objective.load(path, "train")
    return objective.examples(raw, tokenizer)


class RootReference:
    """callable(start, server_round) -> Delta_0 over the LoRA entries, from the LoRA state `start` (Q(theta))."""

    def __init__(self, cfg, model, objective, examples: list):
        if not examples:
            raise ValueError("--root-data holds no examples")
        self.cfg, self.model, self.objective, self.examples = cfg, model, objective, examples
        self.optimizer_name = reference_optimizer(cfg.local_optimizer)

    def __call__(self, start: dict[str, torch.Tensor], server_round: int) -> dict[str, torch.Tensor]:
        load_lora_state(self.model, start)
        seed = mix_seed(self.cfg.seed, server_round, ROOT_STREAM)
        optimizer = build_optimizer(self.optimizer_name, self.model,
                                    OptimizerArgs(lr=self.cfg.lr, eps=self.cfg.eps, seed=seed))
        try:
            run_steps(self.cfg, self.model, self.objective, optimizer, self.examples, seed, False)
        finally:
            release_hooks(optimizer)
            self.model.zero_grad(set_to_none=True)
        self.model.eval()
        trained = lora_state(self.model)
        return {k: trained[k] - start[k] for k in start}
