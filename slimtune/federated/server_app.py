"""The Flower ServerApp: FedLPP rounds, per-round accuracy of theta and of Q(theta), bytes, metrics JSON."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from slimtune import SlimtuneError
from slimtune.federated.attacks import BroadcastHistory, attack_report, coalition_data
from slimtune.federated.config import FederatedConfig, check_run, settings_path
from slimtune.federated.local_privacy import private_clients
from slimtune.federated.model import build_model, build_model_and_split, load_lora_state, lora_state
from slimtune.federated.wire import FP32
from slimtune.federated.strategy import FedLPP, NodesMissing
from slimtune.peft import peft_summary
from slimtune.peft.registry import adapter_meta, write_adapter
from slimtune.train.metrics import MetricsLog, peak_memory_mb, reset_peak_memory
from slimtune.zo import MeZO, MeZOConfig

app = ServerApp()


def make_replay(model, cfg: FederatedConfig):
    """The delta a client's (seed, scalar) pairs make, -lr sum_s g_s z(seed_s), with the very same z generator the
    clients used (replayed onto zero: the update is linear in the pairs and does not depend on where it starts)."""

    def replay(seeds, grads) -> dict:
        load_lora_state(model, {k: torch.zeros_like(v) for k, v in lora_state(model).items()})
        opt = MeZO(model.named_parameters(), MeZOConfig(lr=cfg.lr, eps=cfg.eps))
        for seed, g in zip(seeds.tolist(), grads.tolist()):
            opt._sweep(int(seed), "update", coef=g)
        return lora_state(model)

    return replay


def run_server(grid: Grid, cfg: FederatedConfig) -> dict:
    """The one code path of every federated run (simulation, `flwr run .`, deployment): checks, rounds, summary.
    Raises SlimtuneError on bad settings (before any work) and when no client update was accepted."""
    cfg = check_run(cfg)  # the server step the run uses is filled in and recorded in summary.json
    reset_peak_memory("cpu")  # the server's peak is this run's (a simulation in a notebook runs it in-process)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from slimtune.privacy.secret import RunKey
    if cfg.attack_coalition and not cfg.data:
        raise SlimtuneError("--attack-coalition measures what clients can learn from their own rows: it needs the "
                            "training file (a deployment's server has none)")
    model, tok, train, evals, objective, split = build_model_and_split(cfg, secret_key=RunKey.fresh())  # secret theta_0
    metric = "accuracy" if objective.kind == "classification" else "loss"
    per_round = cfg.clients_per_round or cfg.num_clients
    strategy = FedLPP(cfg, lora_state(model), replay=make_replay(model, cfg),
                      reference=root_reference(cfg, model, tok, objective), min_available_nodes=cfg.num_clients,
                      min_train_nodes=per_round, fraction_train=per_round / cfg.num_clients)
    history = BroadcastHistory(cfg.attack_window) if cfg.attack_coalition else None
    log, started = MetricsLog(out / "metrics.jsonl"), time.perf_counter()
    accountant = _client_dp_accountant(cfg)
    withheld = private_clients(cfg)  # round times and memory: functions of the clients' private data

    def score(state) -> float | None:
        """Accuracy (classification) or completion loss (generation) of a LoRA state on the eval data."""
        if not evals:
            return None
        load_lora_state(model, state)
        return objective.evaluate(model, evals, "cpu")[metric]

    def scores(server_round: int) -> dict:
        """The scores of a round's models, as every scored round (and a stopped run's last round) records them: the
        server's model, what clients received, the iterate (--server-average) and the coalition's mean. Only the
        released models (under client-level DP the noised aggregates), on the server's own evaluation data."""
        record = {f"server_{metric}": score(strategy.server_model()),
                  f"client_visible_{metric}": score(strategy.client_view())}
        if cfg.server_average:  # the iterate clients train from, next to the average the server keeps
            record[f"iterate_{metric}"] = score(strategy.theta)
        record[f"eval_{metric}"] = record[f"server_{metric}"]
        if history is not None and server_round:
            record[f"multi_round_{metric}"] = score(history.mean())
        return record

    def evaluate_fn(server_round: int, _arrays) -> MetricRecord:
        if history is not None and server_round:  # what colluding clients have received so far
            history.add(strategy.client_view())
        record = {**strategy.round_log.get(server_round, {"round": server_round}), "step": server_round}
        if cfg.evaluates(server_round):  # --eval-every: the other rounds are logged, not scored
            record.update(scores(server_round))
        if not withheld:
            record.update(elapsed_s=time.perf_counter() - started, peak_mem_mb=peak_memory_mb("cpu"))
        if accountant and server_round:
            record.update(epsilon=accountant.epsilon(server_round), delta=cfg.client_dp_delta)
        log.write(record)
        return MetricRecord({k: float(v) for k, v in record.items() if isinstance(v, (int, float))})

    if cfg.allowed_nodes:
        grid = MembersOnly(grid, cfg.allowed_nodes)
    elif not isinstance(grid, InMemoryGrid):  # a deployment's SuperLink: anyone who registered a key is sampled
        logging.getLogger("slimtune.federated").warning(
            "no allowed-nodes in the server's settings: every SuperNode connected to this SuperLink is sampled and "
            "aggregated, including a node registered by anyone who reaches Flower's Control API; list the run's node "
            "ids in allowed-nodes (python -m slimtune.federated.deployment does)")
    wait_for_nodes(grid, cfg.num_clients, cfg.node_timeout)
    stopped = None  # NodesMissing: a later round found too few SuperNodes within node-timeout (strategy.py)
    try:
        strategy.start(grid, strategy.broadcast()[0], num_rounds=cfg.rounds, timeout=cfg.round_timeout,
                       evaluate_fn=evaluate_fn)
    except NodesMissing as exc:  # the rounds done are kept: adapter, metrics.jsonl, summary.json as for a full run
        stopped = exc
    done = cfg.rounds if stopped is None else stopped.server_round - 1
    seconds = lambda: None if withheld else time.perf_counter() - started  # noqa: E731
    # nothing trained: no round completed (a stop in round 1, DP or not: no noised aggregate was released either),
    # or no client update was accepted (client-level DP: every completed round released its noised aggregate)
    if not done or (not strategy.accepted_total and not cfg.client_level_dp):
        _write_summary(cfg, out, model, accountant, seconds(), nodes=len(strategy.nodes_replied), rounds_done=done,
                       stopped=stopped)
        why = (f"no round was completed ({stopped})" if not done else
               "no client update was accepted in any round (see the client errors in the log)"
               f"{f' ({stopped})' if stopped else ''}")
        raise SlimtuneError(f"federated run trained nothing: {why}; no adapter was saved (summary in {out})")
    if stopped is not None and not cfg.evaluates(done) and evals:  # scored as a full run's last round is
        _score_last_round(log.path, scores(done))
    load_lora_state(model, strategy.server_model())
    # the private fp32 result stays here; a tiny model's tokenizer is fitted to the clients' training texts, so a
    # private run saves none (its adapter then cannot be evaluated on that tiny base, and eval says so)
    from slimtune.models.loading import TINY_MODELS
    saved_tok = None if withheld and cfg.model in TINY_MODELS else tok
    meta = adapter_meta(cfg.model, task=cfg.task, template=cfg.template, label_words=cfg.label_words,
                        input_column=cfg.input_column, target_column=cfg.target_column,
                        scoring={"max_length": cfg.max_length})
    write_adapter(model, saved_tok, out / "adapter", meta=meta)
    attacks = None
    if history is not None and history.items and evals:
        scratch = lora_state(build_model(cfg)[0])  # a fresh LoRA the coalition builds from the public settings
        attacks = attack_report(score, metric == "accuracy", strategy.server_model(), history, model, objective,
                                coalition_data(cfg, train, split), cfg, scratch)
    summary = _write_summary(cfg, out, model, accountant, seconds(), attacks, nodes=len(strategy.nodes_replied),
                             rounds_done=done, stopped=stopped)
    if stopped is not None:
        raise SlimtuneError(f"federated run stopped early: {stopped}; the {done} round(s) done are saved in {out} "
                            f"(adapter, metrics.jsonl, summary.json)")
    return summary


def root_reference(cfg: FederatedConfig, model, tok, objective):
    """--robust trust: the server's own update on its root data (root_reference.py); None under the other rules."""
    if cfg.aggregation_rule != "trust":
        return None
    from slimtune.federated.root_reference import RootReference, load_root_data
    return RootReference(cfg, model, objective, load_root_data(cfg.root_data, objective, tok))


class MembersOnly:
    """The Grid as the strategy sees it in a deployment: only the nodes whose keys the run registered (`allowed_nodes`)
    are connected. Open-source Flower lets anyone who reaches the SuperLink's Control API register a key of its own;
    such a node may connect, but it is never sampled, so it is never sent Q(theta) nor aggregated."""

    def __init__(self, grid: Grid, allowed: str):
        self._grid = grid
        self._allowed = {int(node) for node in str(allowed).split(",") if node.strip()}

    def get_node_ids(self):
        return [node for node in self._grid.get_node_ids() if node in self._allowed]

    def __getattr__(self, name):
        return getattr(self._grid, name)


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, poll: float = 1.0) -> None:
    """Wait until `wanted` SuperNodes are connected; give up with a clear error after `timeout` seconds (instead of
    Flower's wait without end)."""
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= wanted:
            return
        if time.monotonic() >= deadline:
            raise SlimtuneError(f"only {connected} of num-clients={wanted} SuperNodes connected within {timeout:.0f} "
                                f"s: start more SuperNodes or lower it (flwr run . --run-config "
                                f"'num-clients={connected}')")
        time.sleep(poll)


def _score_last_round(path: Path, scores: dict) -> None:
    """A stopped run's last completed round, whose record --eval-every left unscored, with the scores of the model
    saved (metrics.jsonl's last line: the summary's final_* read it, as a full run's last round is always scored)."""
    from slimtune.train.metrics import _clean
    from slimtune.train.run_dir import replace_file
    lines = path.read_text().splitlines()
    last = json.loads(lines[-1])
    last.update({k: _clean(v) for k, v in scores.items()})
    replace_file(path, "".join(line + "\n" for line in [*lines[:-1], json.dumps(last)]))


def _client_dp_accountant(cfg: FederatedConfig):
    if not cfg.client_level_dp:
        return None
    from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec
    spec = PrivacySpec(delta=cfg.client_dp_delta, noise_multiplier=cfg.client_dp_noise, clip=cfg.client_dp_clip)
    return PrivacyAccountant(spec, cfg.num_clients, cfg.num_clients, cfg.client_dp_noise)  # all clients every round


def _write_summary(cfg, out, model, accountant, seconds: float | None, attacks=None, nodes=None,
                   rounds_done: int | None = None, stopped=None) -> dict:
    """summary.json; `seconds` None: the run's time is withheld (private_clients), and so is its peak memory.
    `rounds_done` < cfg.rounds with `stopped` (NodesMissing): the run stopped early, and says why."""
    rounds = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    done = cfg.rounds if rounds_done is None else rounds_done
    dp = cfg.client_level_dp  # released every round; how many replies were accepted is not written (strategy.py)
    trained = sum(r.get("replies", 0) for r in rounds)
    from slimtune.federated.local_privacy import public_bound
    # every private client's epsilon, bounded from public settings (None without --local-dp-min-examples)
    local_epsilon = public_bound(cfg, len([r for r in rounds if r.get("round", 0) > 0]))
    short = None if dp else [r["round"] for r in rounds if r.get("sampled") and r.get("replies", 0) < r["sampled"]]
    last = rounds[-1]
    bytes_total = sum(r.get("bytes_down_total", 0) + r.get("bytes_up_total", 0) for r in rounds)  # serialised, as sent
    summary = {"method": f"fedlpp-{cfg.mode}", "peft": f"lora ({'fp32' if cfg.bits == FP32 else f'{cfg.bits}-bit'})",
               "name": Path(cfg.out_dir).name, **peft_summary(model),
               "peak_mem_mb": max((r["peak_mem_mb"] for r in rounds if "peak_mem_mb" in r), default=None),
               "time_per_step_s": None if seconds is None else seconds / max(done, 1),
               "steps": done, "rounds": cfg.rounds, "rounds_done": done,
               "clients": cfg.num_clients, "nodes_replied": None if dp else nodes, "bits": cfg.bits,
               "aggregation": cfg.aggregation,
               "weighting": cfg.weighting, "norm_bound": cfg.norm_bound, "robust": cfg.robust,
               "aggregation_rule": cfg.aggregation_rule,
               "server_optimizer": cfg.server_optimizer, "server_lr": cfg.server_lr,
               "server_average": cfg.server_average, "server_lr_scheduler": cfg.server_lr_scheduler,
               "final_iterate_accuracy": last.get("iterate_accuracy"),
               "task": cfg.task, "model": cfg.model, "final_accuracy": last.get("server_accuracy"),
               "client_visible_accuracy": last.get("client_visible_accuracy"),
               "initial_accuracy": rounds[0].get("server_accuracy"),
               "final_eval_loss": last.get("server_loss"), "client_visible_loss": last.get("client_visible_loss"),
               "initial_eval_loss": rounds[0].get("server_loss"),
               "bytes_down_per_client_per_round": last.get("bytes_down_per_client"),
               "bytes_up_per_client_per_round": last.get("bytes_up_per_client"),
               "payload_bytes_down_per_client_per_round": last.get("payload_bytes_down_per_client"),
               "payload_bytes_up_per_client_per_round": last.get("payload_bytes_up_per_client"),
               "bytes_communicated": bytes_total,
               # what was released: every completed round's noised aggregate; none before round 1 completed
               "epsilon": (accountant.epsilon(done) if done else 0.0) if accountant and (trained or dp) else None,
               "delta": (cfg.client_dp_delta if done else 0.0) if accountant and (trained or dp) else None,
               "stop_reason": (f"no round was completed ({stopped})" if not done and stopped is not None else
                               str(stopped) if stopped is not None and (trained or dp) else
                               "completed" if trained or dp else "no client update was accepted in any round"),
               "accepted_updates": None if dp else trained,
               "rounds_with_lost_updates": short,  # a sampled client's update was rejected, failed or came too late
               "local_epsilon": local_epsilon, "local_delta": cfg.local_dp_delta if local_epsilon else None,
               "clients_per_round": cfg.clients_per_round or cfg.num_clients, **(attacks or {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: training settings from the run config ([tool.flwr.app.config], --run-config),
    server settings from the server's own file (config.settings_path)."""
    run_server(grid, FederatedConfig.from_flower(context.run_config, settings_path()))
