"""Run FedLPP on one machine with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from slimtune import SlimtuneError
from slimtune.federated.config import FederatedConfig, check_run


def simulate(cfg: FederatedConfig, cpus_per_client: float = 1.0, client_app=None) -> dict:
    """Run on Flower's simulation engine with `num_clients` virtual SuperNodes; the server is run_server, as under
    `flwr run` and in deployment; its nodes train shares of cfg.data (client_app.simulation_app pins it).
    `client_app`: another ClientApp (measurements with hostile clients: hostile.hostile_app)."""
    import flwr.simulation
    from flwr.serverapp import ServerApp

    from slimtune.federated.client_app import simulation_app
    from slimtune.federated.server_app import run_server

    check_run(cfg)  # the checks run_server makes, before Ray starts

    server = ServerApp()

    @server.main()
    def main(grid, context):
        run_server(grid, cfg)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    flwr.simulation.run_simulation(server_app=server, client_app=client_app or simulation_app(cfg.data),
                                   num_supernodes=cfg.num_clients,
                                   backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}})
    path = Path(cfg.out_dir) / "summary.json"
    if not path.exists():
        raise SlimtuneError(f"federated run did not finish (no {path}); see the log above")
    summary = json.loads(path.read_text())
    done = summary.get("rounds_done", summary.get("rounds"))  # 0: stopped in round 1, nothing saved (server_app)
    if summary.get("stop_reason", "completed") != "completed" and summary.get("accepted_updates") != 0 and done and \
            done != summary.get("rounds"):  # server_app: NodesMissing after some rounds, which are kept
        raise SlimtuneError(f"federated run stopped early: {summary['stop_reason']}; the rounds done are saved in "
                            f"{cfg.out_dir}")
    if summary.get("stop_reason", "completed") != "completed":
        raise SlimtuneError(f"federated run trained nothing: {summary['stop_reason']} (see the client errors above); "
                            f"no adapter was saved in {cfg.out_dir}")
    return summary
