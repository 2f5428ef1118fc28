"""FedLPP on Flower: the server keeps full-precision LoRA theta and only ever broadcasts Q(theta).

Round t: broadcast Q(theta) (block-wise NF quantization), clients train from dequantized Q(theta) and reply with
delta_k = theta_k - Q(theta) (mode "lora") or with (seed, scalar) pairs (mode "zo-seeds", replayed by the server into
the same delta). Each reply is checked field by field (replies.py: a malformed one is rejected with a log line), the
accepted deltas are bounded and aggregated (bounds.py: one rule for every mode; --robust trust weighs them against
the server's own update on its root data, root_reference.py), and the server optimizer turns the
aggregate into a step (server_opt.py). A step that would leave theta non-finite or outside fp16 range (Q(theta)'s
scales are fp16) is not taken and the optimizer state is reset: no reply can lock out the rounds after it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from slimtune import SlimtuneError
from slimtune.federated.bounds import InfluenceBound, aggregate, client_weights, lower_median
from slimtune.federated.config import FederatedConfig
from slimtune.federated.local_privacy import private_clients, public_bound
from slimtune.privacy.secret import KeyedNoise, RunKey, secret_tensor
from slimtune.federated.replies import parse_reply
from slimtune.federated.server_opt import IterateAverage, ServerOptimizer
from slimtune.federated.wire import FP32, as_array, decode_state, encode_state, wire_bytes

CLIENT_TEXT_CHARS = 300  # of a client's error text in the server's log
log = logging.getLogger("slimtune.federated")

FP16_MAX = 6.0e4  # just under float16's 65504: Q(theta)'s scales are fp16
NODE_POLL_S = 1.0  # how often a round waiting for SuperNodes counts them


class NodesMissing(SlimtuneError):
    """Fewer SuperNodes connected than a round samples, after waiting --node-timeout: the run stops, keeping the rounds
    done (run_server)."""

    def __init__(self, server_round: int, connected: int, wanted: int, needed: int, timeout: float):
        self.server_round, self.connected, self.wanted, self.needed = server_round, connected, wanted, needed
        super().__init__(f"round {server_round}: {wanted - connected} of num-clients={wanted} SuperNodes missing "
                         f"({connected} connected after waiting {timeout:.0f} s, node-timeout; a round samples "
                         f"{needed})")


class FedLPP(FedAvg):
    def __init__(self, cfg: FederatedConfig, theta: dict[str, torch.Tensor], replay=None, reference=None, **kwargs):
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("min_train_nodes", 1)
        kwargs.setdefault("min_available_nodes", 1)
        super().__init__(**kwargs)
        self.cfg = cfg = cfg.resolved()
        self.theta = {k: v.detach().clone().float() for k, v in theta.items()}  # private: never leaves the server
        self.shapes = {k: tuple(v.shape) for k, v in self.theta.items()}
        self.replay = replay  # mode zo-seeds: callable(seeds, grads) -> the delta those pairs make
        self.reference = reference  # --robust trust: callable(Q(theta), round) -> the server's own update (root data)
        self.round_log: dict[int, dict] = {}
        self.noise = KeyedNoise(RunKey.fresh())  # client-DP noise: a fresh 256-bit key, never stored or sent
        self._encoded = None  # (theta it encodes, arrays, bytes)
        self.dither = secret_dither(self.shapes, cfg)  # fixed for the run, never sent, never seeded from the config
        self.server_opt = ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum)
        from slimtune.optim.schedule import lr_multiplier
        self.base_lr, self.lr_schedule = self.server_opt.lr, lr_multiplier(cfg.server_lr_scheduler, max(cfg.rounds, 1))
        self.average = IterateAverage(cfg.server_average) if cfg.server_average else None
        self.bound = InfluenceBound(cfg.norm_bound)
        self.nodes_replied: set[int] = set()  # every node a reply came from (the summary says how many)
        self.accepted_total = 0  # replies accepted in all rounds (not written under client-level DP)
        self.nodes_short = False  # the last round went on with fewer than min_available_nodes (sample_train_nodes)
        self.instructions: dict[int, list[Message]] = {}  # each round's train instructions, until its replies come

    def start(self, *args, **kwargs):
        """Flower's Strategy.start. A run that protects its clients' data runs it with Flower's own INFO lines off:
        they time the run ("Strategy execution finished in 12.3s": the rounds last as long as the clients' private
        batches take) and dump every round's metrics."""
        if not private_clients(self.cfg):
            return super().start(*args, **kwargs)
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.WARNING)
        try:
            return super().start(*args, **kwargs)
        finally:
            flwr_log.setLevel(level)

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
        return ArrayRecord({k: as_array(v) for k, v in arrays.items()}), nbytes

    def client_view(self) -> dict[str, torch.Tensor]:
        """Q(theta) exactly as a client reconstructs it."""
        return decode_state(self.encoded()[0], self.shapes, self.cfg.bits, self.cfg.block_size)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        payload, nbytes = self.broadcast()  # the `arrays` argument is ignored: theta itself is never sent
        config = ConfigRecord({**dict(config), "server-round": server_round,
                               "slimtune-config": self.cfg.client_json()})
        # Flower's FedAvg.configure_train samples through sample_nodes, which waits without end for
        # min_available_nodes: a node that left after round 1 stalled the server forever. Sampled here instead.
        record = RecordDict({self.arrayrecord_key: payload, self.configrecord_key: config})
        messages = list(self._construct_messages(record, self.sample_train_nodes(grid, server_round),
                                                 MessageType.TRAIN))
        for message in messages:  # a reply carries its instruction's group id: a replay from another round does not
            message.metadata.group_id = str(server_round)
        self.instructions[server_round] = messages  # their ids are set when the grid sends them (in place)
        down = wire_bytes(messages[0]) if messages else 0
        self.round_log[server_round] = {"round": server_round, "sampled": len(messages),
                                        "payload_bytes_down_per_client": nbytes,
                                        "bytes_down_per_client": down, "bytes_down_total": down * len(messages)}
        return messages

    def sample_train_nodes(self, grid, server_round: int) -> list[int]:
        """The nodes a round trains on. The round waits at most --node-timeout (node_timeout) for every client
        (min_available_nodes; run_server: --clients), then goes on with the nodes connected if there are at least
        the clients a round samples (min_train_nodes: --clients-per-round, else every client), else raises
        NodesMissing (run_server keeps the rounds done). After a round that went on short, the next ones wait only
        for the clients a round samples (a node that comes back is sampled again)."""
        wanted = max(self.min_available_nodes, self.min_train_nodes)
        needed = self.min_train_nodes
        deadline = time.monotonic() + self.cfg.node_timeout
        while True:
            nodes = list(grid.get_node_ids())
            if len(nodes) >= (needed if self.nodes_short else wanted) or time.monotonic() >= deadline:
                break
            time.sleep(NODE_POLL_S)
        if len(nodes) < needed:
            raise NodesMissing(server_round, len(nodes), wanted, needed, self.cfg.node_timeout)
        if len(nodes) < wanted and not self.nodes_short:
            log.warning("round %d: %d of %d SuperNodes connected after waiting %.0f s (node-timeout); the round samples "
                        "%d of them", server_round, len(nodes), wanted, self.cfg.node_timeout, needed)
        self.nodes_short = len(nodes) < wanted
        size = min(len(nodes), max(int(len(nodes) * self.fraction_train), self.min_train_nodes))
        return random.sample(nodes, size)

    def configure_evaluate(self, server_round, arrays, config, grid):
        payload, _ = self.broadcast()
        return super().configure_evaluate(server_round, payload, config, grid)

    # -- what comes up ----------------------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        # under client-level DP only the noised model is released: whether (and whose) reply was accepted, failed or
        # came late can depend on that client's data, so it is kept out of metrics.jsonl, summary.json, the
        # returned metrics and the log (debug level only)
        dp = self.cfg.client_level_dp
        say = log.debug if dp else log.warning
        accepted, rejected = [], 0
        sent = self.instructions.pop(server_round, None)
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():  # Flower's reason is the client's exception text: a row of its data, say (an error
                # carries nothing to aggregate: only said and counted)
                self.nodes_replied.add(node)
                say("round %d: client %s failed (%s); skipped", server_round, node, self.client_text(msg.error.reason))
                rejected += 1
                continue
            unasked = self.unasked(msg, server_round, sent, answered)
            if unasked:  # Flower's SuperLink refuses these already; the strategy does not rely on it
                say("round %d: rejected a reply from client %s: %s", server_round, node, unasked)
                rejected += 1
                continue
            self.nodes_replied.add(node)
            try:  # sized only once accepted: what a rejected reply carried is not counted as a client's upload
                parsed = parse_reply(msg.content, self.cfg, self.shapes)
                accepted.append({**parsed, "wire_bytes": wire_bytes(msg), "node": node})
                answered.add(node)  # its one reply this round (a rejected one does not use it up)
            except Exception as exc:  # noqa: BLE001 - whatever a reply holds, it can only be rejected
                say("round %d: rejected reply from client %s: %s", server_round, node,
                    self.client_text(str(exc)) if isinstance(exc, ValueError) else f"malformed ({type(exc).__name__})")
                rejected += 1
        self.accepted_total += len(accepted)
        info = self.round_log.setdefault(server_round, {"round": server_round})
        if not dp:
            info.update(replies=len(accepted), rejected=rejected)
        if (bound := public_bound(self.cfg, server_round)) is not None:  # private clients under a public M
            info["local_epsilon"] = bound  # of a client that trained in every round so far, from public settings
        missing = info.get("sampled", len(replies)) - len(replies)  # no reply within the round timeout
        if missing > 0:
            say("round %d: %d of %d sampled clients did not reply within the round timeout (%.0f s); their work is "
                "lost", server_round, missing, info["sampled"], self.cfg.round_timeout)
        if accepted or self.cfg.client_dp_clip > 0:  # client-level DP releases every round (bounds.aggregate)
            self.server_opt.lr = self.base_lr * self.lr_schedule(server_round - 1)  # --server-lr-scheduler
            self.theta = self.apply_updates(accepted, info, server_round)
            if self.average is not None:
                self.average.update(self.theta)
        counts = {} if dp else {"replies": info["replies"], "rejected": info["rejected"]}
        if not dp:  # the accepted replies' bytes only (a rejected one's padding is no client's upload)
            info["bytes_up_total"] = int(sum(a["wire_bytes"] for a in accepted))
        if accepted and not dp:
            info["payload_bytes_up_per_client"] = float(np.mean([a["bytes_up"] for a in accepted]))
            info["bytes_up_per_client"] = float(np.mean([a["wire_bytes"] for a in accepted]))
            losses = [a["loss"] for a in accepted if a["loss"] is not None]  # private clients send none
            if losses and not private_clients(self.cfg):  # private: only the DP releases; none from a claim
                info["train_loss"] = lower_median(losses)  # the claims' lower median: no one client sets it (of
                # two, np.median's mean of the middle pair was the hostile one's to choose)
        payload, _ = self.broadcast()
        return payload, MetricRecord(counts)

    @staticmethod
    def unasked(msg: Message, server_round: int, sent: list[Message] | None, answered: set[int]) -> str | None:
        """Why a reply is no answer to this round's instructions, or None: one accepted reply per sampled node, to an
        instruction of this round (its group id; its message id where the grid has set the instructions' ids)."""
        if sent is None:  # aggregate_train without configure_train (a caller of its own): nothing to match against
            return None
        node, meta = msg.metadata.src_node_id, msg.metadata
        if node not in {m.metadata.dst_node_id for m in sent}:
            return "its node was not sampled this round"
        if node in answered:
            return "its node has already answered this round"
        if meta.group_id != str(server_round):
            return "it answers another round's instruction"
        ids = {m.metadata.message_id for m in sent if m.metadata.message_id}
        if ids and meta.reply_to_message_id not in ids:
            return "it answers no instruction of this round"
        return None

    def client_text(self, text: str) -> str:
        """What the server's log says of a text that came from a client (its error, or what was wrong with its
        reply): withheld when the run protects the clients' data (the text may quote a row of it, or say how its
        training went), else quoted and cut (a hostile client's newlines cannot forge log lines, nor can its
        length flood the log)."""
        if private_clients(self.cfg):
            return "details withheld: the run protects its clients' data"
        text = str(text)
        return repr(text[:CLIENT_TEXT_CHARS] + ("..." if len(text) > CLIENT_TEXT_CHARS else ""))

    def deltas(self, accepted: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Each accepted reply as a delta; zo-seeds scalars are clipped per seed (bounds.py) before the replay."""
        if self.cfg.mode != "zo-seeds":
            return [a["delta"] for a in accepted]
        cap = self.bound.scalar_cap([a["grads"] for a in accepted], [a["node"] for a in accepted])
        return [self.replay(a["seeds"], np.clip(a["grads"], -cap, cap)) for a in accepted]

    def apply_updates(self, accepted: list[dict], info: dict | None = None,
                      server_round: int = 0) -> dict[str, torch.Tensor]:
        deltas = self.deltas(accepted)
        # --robust trust: the server's own round from what the clients received (root_reference.py)
        reference = self.reference(self.client_view(), server_round) if self.reference is not None else None
        if self.cfg.client_dp_clip > 0:  # the fixed clip S the client-level accounting is calibrated to
            from slimtune.federated.bounds import clip_update
            deltas, cap = [clip_update(d, self.cfg.client_dp_clip) for d in deltas], self.cfg.client_dp_clip
        else:
            deltas, cap = self.bound.bound_deltas(deltas, [a["node"] for a in accepted])  # one window entry per node
        if any(d is None for d in deltas):  # its scaled update measured above the bound (bounds.clip_update): rejected
            dropped = sum(d is None for d in deltas)
            (log.debug if self.cfg.client_level_dp else log.warning)(
                "round %d: %d reply(ies) could not be scaled within the update bound %.3g; rejected", server_round,
                dropped, cap)
            accepted[:] = [a for a, d in zip(accepted, deltas) if d is not None]  # the caller's list too (bytes)
            deltas = [d for d in deltas if d is not None]
            self.accepted_total -= dropped
            if info is not None and not self.cfg.client_level_dp:
                info["replies"], info["rejected"] = info["replies"] - dropped, info["rejected"] + dropped
            if not deltas and not self.cfg.client_level_dp:  # client-level DP still releases the noised zero sum
                if info is not None:
                    info["update_bound"] = cap
                return self.theta
        weights = client_weights([a["claimed"] for a in accepted], self.cfg.weighting)
        update = aggregate(self.theta, deltas, weights, self.cfg, self.noise, info, reference)
        if info is not None:
            info["update_bound"] = cap
        return self.server_step(update)

    def server_step(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """theta after the server optimizer's step, or theta unchanged (and the optimizer reset) if the step would
        leave it non-finite or outside fp16 range."""
        new = self.server_opt.apply(self.theta, update)
        if self.server_opt.finite() and all(torch.isfinite(v).all() and v.abs().max() <= FP16_MAX
                                            for v in new.values()):
            return new
        log.warning("server step not taken: it would make theta or the optimizer state non-finite, or push theta out "
                    "of fp16 range (optimizer state reset)")
        self.server_opt.reset()
        return self.theta


def secret_dither(shapes: dict[str, tuple], cfg: FederatedConfig) -> dict[str, torch.Tensor] | None:
    """u ~ U(-a/2, a/2) * g per coordinate (a = cfg.dither, g = the largest gap between quantization levels), drawn
    once per run from OS entropy. Clients receive Q(theta/s + u) * s: an error they cannot subtract (they never see
    u) and, being the same every round, cannot average away over rounds — unlike the rounding error of a moving
    theta. Clients' deltas are taken against what they received, so the server's update is unchanged in form."""
    if not cfg.dither or cfg.bits == FP32:
        return None
    from slimtune.federated.quantization import max_gap
    key = RunKey.fresh()  # never stored or sent
    return {k: (secret_tensor(key, "uniform", tuple(shape), i) - 0.5) * cfg.dither * max_gap(cfg.bits)
            for i, (k, shape) in enumerate(shapes.items())}
