"""The Flower ClientApp: train full-precision LoRA locally from the dequantized broadcast Q(theta).

What a client releases per round: its update (a delta, or (seed, scalar) pairs) and
  - non-private local optimizers: num-examples and the mean training loss (metrics the server may log or weigh by);
  - private ones (dpzero, dplozo, dphizoo, dphybrid, dp-adamw, dp-sgd): nothing else. Not the count nor the loss
    (functions of every example), nor its epsilon (a function of its count; federated/local_privacy.py: the server
    bounds it from public settings under --local-dp-min-examples, and a deployment node prints its own on its own
    stderr). Its noise and Poisson batches come from a fresh in-memory key each round (OS entropy), never the seed.
    Nothing else about its batches leaves the node: warnings and log lines raised during its steps are dropped and a
    failing step is reported without its details. Nor does anything about its rows: Flower sends an exception's text
    to the server (which logs it), so any failure of a private client's round, its own data file's bad row included,
    reaches the server as one fixed line; the details go to the node's own stderr (its operator's bad input).
A deployment node records each private round in its ledger (local_privacy.NodeLedger, on its own disk, beside its data)
before the round's first step; its budget and the epsilon it prints compose what the ledger holds.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from slimtune import SlimtuneError
from slimtune.data.readers import same_path
from slimtune.federated.config import FederatedConfig
from slimtune.federated.local_steps import release_hooks, run_steps
from slimtune.federated.model import build_model_and_split, load_lora_state, lora_state, uploaded
from slimtune.federated.partition import dirichlet_partition
from slimtune.federated.wire import decode_state, encode_state
from slimtune.federated.local_privacy import LEDGER_KEY, NodeLedger, account_delta, is_private, ledger_path
from slimtune.optim import ZO_OPTIMIZERS, OptimizerArgs, build_optimizer
from slimtune.optim.base import mix_seed
from slimtune.settings.rules import is_whole

app = ClientApp()


@lru_cache(maxsize=2)
def _setup(cfg_json: str, num_partitions: int | None = None):
    """Model and data of this client. num_partitions None: the node reads only its own data file (deployment,
    `--node-config data-path=...`), all of which it trains on; otherwise the shared file is split (simulation)."""
    cfg = FederatedConfig.from_json(cfg_json)
    model, tok, train, _, objective, split = build_model_and_split(replace(cfg, eval_data=""))  # never evaluates
    if num_partitions is None:
        return model, tok, train, [list(range(len(train)))], objective
    labels, keys, num_labels = split  # as check_partition draws it, from the reading `train` comes from
    parts = dirichlet_partition(labels, keys, num_partitions, cfg.dirichlet_alpha, cfg.seed, num_labels=num_labels)
    return model, tok, train, parts, objective


def local_train(cfg: FederatedConfig, partition_id: int, payload: dict, server_round: int,
                own_data: bool = False, num_partitions: int | None = None, steps_before: int = 0,
                ledger: NodeLedger | None = None, delta: float | None = None) -> tuple[dict, dict]:
    """One client's round: returns (arrays to upload, metrics to release). own_data: cfg.data is this node's own
    file; ledger: the node's locked ledger, where a private round is recorded before its first step (its earlier
    rounds, each at its own settings, go into the epsilon it prints); steps_before: earlier private steps at this
    round's settings, for a caller without a ledger; delta: the node's account delta (local_privacy.account_delta).
    A private client's failure is sent without its text (`_kept_on_node`), and so is the failure of a node that reads
    the file the server named (not own_data): a hostile server could name any table on the node and read its rows
    in the error."""
    delta = account_delta(cfg) if delta is None else delta
    if not is_private(cfg) and own_data:
        return _local_round(cfg, partition_id, payload, server_round, own_data, num_partitions, steps_before,
                            ledger, delta)
    with _kept_on_node("a private client's round" if is_private(cfg) else "a round on the server's data path"):
        return _local_round(cfg, partition_id, payload, server_round, own_data, num_partitions, steps_before,
                            ledger, delta)


@contextmanager
def _kept_on_node(what: str = "a private client's round"):
    """A round that fails raises one fixed line (what Flower sends to the server as the error's reason); what failed
    (a bad row of the node's data file: its line and value, or a withheld step's line) is printed on the node's own
    stderr only."""
    try:
        yield
    except Exception as exc:
        print(f"slimtune client (kept on this node, not sent to the server): {' '.join(str(exc).split())}",
              file=sys.stderr, flush=True)
        raise SlimtuneError(f"{what} failed; its details are withheld from the server (they may name "
                            "rows of a file on this node): they are on the node's own stderr") from None


def _local_round(cfg: FederatedConfig, partition_id: int, payload: dict, server_round: int, own_data: bool,
                 num_partitions: int | None, steps_before: int, ledger: NodeLedger | None,
                 delta: float) -> tuple[dict, dict]:
    if cfg.lr is None:  # a config that did not come from the server (which sends it resolved): the lr it would send
        cfg = replace(cfg, lr=cfg.resolved().lr)
    shares = cfg.num_clients if num_partitions is None else num_partitions  # a given count as given (>= 1)
    model, tok, train, parts, objective = _setup(cfg.to_json(), None if own_data else shares)
    examples = [train[i] for i in parts[0 if own_data else partition_id]]
    shapes = {k: tuple(v.shape) for k, v in lora_state(model).items()}
    start = decode_state(payload, shapes, cfg.bits, cfg.block_size)
    load_lora_state(model, start)
    optimizer_name = "mezo" if cfg.mode == "zo-seeds" else cfg.local_optimizer
    seed = mix_seed(cfg.seed, server_round, partition_id)
    if optimizer_name in ZO_OPTIMIZERS:
        # a ZO client's update to theta is a sum of its directions z(seed_s): from public values (the run's seed, the
        # round, a partition id) every other client could rebuild the span of theta's B and fit the broadcast to it
        # (review 10: 3x closer to theta). Fresh each round: known to this client, and in zo-seeds to the server,
        # which replays what it is sent.
        seed = secrets.randbits(63)
    private, spent = None, []
    if is_private(cfg) and ledger is not None:  # recorded before the first step: a round that fails still counts
        spent = ledger.record(cfg, len(examples), delta)
    if is_private(cfg):  # noise and Poisson batches from a fresh in-memory key, never the public seed
        from slimtune.privacy.accountant import PrivacySpec
        private = (PrivacySpec(noise_multiplier=cfg.local_dp_noise, clip=cfg.local_dp_clip), cfg.local_dp_noise,
                   cfg.batch_size, None)
    # dphybrid: its top part's per-example gradient is clipped at the run's --local-dp-clip too (not the method's 1.0)
    fo_clip = cfg.local_dp_clip if optimizer_name == "dphybrid" else None
    optimizer = build_optimizer(optimizer_name, model, OptimizerArgs(lr=cfg.lr, eps=cfg.eps, seed=seed,
                                                                     fo_clip=fo_clip), private)
    try:
        if private is None:
            losses, seeds, grads = run_steps(cfg, model, objective, optimizer, examples, seed, False)
        else:
            losses, seeds, grads = _run_private_steps(cfg, model, objective, optimizer, examples, seed)
    finally:
        release_hooks(optimizer)
    if private is not None:
        metrics = {}  # nothing but the update (federated/local_privacy.py)
        if own_data:  # a deployment node: its operator holds the rows; the server hears nothing of this
            from slimtune.federated.local_privacy import node_epsilon
            # its earlier rounds (the ledger's, each at its own noise, batch and steps), then this one
            epsilon = node_epsilon(cfg, len(examples), steps_before + cfg.local_steps, spent, delta)
            steps = sum(int(s["steps"]) for s in spent) + steps_before + cfg.local_steps
            where = (f"in the {len(spent) + 1} private rounds of its ledger {ledger.path}" if ledger is not None
                     else "in this call (no ledger: its earlier rounds are not counted)")
            print(f"slimtune client (this node only, not sent): example-level epsilon {epsilon:.4g} at delta "
                  f"{delta:g} after {steps} private steps on its data, {where}", file=sys.stderr, flush=True)
    else:
        metrics = {"num-examples": len(examples), "train-loss": float(np.nanmean(losses))}
    if cfg.mode == "zo-seeds":
        return {"seeds": np.array(seeds, dtype=np.int64), "grads": np.array(grads, dtype=np.float32)}, metrics
    trained = lora_state(model)
    arrays, _ = encode_state({k: trained[k] - start[k] for k in uploaded(shapes, cfg)}, cfg.upload_bits,
                             cfg.block_size)
    return arrays, metrics


def _run_private_steps(cfg, model, objective, optimizer, examples, seed):
    """The local steps of a private client, saying nothing about its batches (as `slimtune train` does): no warning
    raised while they run (generation's truncation notice counted the rows of each Poisson batch), and a failure
    reported without its details, which Flower would send to the server as the error's reason."""
    from slimtune.privacy.withhold import withheld
    objective.warn_per_batch = False
    with withheld(f"a private local step ({cfg.local_optimizer}) failed", "reproduce it on public data"):
        return run_steps(cfg, model, objective, optimizer, examples, seed, True)


SHARED_KEY = "shared-data"  # the shared file a node without data-path agrees to train a share of
NODE_KEYS = ("data-path", SHARED_KEY, "partition-id", "num-partitions", LEDGER_KEY)  # its rows, and its ledger
# A node's own privacy floor (--node-config 'local-optimizer="dp-adamw" local-dp-noise=2.0'): key -> (setting, whether
# the server's value meets the node's). The server's config decides how clients train; a node that pins one of these
# refuses a round that asks for less, instead of training as told (its settings were silently ignored).
NODE_FLOOR = {
    "local-optimizer": ("local_optimizer", lambda server, node: server == node),
    "local-dp-noise": ("local_dp_noise", lambda server, node: server >= node),
    "local-dp-clip": ("local_dp_clip", lambda server, node: server <= node),
    "local-dp-delta": ("local_dp_delta", lambda server, node: server <= node),
}


def check_shared_file(cfg: FederatedConfig, node: dict) -> None:
    """A node without its own data-path trains a share of the file the server's config names only if that is the file
    the node pinned itself (`shared-data=PATH`, the same file however spelled: data.readers.same_path): otherwise a hostile server could name any
    table the node can read (its private data, another project's file) and learn it from the node's updates. The
    refusal names neither path (the server's guess at a file is not confirmed or denied by the text). The node cuts
    the file into its own num-partitions shares, never the server's num-clients. In Flower's simulation engine the
    nodes are the server's own processes (in_simulation_engine): they train on the file the run names."""
    pinned = node.get(SHARED_KEY)
    if pinned is None and in_simulation_engine():  # the server's own processes: the file its user named
        return
    if pinned is None:
        raise SlimtuneError(f"this SuperNode has no --node-config data-path=... (its own data) and no "
                            f"{SHARED_KEY}=PATH (the shared file it agrees to train a share of): it does not train on a "
                            "file the server names (round refused)")
    if "num-partitions" not in node:  # else the server's num-clients would cut the node's share (10**9: no share)
        raise SlimtuneError(f"--node-config {SHARED_KEY}: needs num-partitions (the number of shares the shared file "
                            "is cut into; round refused)")
    if not same_path(os.path.expanduser(str(cfg.data)), os.path.expanduser(pinned)):
        raise SlimtuneError(f"the server's data file is not this node's --node-config {SHARED_KEY} (round refused)")


def in_simulation_engine() -> bool:
    """Whether this ClientApp runs in a worker of Flower's simulation engine (Ray): `flwr run .` on a local simulation
    or `slimtune federate`, whose nodes are the server's own processes on the user's machine, with only the
    partition-id / num-partitions Flower gives them. A deployment SuperNode runs its ClientApp in its own process,
    outside Ray, whatever a server sends, so a remote server cannot make a node count as simulated."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        from ray._private.worker import WORKER_MODE, global_worker
        return bool(ray.is_initialized()) and global_worker.mode == WORKER_MODE
    except Exception:  # noqa: BLE001 - another Ray layout: not known to be a simulation
        return False


def pinned_to(path: str, handler=None):
    """A ClientApp train function whose nodes agree to train a share of `path` (Flower's simulation: its nodes are the
    server's own processes, and `path` the file its user named); `handler`: the train function (default `train`)."""
    def train_pinned(msg: Message, context: Context) -> Message:
        context.node_config = {**context.node_config, SHARED_KEY: str(path)}
        return (handler or train)(msg, context)
    return train_pinned


def simulation_app(path: str, handler=None) -> ClientApp:
    """The ClientApp of pinned_to(path, handler) (simulation.simulate)."""
    sim = ClientApp()
    sim.train()(pinned_to(path, handler))
    return sim


NODE_BUDGET = "local-dp-epsilon"  # the most epsilon this node spends: the server sets q (batch) and T (steps, rounds)
# A node's caps on the work a server may ask of it (--node-config 'max-local-steps=50'): key -> setting. A round asking
# more is refused: a hostile server could otherwise send 2**62 local steps, or a batch or length that fills memory.
NODE_CAPS = {"max-local-steps": "local_steps", "max-batch-size": "batch_size", "max-length": "max_length",
             "max-lora-r": "lora_r"}
# What a node pins outright (--node-config 'model="smollm2"'): key -> setting; a round asking for another is refused
# (the server names the model the node loads, whose size is the node's memory)
NODE_PINS = {"model": "model"}


def check_node_floor(cfg: FederatedConfig, node: dict, spent: list[dict] | None = ()) -> None:
    """One line for a node setting this client does not know, or a round that asks for less privacy than the node
    pinned (names the key and both values: settings, not data). `local-dp-epsilon`: a round that would take the node
    past that epsilon, bounded without its row count (q = B / local-dp-min-examples, or 1: whether a node refuses
    must not tell the server how many rows it holds): `spent`, the private rounds it trained on this data (each at
    its own noise and batch, local_privacy.bound_segment, from its ledger), composed with this one at
    local_privacy.account_delta (never at the server's delta alone). spent None: the settings only (the budget is
    then checked by the caller, under the ledger's lock)."""
    check_node_keys(cfg, node)
    for key, value in node.items():
        if key in NODE_KEYS:
            continue
        if key in NODE_CAPS:
            if not is_whole(value):
                raise SlimtuneError(f"--node-config {key}={value!r}: must be a whole number >= 1")
            if getattr(cfg, NODE_CAPS[key]) > value:
                raise SlimtuneError(f"--node-config {key}={value}: the server asked for {NODE_CAPS[key]} "
                                    f"{getattr(cfg, NODE_CAPS[key])} (round refused)")
            continue
        if key in NODE_PINS:
            if not isinstance(value, str) or not value.strip():
                raise SlimtuneError(f"--node-config {key}={value!r}: must be a non-empty name")
            if getattr(cfg, NODE_PINS[key]) != value:
                raise SlimtuneError(f"--node-config {key}={value!r}: the server asked for another {key} (round "
                                    "refused)")
            continue
        if key not in NODE_FLOOR and key != NODE_BUDGET:
            known = ", ".join((*NODE_KEYS, *NODE_FLOOR, NODE_BUDGET, *NODE_CAPS, *NODE_PINS))
            raise SlimtuneError(f"--node-config {key}: not a node setting (known: {known})")
        wanted = str if key == "local-optimizer" else (int, float)
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise SlimtuneError(f"--node-config {key}={value!r}: expected "
                                f"{'an optimizer name' if wanted is str else 'a number'}")
        # the range each value has as a flag (--local-dp-noise, --local-dp-clip > 0, --local-dp-delta in (0, 1)): a
        # floor outside it (noise -2, delta 1e5: typos) would be met by every round and hold nothing
        if key in ("local-dp-noise", "local-dp-clip") and not (math.isfinite(value) and value > 0):
            raise SlimtuneError(f"--node-config {key}={value!r}: must be a finite number > 0")
        if key == "local-dp-delta" and not 0 < value < 1:
            raise SlimtuneError(f"--node-config {key}={value!r}: must be in (0, 1) (e.g. 1e-5)")
    for key, value in node.items():
        if key in NODE_KEYS or key in NODE_CAPS or key in NODE_PINS:
            continue
        if key != "local-optimizer" and not is_private(cfg):  # a DP floor is met by no non-private round
            raise SlimtuneError(f"--node-config {key}={value!r}: the server asked for a round without local DP "
                                f"(local-optimizer {cfg.local_optimizer}, mode {cfg.mode}); this node trains only at "
                                "its own privacy floor (round refused)")
        if key == NODE_BUDGET:
            if not value > 0:
                raise SlimtuneError(f"--node-config {NODE_BUDGET}={value!r}: must be > 0")
            if spent is not None:
                _check_budget(cfg, float(value), list(spent), account_delta(cfg, node))
            continue
        name, meets = NODE_FLOOR[key]
        if not meets(getattr(cfg, name), value):
            raise SlimtuneError(f"--node-config {key}={value!r}: the server asked for {key} {getattr(cfg, name)!r}; "
                                "this node trains only at its own privacy floor (round refused)")


def check_node_keys(cfg: FederatedConfig, node: dict) -> None:
    """The node's own keys, before anything reads them: partition-id a whole number >= 0 below num-partitions (a
    whole number >= 1; without it and without data-path, the server's num-clients), data-path, shared-data and
    dp-ledger non-empty strings. Out of range, a share was another node's (-1: Python's last) or an IndexError's
    text went to the server; num-partitions 0 became num-clients without a word."""
    for key in ("data-path", SHARED_KEY, LEDGER_KEY):
        if key in node and (not isinstance(node[key], str) or not node[key].strip()):
            raise SlimtuneError(f"--node-config {key}={node[key]!r}: must be a non-empty file path")
    for key, low in (("partition-id", 0), ("num-partitions", 1)):
        value = node.get(key)
        if key in node and not is_whole(value, low):
            raise SlimtuneError(f"--node-config {key}={value!r}: must be a whole number >= {low}")
    if "partition-id" in node:
        count, named = (node["num-partitions"], "num-partitions") if "num-partitions" in node else \
            (None if "data-path" in node else cfg.num_clients, "the server's num-clients")
        if count is not None and not node["partition-id"] < count:
            raise SlimtuneError(f"--node-config partition-id={node['partition-id']!r}: must be below {named} "
                                f"({count}): partitions are numbered 0..{count - 1}")


def _check_budget(cfg: FederatedConfig, budget: float, spent: list[dict], delta: float) -> None:
    """This round composed with what the node's ledger holds, against its budget (inf: none; the account must still
    be computable, or the round is refused)."""
    from slimtune.federated.local_privacy import bound_segment, composed_epsilon
    try:
        epsilon = composed_epsilon(cfg, [*spent, bound_segment(cfg)], delta)
    except (SlimtuneError, ValueError, OverflowError) as exc:
        raise SlimtuneError(f"this round's privacy settings cannot be accounted with this node's ledger ({exc}); "
                            "round refused") from None
    if epsilon > budget:
        steps = sum(int(d["steps"]) for d in spent) + cfg.local_steps
        raise SlimtuneError(f"--node-config {NODE_BUDGET}={budget:g}: this round would bring this node to epsilon "
                            f"{epsilon:.3g} at delta {delta:g} after {steps} private steps on its data (bounded at "
                            f"batch {cfg.batch_size}, local-dp-min-examples {cfg.local_dp_min_examples}); round "
                            "refused")


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = FederatedConfig.from_server(str(config["slimtune-config"]))  # the server's own settings refused
    cfg.validate()  # a received config through the same rules as every other path
    payload = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    node = dict(context.node_config)
    check_node_floor(cfg, node, None)  # the settings; the budget below, under the ledger's lock
    private = is_private(cfg)
    where = ledger_path(node) if private else None  # a non-private round spends nothing
    if private and NODE_BUDGET in node and where is None:
        raise SlimtuneError(f"--node-config {NODE_BUDGET}={node[NODE_BUDGET]!r}: a budget needs this node's ledger of "
                            f"what it spent: give it data-path=... (the ledger goes beside it) or {LEDGER_KEY}=PATH "
                            "(round refused)")
    # what this node spent on its data: on its own disk, not in Flower's per-run state (fresh for each run, and a
    # snapshot per ClientApp process); locked from the budget check until this round is recorded
    delta = account_delta(cfg, node)
    with NodeLedger(where) if private and where is not None else nullcontext() as ledger:
        if ledger is not None:  # this round's account with the ledger's, before it is recorded: a round the
            _check_budget(cfg, float(node.get(NODE_BUDGET, math.inf)), ledger.bound_segments(), delta)  # accountant
            # cannot price is refused here, not written to the ledger to break every later round on this data
        own = node.get("data-path")  # deployment: each SuperNode reads only its own data (--node-config data-path=)
        if own:
            cfg = replace(cfg, data=str(own))
        elif "partition-id" not in node:
            raise ValueError("this SuperNode has neither --node-config data-path=... (its own data) nor partition-id "
                             "/ num-partitions (its share of a shared file)")
        else:
            check_shared_file(cfg, node)
        # a node's own seeds: its partition id, or (a deployment node started without one) its Flower node id
        identity = int(node.get("partition-id", context.node_id))
        arrays, metrics = local_train(cfg, identity, payload, int(config["server-round"]), own_data=bool(own),
                                      num_partitions=int(node["num-partitions"]) if "num-partitions" in node else None,
                                      ledger=ledger, delta=delta)
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
