"""Run FedLPP on one machine with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from slimtune.federated.common import FederatedConfig


def simulate(cfg: FederatedConfig, cpus_per_client: float = 1.0) -> dict:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from slimtune.federated.client_app import app as client_app
    from slimtune.federated.server_app import run_server

    server = ServerApp()

    @server.main()
    def main(grid, context):
        run_server(grid, cfg)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=server, client_app=client_app, num_supernodes=cfg.num_clients,
                   backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}})
    path = Path(cfg.out_dir) / "summary.json"
    if not path.exists():
        from slimtune import SlimtuneError
        raise SlimtuneError(f"federated run did not finish (no {path}); see the log above")
    summary = json.loads(path.read_text())
    if summary.get("stop_reason", "completed") != "completed":
        from slimtune import SlimtuneError
        raise SlimtuneError(f"federated run trained nothing: {summary['stop_reason']} (see the client errors above); "
                            f"theta is still its initial value in {cfg.out_dir}")
    return summary
