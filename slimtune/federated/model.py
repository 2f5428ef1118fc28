"""The model server and clients share: the base model with its LoRA structure, which LoRA entries are trained, and
LoRA state as a dict of tensors."""

from __future__ import annotations

import math

import torch

from slimtune.peft import PeftSettings, apply_peft


def build_model(cfg, secret_key=None):
    """(model with LoRA, tokenizer, train examples, eval examples, objective): build_model_and_split without the
    split's rows."""
    return build_model_and_split(cfg, secret_key)[:5]


def build_model_and_split(cfg, secret_key=None):
    """(model with LoRA, tokenizer, train examples, eval examples, objective, split rows): the same base on server
    and clients; `split rows` are config.partition_rows of --data's rows (labels, row keys, the task's number of
    labels; None without --data), from the one reading the training examples come from.

    Clients initialise LoRA from the public seed (they overwrite it with what they receive). The server passes its
    `secret_key` (a privacy.secret.RunKey from the OS, never stored or sent) and draws theta_0's A from it through
    HMAC -> Philox, as peft would (uniform in +-1/sqrt(fan_in), B = 0): clients only ever hold Q(theta), so they cannot
    rebuild theta_0 (with FFA, the frozen A) from the public settings, nor search 2^32 seeds of torch's generator.
    """
    from slimtune.federated.config import partition_rows
    from slimtune.train.objectives import load_model_and_data

    from slimtune.data.tasks import rows_unquoted
    from slimtune.federated.local_privacy import private_clients

    objective = federated_objective(cfg)
    with rows_unquoted(private_clients(cfg)):  # a private run's data errors quote no row
        loaded = objective.load(cfg.data, "train") if cfg.data else (None, [])
        split = partition_rows(objective, loaded[0]) if cfg.data else None
        model, tok, train, evals = load_model_and_data(objective, cfg.model, cfg.data, cfg.eval_data or None,
                                                       cfg.seed, loaded_train=loaded)
    if cfg.eval_max and len(evals) > cfg.eval_max:
        evals = evals[:cfg.eval_max]
    torch.manual_seed(cfg.seed)
    model = apply_peft(model, PeftSettings("lora", r=cfg.lora_r, alpha=2 * cfg.lora_r))
    if secret_key is not None:
        secret_lora_init(model, secret_key)
    for name, p in model.named_parameters():
        if "lora_" in name and not is_trained(name, cfg):
            p.requires_grad_(False)
    return model, tok, train, evals, objective, split


def secret_lora_init(model, key) -> None:
    """Every LoRA A from the secret key: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), peft's kaiming-uniform(a=sqrt(5))."""
    from slimtune.privacy.secret import secret_tensor
    with torch.no_grad():
        for index, (name, p) in enumerate(model.named_parameters()):
            if "lora_A" in name:
                bound = 1 / math.sqrt(p.shape[1])
                p.copy_(secret_tensor(key, "uniform", tuple(p.shape), index, low=-bound, high=bound).to(p))


def federated_objective(cfg):
    """The clients' local objective (and the server's evaluation): the same as a centralized run's. Generation
    servers evaluate loss and perplexity of theta and Q(theta) (no decoding: it is the slow part)."""
    from slimtune.train.objectives import GenerationSettings, make_objective
    return make_objective(cfg.task, template=cfg.template, label_words=cfg.label_words, max_length=cfg.max_length,
                          generation=GenerationSettings(cfg.input_column, cfg.target_column, eval_generate=False),
                          column_flags=False)


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
