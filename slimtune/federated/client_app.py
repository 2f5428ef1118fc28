"""The Flower ClientApp: train full-precision LoRA locally from the dequantized broadcast Q(theta)."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from slimtune.data import EpochSampler, PoissonSampler
from slimtune.federated.common import (FederatedConfig, build_model, decode_state, encode_state, load_lora_state,
                                       lora_state, uploaded)
from slimtune.federated.partition import dirichlet_partition
from slimtune.optim import PRIVATE_OPTIMIZERS, OptimizerArgs, build_optimizer
from slimtune.optim.base import mix_seed
from slimtune.privacy import PrivacySpec
from slimtune.privacy.secret import RunKey

app = ClientApp()


@lru_cache(maxsize=2)
def _setup(cfg_json: str, num_partitions: int | None = None):
    """Model and data of this client. num_partitions None: the node reads only its own data file (deployment,
    `--node-config data-path=...`), all of which it trains on; otherwise the shared file is split (simulation)."""
    cfg = FederatedConfig.from_json(cfg_json)
    model, tok, train, _, objective = build_model(cfg)
    if num_partitions is None:
        return model, tok, train, [list(range(len(train)))], objective
    parts = dirichlet_partition([e.label for e in train], num_partitions, cfg.dirichlet_alpha, cfg.seed)
    return model, tok, train, parts, objective


def local_train(cfg: FederatedConfig, partition_id: int, payload: dict, server_round: int,
                own_data: bool = False, num_partitions: int | None = None) -> tuple[dict, dict]:
    """One client's round: returns (arrays to upload, metrics). own_data: cfg.data is this node's own file."""
    model, tok, train, parts, objective = _setup(cfg.to_json(), None if own_data else
                                                  (num_partitions or cfg.num_clients))
    partition_id = 0 if own_data else partition_id
    examples = [train[i] for i in parts[partition_id]]
    shapes = {k: tuple(v.shape) for k, v in lora_state(model).items()}
    start = decode_state(payload, shapes, cfg.bits, cfg.block_size)
    load_lora_state(model, start)
    seed = mix_seed(cfg.seed, server_round, partition_id)
    optimizer_name = "mezo" if cfg.mode == "zo-seeds" else cfg.local_optimizer
    private = None
    if optimizer_name in PRIVATE_OPTIMIZERS:  # noise and Poisson batches from OS entropy, never the public seed
        private = (PrivacySpec(noise_multiplier=cfg.local_dp_noise, clip=cfg.local_dp_clip), cfg.local_dp_noise,
                   cfg.batch_size, None)
    optimizer = build_optimizer(optimizer_name, model, OptimizerArgs(lr=cfg.lr, eps=cfg.eps, seed=seed), private)
    sampler = (PoissonSampler(len(examples), cfg.batch_size, key=RunKey.fresh()) if private
               else EpochSampler(len(examples), cfg.batch_size, seed))
    model.train(not optimizer.zeroth_order)
    losses, seeds, grads = [], [], []
    for step in range(cfg.local_steps):
        batch = objective.encode([examples[i] for i in sampler.indices(step)], cfg.max_length)
        if optimizer.zeroth_order:
            seeds.append(mix_seed(optimizer.config.seed, optimizer.step_count, 0))
        out = optimizer.step(lambda: objective.losses(model, batch))
        losses.append(out.loss)
        grads.append(out.info.get("projected_grad", 0.0))
    metrics = {"num-examples": len(examples), "train-loss": float(np.nanmean(losses))}
    if cfg.mode == "zo-seeds":
        return {"seeds": np.array(seeds, dtype=np.int64), "grads": np.array(grads, dtype=np.float32)}, metrics
    trained = lora_state(model)
    arrays, _ = encode_state({k: trained[k] - start[k] for k in uploaded(shapes, cfg)}, cfg.upload_bits,
                             cfg.block_size)
    return arrays, metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = FederatedConfig.from_json(str(config["slimtune-config"]))
    payload = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    node = context.node_config
    own = node.get("data-path")  # deployment: each SuperNode reads only its own data (--node-config data-path=...)
    if own:
        cfg = replace(cfg, data=str(own))
    arrays, metrics = local_train(cfg, int(node.get("partition-id", 0)), payload, int(config["server-round"]),
                                  own_data=bool(own), num_partitions=int(node["num-partitions"]) if
                                  "num-partitions" in node else None)
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
