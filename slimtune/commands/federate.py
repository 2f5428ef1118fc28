"""`slimtune federate`: FedLPP simulated on this machine with Flower (settings: slimtune/federated/config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimtune import SlimtuneError


def register(app) -> None:
    app.command()(federate)


def federate(
    ctx: typer.Context,
    config_file: Optional[str] = typer.Option(None, "--config", help="YAML/JSON file of settings (flag names or "
                                              "FederatedConfig fields); flags override it"),
    data: Optional[str] = typer.Option(None, help="training data, split across clients (required, here or in "
                                       "--config)"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="server-side evaluation data"),
    out: str = typer.Option("runs/federated"),
    model: str = typer.Option("smollm2"),
    task: str = typer.Option("sst2", help="sst2, rte or generation (clients train on the completion loss; the server "
                             "reports the loss of theta and Q(theta))"),
    input_column: Optional[str] = typer.Option(None, help="generation, tables: prompt column"),
    target_column: Optional[str] = typer.Option(None, help="generation, tables: completion column"),
    template: Optional[str] = typer.Option(None, help="generation: prompt template over the input column"),
    max_length: int = typer.Option(256, help="tokens per example (prompt + completion)"),
    clients: int = typer.Option(4),
    rounds: int = typer.Option(5),
    bits: int = typer.Option(4, help="broadcast precision: 1..8 bits (NF levels), or 32 for no quantization"),
    block_size: int = typer.Option(64),
    upload_bits: int = typer.Option(32, help="quantize client deltas too (32: fp32 uploads)"),
    local_steps: int = typer.Option(3, help="local steps per round (3: benchmarks/federated_sweep.py)"),
    local_optimizer: str = typer.Option("adamw", help="any slimtune optimizer"),
    lr: float = typer.Option(1e-3),
    eps: float = typer.Option(1e-3),
    batch_size: int = typer.Option(8),
    lora_r: int = typer.Option(8),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration over labels (small: non-IID)"),
    aggregation: str = typer.Option("fedavg", help="fedavg (FedIT) or ffa (FFA-LoRA, A frozen)"),
    server_optimizer: Optional[str] = typer.Option(None, help="server step on the aggregated update: fedavg, "
                                                   "fedavgm, fedadam, fedyogi (Flower's semantics); default: for "
                                                   "AdamW clients fedadam at server lr 3e-3 with --server-average 0.8 "
                                                   "(benchmarks/federated_sweep.py), else fedavg"),
    server_lr: Optional[float] = typer.Option(None, help="server learning rate (default: the swept one without "
                                              "--server-optimizer; else Flower's: 1 fedavg/fedavgm, 0.1 fedadam, "
                                              "0.01 fedyogi)"),
    server_momentum: float = typer.Option(0.9, help="fedavgm: server momentum"),
    server_average: Optional[float] = typer.Option(None, help="the server keeps an exponential moving average of its "
                                                   "iterates with this decay as its model (0: off; 0.8 ~ the last 5 "
                                                   "rounds; default: the swept one without --server-optimizer, else "
                                                   "0); clients still receive Q(theta) of the current iterate"),
    mode: str = typer.Option("lora", help="lora (deltas) or zo-seeds (FedKSeed-style seed/scalar pairs)"),
    client_dp_clip: float = typer.Option(0.0, help="client-level DP: L2 clip of each delta (0: off)"),
    client_dp_noise: float = typer.Option(0.0, help="client-level DP: noise multiplier"),
    eval_max: int = typer.Option(200),
    max_update_norm: float = typer.Option(1e3, help="server: reject client updates with a larger L2 norm"),
    robust: str = typer.Option("none", help="robust aggregation: none (weighted mean), median (coordinate-wise), "
                               "clip (each update clipped to the round's median norm)"),
    dither: float = typer.Option(0.0, help="fixed secret dither on the broadcast, in units of the largest "
                                 "quantization step (0: off; clients cannot subtract or average it away)"),
    clients_per_round: int = typer.Option(0, help="clients sampled to train each round (0: all)"),
    attack_coalition: int = typer.Option(0, help="measurement: score what k colluding clients rebuild of theta from "
                                         "the broadcasts (multi-round average, then fine-tuning on their pooled data); "
                                         "0: off"),
    attack_window: int = typer.Option(5, help="broadcasts the multi-round attack averages"),
    round_timeout: float = typer.Option(3600.0, help="seconds the server waits for a round's replies; simulated "
                                        "clients share this machine's CPUs, so a slow round would lose its updates"),
    seed: int = typer.Option(0),
):
    """Federated LoRA fine-tuning with model privacy (FedLPP) simulated on this machine with Flower."""
    from slimtune.cli import console, fail
    from slimtune.federated import FederatedConfig, simulate
    from slimtune.report import print_summary

    from slimtune.config_file import FEDERATED_FIELDS, apply_config

    try:
        p = apply_config(ctx, dict(ctx.params), config_file, FEDERATED_FIELDS)
        if not p["data"]:
            raise SlimtuneError("--data is required (on the command line or in --config)")
        out = p["out"]
        if Path(out, "summary.json").exists():
            raise SlimtuneError(f"{out}: already holds a federated run (nothing was overwritten); choose another --out")
        cfg = FederatedConfig(
            data=p["data"], eval_data=p["eval_data"] or "", model=p["model"], task=p["task"],
            input_column=p["input_column"], target_column=p["target_column"], template=p["template"],
            max_length=p["max_length"],
            num_clients=p["clients"], rounds=p["rounds"], bits=p["bits"], block_size=p["block_size"],
            upload_bits=p["upload_bits"], local_steps=p["local_steps"], local_optimizer=p["local_optimizer"],
            lr=p["lr"], eps=p["eps"], batch_size=p["batch_size"], lora_r=p["lora_r"], dirichlet_alpha=p["alpha"],
            aggregation=p["aggregation"], server_optimizer=p["server_optimizer"], server_lr=p["server_lr"],
            server_momentum=p["server_momentum"], server_average=p["server_average"], mode=p["mode"], client_dp_clip=p["client_dp_clip"],
            client_dp_noise=p["client_dp_noise"], eval_max=p["eval_max"], max_update_norm=p["max_update_norm"], robust=p["robust"],
            dither=p["dither"], clients_per_round=p["clients_per_round"], attack_coalition=p["attack_coalition"],
            attack_window=p["attack_window"], round_timeout=p["round_timeout"], seed=p["seed"], out_dir=out)
        _validate_federated(cfg)
        summary = simulate(cfg)
    except SlimtuneError as exc:
        fail(exc)
    print_summary([summary], console)
    console.print(f"server accuracy (theta) {summary['final_accuracy']}, client-visible accuracy (Q(theta)) "
                  f"{summary['client_visible_accuracy']}; run written to [bold]{out}[/]")
    if summary.get("rounds_with_lost_updates"):
        console.print(f"[yellow]warning:[/] rounds {summary['rounds_with_lost_updates']} lost client updates "
                      f"(rejected, failed or later than --round-timeout {cfg.round_timeout:g} s); see the log above")
    if summary.get("attack_best_score") is not None:
        console.print(f"best reconstruction by {summary['attack_coalition_clients']} colluding clients: "
                      f"{summary['attack_best_score']:.4g} (theta {summary['attack_theta_score']:.4g}, received "
                      f"{summary['attack_received_score']:.4g}, multi-round mean {summary['attack_multi_round_score']:.4g}"
                      f", coalition fine-tune {summary['attack_coalition_score']:.4g})")


def _validate_federated(cfg) -> None:
    from slimtune.federated.common import federated_objective
    cfg.validate()
    if not (1 <= cfg.bits <= 8 or cfg.bits == 32) or not (1 <= cfg.upload_bits <= 8 or cfg.upload_bits == 32):
        raise SlimtuneError("--bits/--upload-bits must be 1..8 or 32")
    if cfg.aggregation not in ("fedavg", "ffa") or cfg.mode not in ("lora", "zo-seeds"):
        raise SlimtuneError("--aggregation is fedavg or ffa; --mode is lora or zo-seeds")
    objective = federated_objective(cfg)  # fail here, with file/line, not inside a Ray worker
    for path in (cfg.data, cfg.eval_data):
        if path:
            raw, _ = objective.load(path, "train")
            if objective.kind == "generation" and "messages" not in raw[0][0][1]:
                objective.examples(raw, None)  # chat rows are checked once the tokenizer is loaded
