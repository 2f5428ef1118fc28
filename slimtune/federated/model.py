"""The model server and clients share: the base model with its LoRA structure, which LoRA entries are trained, and
LoRA state as a dict of tensors."""

from __future__ import annotations

import secrets

import torch

from slimtune.peft import PeftSettings, apply_peft


def secret_seed() -> int:
    """A seed from OS entropy for the server's secret randomness (theta_0, the dither, client-DP noise): never derived
    from the public settings, never sent."""
    return secrets.randbits(63)


def build_model(cfg, lora_seed: int | None = None):
    """(model with LoRA, tokenizer, train examples, eval examples, objective): the same base on server and clients.

    `lora_seed` seeds the LoRA initialisation theta_0. The server passes a secret one (OS entropy): clients only ever
    hold Q(theta), so they cannot rebuild theta_0 (with FFA, the frozen A) from the public settings.
    """
    from slimtune.train.objectives import load_model_and_data

    objective = federated_objective(cfg)
    model, tok, train, evals = load_model_and_data(objective, cfg.model, cfg.data, cfg.eval_data or None, cfg.seed)
    if cfg.eval_max and len(evals) > cfg.eval_max:
        evals = evals[:cfg.eval_max]
    torch.manual_seed(cfg.seed if lora_seed is None else lora_seed)
    model = apply_peft(model, PeftSettings("lora", r=cfg.lora_r, alpha=2 * cfg.lora_r))
    for name, p in model.named_parameters():
        if "lora_" in name and not is_trained(name, cfg):
            p.requires_grad_(False)
    return model, tok, train, evals, objective


def federated_objective(cfg):
    """The clients' local objective (and the server's evaluation): the same as a centralized run's. Generation
    servers evaluate loss and perplexity of theta and Q(theta) (no decoding: it is the slow part)."""
    from slimtune.train.objectives import GenerationSettings, make_objective
    return make_objective(cfg.task, template=cfg.template, max_length=cfg.max_length,
                          generation=GenerationSettings(cfg.input_column, cfg.target_column, eval_generate=False))


def is_trained(name: str, cfg) -> bool:
    """Whether clients train this LoRA entry: all of them (FedIT), or B only under FFA-LoRA, whose A stays frozen at
    its (secret) initialisation."""
    return not (cfg.aggregation == "ffa" and "lora_A" in name)


def uploaded(shapes: dict, cfg) -> dict:
    """The entries a client uploads deltas of: the trained ones. A frozen A's delta is all zeros and is never sent,
    which under FFA-LoRA cuts the upload to B's share."""
    return {k: v for k, v in shapes.items() if is_trained(k, cfg)}


def lora_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def lora_state(model) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in lora_names(model)}


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
