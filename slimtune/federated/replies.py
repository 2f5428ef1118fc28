"""What comes up: every field of a client's reply is checked, and anything unexpected rejects the reply (ValueError,
logged by the strategy) before it can touch theta. Bounding what an accepted reply may do is bounds.py's job."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict

from slimtune.federated.model import uploaded
from slimtune.federated.wire import decode_state, expected_keys

MAX_EXAMPLES = 1e9  # a client claiming more examples than this is lying or broken
MAX_PROJECTED_GRAD = 1e6


def metric(metrics: MetricRecord, key: str, required: bool) -> float | None:
    """One finite number from a MetricRecord (lists, NaN and infinities are rejected); None if absent."""
    if key not in metrics:
        if required:
            raise ValueError(f"metric {key!r} is missing")
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"metric {key!r} must be one finite number, got {value!r}")
    return float(value)


def parse_reply(content: RecordDict, cfg, shapes: dict[str, tuple]) -> dict:
    """The reply as {"claimed": n or None, "loss": float or None, "bytes_up", and
    "delta" (LoRA) or "seeds"/"grads" (zo-seeds)}.

    num-examples: absent, or a finite whole number in [1, MAX_EXAMPLES] (required only under --weighting examples);
    train-loss: absent or one finite number >= 0 (no other metric is read; a private client sends none); arrays: exactly
    the expected keys with the expected dtypes and sizes; a delta must be finite and, if --max-update-norm > 0, of at
    most that L2 norm; zo-seeds: at most local_steps pairs of finite scalars with |g| <= MAX_PROJECTED_GRAD."""
    arrays = content.array_records.get("arrays")
    metrics = content.metric_records.get("metrics")
    if arrays is None or metrics is None:
        raise ValueError("reply needs an ArrayRecord 'arrays' and a MetricRecord 'metrics'")
    claimed = metric(metrics, "num-examples", required=cfg.weighting == "examples")
    if claimed is not None and not (1 <= claimed <= MAX_EXAMPLES and claimed == int(claimed)):
        raise ValueError(f"num-examples must be a whole number in [1, {MAX_EXAMPLES:.0e}], got {claimed}")
    loss = metric(metrics, "train-loss", required=False)
    if loss is not None and loss < 0:  # a cross-entropy is never negative
        raise ValueError(f"train-loss must be >= 0, got {loss}")
    raw = {k: arrays[k].numpy() for k in arrays.keys()}
    parsed = {"claimed": claimed, "loss": loss,
              "bytes_up": float(sum(v.nbytes for v in raw.values()))}
    if cfg.mode == "zo-seeds":
        return {**parsed, **_parse_seeds(raw, cfg)}
    return {**parsed, "delta": _parse_delta(raw, cfg, shapes)}


def _parse_seeds(raw: dict, cfg) -> dict:
    seeds, grads = raw.get("seeds"), raw.get("grads")
    if set(raw) != {"seeds", "grads"} or seeds.shape != grads.shape or seeds.ndim != 1:
        raise ValueError("zo-seeds reply needs exactly 1-D 'seeds' and 'grads' of equal length")
    if seeds.dtype != np.int64 or grads.dtype not in (np.float32, np.float64):
        raise ValueError(f"zo-seeds reply has dtypes {seeds.dtype}/{grads.dtype}, expected int64/float")
    if len(seeds) > cfg.local_steps:
        raise ValueError(f"{len(seeds)} (seed, scalar) pairs for {cfg.local_steps} local steps")
    if not np.isfinite(grads).all() or np.abs(grads).max(initial=0) > MAX_PROJECTED_GRAD:
        raise ValueError(f"non-finite or out-of-range projected gradient (|g| > {MAX_PROJECTED_GRAD:g})")
    return {"seeds": seeds.astype(np.int64), "grads": grads.astype(np.float64)}


def _parse_delta(raw: dict, cfg, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    sent = uploaded(shapes, cfg)  # FFA: B only
    expected = expected_keys(sent, cfg.upload_bits)
    if set(raw) != set(expected):
        extra, missing = sorted(set(raw) - set(expected)), sorted(set(expected) - set(raw))
        raise ValueError(f"unexpected array {extra[0]!r}" if extra else f"missing array {missing[0]!r}")
    for key, dtype in expected.items():
        if raw[key].dtype != dtype:
            raise ValueError(f"array {key!r} has dtype {raw[key].dtype}, expected {np.dtype(dtype)}")
    delta = decode_state(raw, sent, cfg.upload_bits, cfg.block_size)
    delta.update({k: torch.zeros(shape) for k, shape in shapes.items() if k not in sent})  # frozen: 0
    if not all(torch.isfinite(d).all() for d in delta.values()):
        raise ValueError("non-finite values in the update")
    if cfg.max_update_norm > 0:
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())).item()
        if norm > cfg.max_update_norm:
            raise ValueError(f"update norm {norm:.3g} exceeds --max-update-norm {cfg.max_update_norm:g}")
    return delta
