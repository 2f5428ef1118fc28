"""Hostile clients, to measure what the server's bound (bounds.py) lets through: benchmarks/federated_attacks.py and
the tests use them; a real run never does.

A hostile client trains honestly, then tampers with its reply:

    size-lie    claims num-examples = 1e9 (its update is honest)
    norm-999    its update scaled to L2 norm 999 (honest updates: ~0.04-1)
    sign-flip   its update negated and scaled by 10: a push away from where the honest clients move theta
    inf-scalar  zo-seeds: its first projected-gradient scalar replaced by +inf

Which clients are hostile: the partition ids in `hostile` (simulation: Flower's partition-id of each virtual node).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from slimtune.federated.config import FederatedConfig
from slimtune.federated.wire import FP32

ATTACKS = ("size-lie", "norm-999", "sign-flip", "inf-scalar")
LORA_ATTACKS = ("size-lie", "norm-999", "sign-flip")
SIGN_FLIP_SCALE = 10.0


def tamper(arrays: dict[str, np.ndarray], metrics: dict, attack: str, cfg: FederatedConfig) -> tuple[dict, dict]:
    """The hostile version of an honest reply (arrays as uploaded, metrics as released)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}: choose one of {', '.join(ATTACKS)}")
    if attack == "size-lie":
        return arrays, {**metrics, "num-examples": int(1e9)}
    if attack == "inf-scalar":
        if "grads" not in arrays:
            raise ValueError("inf-scalar needs --mode zo-seeds replies")
        grads = arrays["grads"].copy()
        grads[0] = np.inf
        return {**arrays, "grads": grads}, metrics
    if cfg.upload_bits != FP32 or "grads" in arrays:
        raise ValueError(f"{attack} tampers with fp32 LoRA deltas (--mode lora, --upload-bits 32)")
    if attack == "norm-999":
        norm = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in arrays.values())))
        direction = arrays if norm > 0 else {k: np.ones_like(v) for k, v in arrays.items()}
        norm = norm or float(np.sqrt(sum(v.size for v in arrays.values())))
        return {k: (v * (999.0 / norm)).astype(np.float32) for k, v in direction.items()}, metrics
    return {k: (-SIGN_FLIP_SCALE * v).astype(np.float32) for k, v in arrays.items()}, metrics


def hostile_train(attack: str, hostile: set[int] | frozenset[int]):
    """A ClientApp train function: nodes with a partition id in `hostile` tamper with their replies, the others
    are honest."""
    from slimtune.federated.client_app import train as honest_train

    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}: choose one of {', '.join(ATTACKS)}")
    hostile = frozenset(hostile)

    def train(msg: Message, context: Context) -> Message:
        reply = honest_train(msg, context)
        if int(context.node_config.get("partition-id", -1)) not in hostile:
            return reply
        cfg = FederatedConfig.from_json(str(msg.content["config"]["slimtune-config"]))
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        arrays, metrics = tamper(arrays, dict(reply.content["metrics"]), attack, cfg)
        reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        reply.content["metrics"] = MetricRecord(metrics)
        return reply

    return train


def hostile_app(attack: str, hostile: set[int] | frozenset[int], data: str) -> ClientApp:
    """The ClientApp of hostile_train for simulate(..., client_app=...), its nodes training shares of `data` (the
    run's --data, as simulation_app pins it)."""
    from slimtune.federated.client_app import simulation_app
    return simulation_app(data, hostile_train(attack, hostile))
