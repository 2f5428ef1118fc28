"""`slimtune federate`: FedLPP simulated on this machine with Flower (the same run path as `flwr run .` and the
deployment script: federated/config.py check_run, then federated/server_app.py run_server)."""

from __future__ import annotations

from rich.markup import escape

from slimtune import SlimtuneError
from slimtune.settings.cli import command
from slimtune.settings.federate import FederateSettings


def register(app) -> None:
    command(app, FederateSettings, run_federate)


def run_federate(s: FederateSettings):
    """Federated LoRA fine-tuning with model privacy (FedLPP) simulated on this machine with Flower."""
    from slimtune.cli import console, fail
    from slimtune.federated import simulate
    from slimtune.report import print_summary

    try:
        cfg = s.to_config()
        summary = simulate(cfg)  # check_run first: settings, data, output, before Ray starts
    except SlimtuneError as exc:
        fail(exc)
    print_summary([summary], console)
    console.print(f"server accuracy (theta) {summary['final_accuracy']}, client-visible accuracy (Q(theta)) "
                  f"{summary['client_visible_accuracy']}; run written to [bold]{escape(str(cfg.out_dir))}[/]")
    if summary.get("rounds_with_lost_updates"):
        console.print(f"[yellow]warning:[/] rounds {summary['rounds_with_lost_updates']} lost client updates "
                      f"(rejected, failed or later than --round-timeout {cfg.round_timeout:g} s); see the log above")
    if summary.get("attack_best_score") is not None:
        console.print(f"best reconstruction by {summary['attack_coalition_clients']} colluding clients: "
                      f"{summary['attack_best_score']:.4g} (theta {summary['attack_theta_score']:.4g}, received "
                      f"{summary['attack_received_score']:.4g}, multi-round mean "
                      f"{summary['attack_multi_round_score']:.4g}, coalition fine-tune "
                      f"{summary['attack_coalition_score']:.4g})")
