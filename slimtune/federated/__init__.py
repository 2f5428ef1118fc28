"""Federated fine-tuning with data and model privacy (FedLPP) on Flower.

The server keeps full-precision LoRA private and broadcasts only a block-wise quantized copy; clients train from it
and return deltas (or seed/scalar pairs); `simulate` runs everything on one machine, `flwr run` deploys it.

One code path, whichever way a run starts (`slimtune federate` -> simulation.py; `flwr run .` -> server_app.main;
`python -m slimtune.federated.deployment` -> `flwr run` on local processes):

    config.py       FederatedConfig: every setting, which ones clients are sent, check_run (the checks every path
                    makes before any work), the server's settings file under `flwr run`
    server_app.py   run_server: build theta_0, run the rounds (strategy), score, write metrics/summary/adapter
    strategy.py     FedLPP (Flower strategy): broadcast Q(theta), collect replies, server step
      wire.py         what goes down and up: quantized or fp32 arrays, and the bytes Flower sends
      replies.py      every field of a reply checked; a bad one is rejected
      bounds.py       the one bound on a client's influence (weights, norm clip, zo-seeds scalars), aggregation
      server_opt.py   FedAvg/FedAvgM/FedAdam/FedYogi on the aggregate, iterate averaging
    client_app.py   local_train: train from Q(theta), release the update (private clients: local epsilon only)
    model.py        the shared base model with LoRA, LoRA state as tensors
    quantization.py, partition.py, attacks.py (model-IP measurements), hostile.py (hostile clients, measurements)
    deployment.py, credentials.py   the Deployment Engine on this machine: TLS and SuperNode authentication
"""

from slimtune.federated.config import FederatedConfig
from slimtune.federated.partition import dirichlet_partition
from slimtune.federated.quantization import dequantize, nf_levels, quantize

__all__ = ["FederatedConfig", "dirichlet_partition", "dequantize", "nf_levels", "quantize", "simulate"]


def simulate(cfg, cpus_per_client: float = 1.0, client_app=None):
    from slimtune.federated.simulation import simulate as _simulate
    return _simulate(cfg, cpus_per_client, client_app)
