"""FedLPP on Flower: the server keeps full-precision LoRA theta and only ever broadcasts Q(theta).

Round t: broadcast Q(theta) (block-wise NF quantization), clients train from dequantized Q(theta) and reply with
delta_k = theta_k - Q(theta) (mode "lora") or with (seed, scalar) pairs (mode "zo-seeds"); the server sets
theta <- theta + sum_k w_k delta_k / sum_k w_k, weights = local example counts. With client-level DP each delta is
clipped to L2 norm S, the deltas are averaged uniformly and N(0, (sigma S / K)^2) noise is added to the mean.
Malformed replies (wrong keys, shapes, non-finite values) are rejected with a log line; missing clients are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from slimtune.federated.server_opt import IterateAverage, ServerOptimizer
from slimtune.federated.common import FP32, FederatedConfig, decode_state, encode_state, is_trained, uploaded
from slimtune.privacy.secret import fresh_secret

log = logging.getLogger("slimtune.federated")

MAX_EXAMPLES = 1e9  # a client claiming more examples than this is lying or broken
MAX_PROJECTED_GRAD = 1e6
FP16_MAX = 6.0e4  # just under float16's 65504: Q(theta)'s scales are fp16


def wire_bytes(message: Message) -> int:
    """Bytes of a message's content as Flower serialises it (protobuf RecordDict: arrays, configs, metrics)."""
    from flwr.common.serde import recorddict_to_proto
    return int(recorddict_to_proto(message.content).ByteSize())


def _scalar(metrics: MetricRecord, key: str, required: bool) -> float:
    """One finite number from a MetricRecord (lists, NaN and infinities are rejected)."""
    if key not in metrics:
        if required:
            raise ValueError(f"metric {key!r} is missing")
        return float("nan")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"metric {key!r} must be one finite number, got {value!r}")
    return float(value)


def expected_keys(shapes: dict, bits: int) -> dict[str, type]:
    """The exact arrays an upload of `bits` carries, with their dtypes."""
    if bits == FP32:
        return {name: np.float32 for name in shapes}
    return {f"{name}::{part}": dtype for name in shapes for part, dtype in (("codes", np.uint8), ("scales", np.float16))}


class FedLPP(FedAvg):
    def __init__(self, cfg: FederatedConfig, theta: dict[str, torch.Tensor], replay=None, **kwargs):
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("min_train_nodes", 1)
        kwargs.setdefault("min_available_nodes", 1)
        super().__init__(**kwargs)
        self.cfg = cfg = cfg.resolved()
        self.theta = {k: v.detach().clone().float() for k, v in theta.items()}  # private: never leaves the server
        self.shapes = {k: tuple(v.shape) for k, v in self.theta.items()}
        self.replay = replay  # mode zo-seeds: callable(theta, [(seeds, grads, weight)]) -> new theta
        self.round_log: dict[int, dict] = {}
        self.noise_generator = torch.Generator().manual_seed(fresh_secret())  # client-DP noise: secret, never seeded
        self._encoded = None  # (theta it encodes, arrays, bytes)
        self.dither = secret_dither(self.shapes, cfg)  # fixed for the run, never sent, never seeded from the config
        self.server_opt = ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum)
        self.average = IterateAverage(cfg.server_average) if cfg.server_average else None

    def server_model(self) -> dict[str, torch.Tensor]:
        """The model the server keeps: the average of its iterates with --server-average, else theta itself.
        Never broadcast: clients receive Q(theta) of the current iterate."""
        if self.average is None or self.average.value is None:
            return self.theta
        return self.average.value

    # -- what goes down ---------------------------------------------------------------------------------------
    def encoded(self) -> tuple[dict, int]:
        """Q(theta) as packed arrays and its size in bytes; quantized once per version of theta."""
        if self._encoded is None or self._encoded[0] is not self.theta:
            self._encoded = (self.theta, *encode_state(self.theta, self.cfg.bits, self.cfg.block_size, self.dither))
        return self._encoded[1], self._encoded[2]

    def broadcast(self) -> tuple[ArrayRecord, int]:
        arrays, nbytes = self.encoded()
        return ArrayRecord({k: _as_array(v) for k, v in arrays.items()}), nbytes

    def client_view(self) -> dict[str, torch.Tensor]:
        """Q(theta) exactly as a client reconstructs it."""
        return decode_state(self.encoded()[0], self.shapes, self.cfg.bits, self.cfg.block_size)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        payload, nbytes = self.broadcast()  # the `arrays` argument is ignored: theta itself is never sent
        config = ConfigRecord({**dict(config), "server-round": server_round,
                               "slimtune-config": self.cfg.client_json()})
        messages = list(super().configure_train(server_round, payload, config, grid))
        down = wire_bytes(messages[0]) if messages else 0
        self.round_log[server_round] = {"round": server_round, "sampled": len(messages),
                                        "payload_bytes_down_per_client": nbytes,
                                        "bytes_down_per_client": down, "bytes_down_total": down * len(messages)}
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid):
        payload, _ = self.broadcast()
        return super().configure_evaluate(server_round, payload, config, grid)

    # -- what comes up ----------------------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        accepted, rejected, bytes_up = [], 0, 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %d: client %s failed (%s); skipped", server_round, node, msg.error.reason)
                rejected += 1
                continue
            size = wire_bytes(msg)  # on the wire whether or not it is accepted
            bytes_up += size
            try:
                accepted.append({**self.parse_reply(msg.content), "wire_bytes": size})
            except ValueError as exc:
                log.warning("round %d: rejected reply from client %s: %s", server_round, node, exc)
                rejected += 1
        info = self.round_log.setdefault(server_round, {"round": server_round})
        info.update(replies=len(accepted), rejected=rejected, bytes_up_total=bytes_up)
        missing = info.get("sampled", len(replies)) - len(replies)  # no reply within the round timeout
        if missing > 0:
            log.warning("round %d: %d of %d sampled clients did not reply within the round timeout (%.0f s); their "
                        "work is lost", server_round, missing, info["sampled"], self.cfg.round_timeout)
        if accepted:
            self.theta = self.apply_updates(accepted)
            if self.average is not None:
                self.average.update(self.theta)
            info["payload_bytes_up_per_client"] = float(np.mean([a["bytes_up"] for a in accepted]))
            info["bytes_up_per_client"] = float(np.mean([a["wire_bytes"] for a in accepted]))
            info["train_loss"] = float(np.mean([a["loss"] for a in accepted]))
        payload, _ = self.broadcast()
        return payload, MetricRecord({"replies": len(accepted), "rejected": rejected})

    def parse_reply(self, content: RecordDict) -> dict:
        """Validate every field of a reply; raise ValueError (the reply is rejected) on anything unexpected.

        num-examples: a finite whole number in [1, MAX_EXAMPLES]; train-loss: one finite number (or absent); arrays:
        exactly the expected keys with the expected dtypes and sizes; a delta must be finite, of L2 norm at most
        `max_update_norm`, and keep every entry of theta + delta within fp16 range (Q(theta) stores fp16 scales);
        zo-seeds: at most local_steps pairs, |g| <= MAX_PROJECTED_GRAD."""
        arrays = content.array_records.get("arrays")
        metrics = content.metric_records.get("metrics")
        if arrays is None or metrics is None:
            raise ValueError("reply needs an ArrayRecord 'arrays' and a MetricRecord 'metrics'")
        weight = _scalar(metrics, "num-examples", required=True)
        if not (1 <= weight <= MAX_EXAMPLES and weight == int(weight)):
            raise ValueError(f"num-examples must be a whole number in [1, {MAX_EXAMPLES:.0e}], got {weight}")
        loss = _scalar(metrics, "train-loss", required=False)
        raw = {k: arrays[k].numpy() for k in arrays.keys()}
        parsed = {"weight": weight, "loss": loss, "bytes_up": float(sum(v.nbytes for v in raw.values()))}
        if self.cfg.mode == "zo-seeds":
            seeds, grads = raw.get("seeds"), raw.get("grads")
            if set(raw) != {"seeds", "grads"} or seeds.shape != grads.shape or seeds.ndim != 1:
                raise ValueError("zo-seeds reply needs exactly 1-D 'seeds' and 'grads' of equal length")
            if seeds.dtype != np.int64 or grads.dtype not in (np.float32, np.float64):
                raise ValueError(f"zo-seeds reply has dtypes {seeds.dtype}/{grads.dtype}, expected int64/float")
            if len(seeds) > self.cfg.local_steps:
                raise ValueError(f"{len(seeds)} (seed, scalar) pairs for {self.cfg.local_steps} local steps")
            if not np.isfinite(grads).all() or np.abs(grads).max(initial=0) > MAX_PROJECTED_GRAD:
                raise ValueError(f"non-finite or out-of-range projected gradient (|g| > {MAX_PROJECTED_GRAD:g})")
            parsed.update(seeds=seeds.astype(np.int64), grads=grads.astype(np.float64))
            return parsed
        shapes = uploaded(self.shapes, self.cfg)  # FFA: B only
        expected = expected_keys(shapes, self.cfg.upload_bits)
        if set(raw) != set(expected):
            extra, missing = sorted(set(raw) - set(expected)), sorted(set(expected) - set(raw))
            raise ValueError(f"unexpected array {extra[0]!r}" if extra else f"missing array {missing[0]!r}")
        for key, dtype in expected.items():
            if raw[key].dtype != dtype:
                raise ValueError(f"array {key!r} has dtype {raw[key].dtype}, expected {np.dtype(dtype)}")
        delta = decode_state(raw, shapes, self.cfg.upload_bits, self.cfg.block_size)
        delta.update({k: torch.zeros(shape) for k, shape in self.shapes.items() if k not in shapes})  # frozen: 0
        if not all(torch.isfinite(d).all() for d in delta.values()):
            raise ValueError("non-finite values in the update")
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())).item()
        if norm > self.cfg.max_update_norm:
            raise ValueError(f"update norm {norm:.3g} exceeds --max-update-norm {self.cfg.max_update_norm:g}")
        if any((self.theta[k] + d).abs().max() > FP16_MAX for k, d in delta.items()):
            raise ValueError("update would push theta out of fp16 range (the broadcast Q(theta) could not hold it)")
        parsed["delta"] = delta
        return parsed

    def apply_updates(self, accepted: list[dict]) -> dict[str, torch.Tensor]:
        if self.cfg.mode == "zo-seeds":
            total = sum(a["weight"] for a in accepted)
            return self.replay(self.theta, [(a["seeds"], a["grads"], a["weight"] / total) for a in accepted])
        update = mean_delta(self.theta, accepted, self.cfg, self.noise_generator)
        return self.server_opt.apply(self.theta, update)


def secret_dither(shapes: dict[str, tuple], cfg: FederatedConfig) -> dict[str, torch.Tensor] | None:
    """u ~ U(-a/2, a/2) * g per coordinate (a = cfg.dither, g = the largest gap between quantization levels), drawn
    once per run from OS entropy. Clients receive Q(theta/s + u) * s: an error they cannot subtract (they never see
    u) and, being the same every round, cannot average away over rounds — unlike the rounding error of a moving
    theta. Clients' deltas are taken against what they received, so the server's update is unchanged in form."""
    if not cfg.dither or cfg.bits == FP32:
        return None
    from slimtune.federated.quantization import max_gap
    g = torch.Generator().manual_seed(fresh_secret())
    return {k: (torch.rand(shape, generator=g) - 0.5) * cfg.dither * max_gap(cfg.bits) for k, shape in shapes.items()}


def mean_delta(theta: dict, accepted: list[dict], cfg: FederatedConfig, generator=None) -> dict:
    """The round's update: weighted mean of deltas (FedAvg/FedIT, FFA) or, with client DP, clipped uniform mean +
    noise (the server optimizer then post-processes it).

    Under FFA only B is trained: A's deltas are dropped before clipping and A gets no noise (it is never released
    changed, so noising it would only damage the model)."""
    deltas = [{k: (v if is_trained(k, cfg) else torch.zeros_like(v)) for k, v in a["delta"].items()} for a in accepted]
    if cfg.robust == "median":  # coordinate-wise median: no client moves a coordinate past the honest majority
        return {name: torch.stack([d[name] for d in deltas]).median(dim=0).values for name in theta}
    if cfg.robust == "clip":  # each delta clipped to the round's median norm, then the weighted mean
        norms = sorted(update_norm(d) for d in deltas)
        deltas = [clip_update(d, norms[(len(norms) - 1) // 2]) for d in deltas]
    if cfg.client_dp_clip > 0:
        weights = [1.0 / len(deltas)] * len(deltas)
        deltas = [clip_update(d, cfg.client_dp_clip) for d in deltas]
    else:
        total = sum(a["weight"] for a in accepted)
        weights = [a["weight"] / total for a in accepted]
    new = {}
    for name, value in theta.items():
        mean = sum(w * d[name] for w, d in zip(weights, deltas))
        if cfg.client_dp_clip > 0 and cfg.client_dp_noise > 0 and is_trained(name, cfg):
            std = cfg.client_dp_noise * cfg.client_dp_clip / len(deltas)
            mean = mean + std * torch.randn(value.shape, generator=generator)
        new[name] = mean
    return new


def update_norm(delta: dict[str, torch.Tensor]) -> float:
    return torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())).item()


def clip_update(delta: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    norm = update_norm(delta)
    factor = min(1.0, max_norm / (norm + 1e-12))
    return {k: v * factor for k, v in delta.items()}


def _as_array(value):
    from flwr.app import Array
    return Array(np.ascontiguousarray(value))
