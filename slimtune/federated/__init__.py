"""Federated fine-tuning with data and model privacy (FedLPP) on Flower.

The server keeps full-precision LoRA private and broadcasts only a block-wise quantized copy; clients train from it
and return deltas (or seed/scalar pairs); `simulate` runs everything on one machine, `flwr run` deploys it.
"""

from slimtune.federated.common import FederatedConfig
from slimtune.federated.partition import dirichlet_partition
from slimtune.federated.quantization import dequantize, nf_levels, quantize

__all__ = ["FederatedConfig", "dirichlet_partition", "dequantize", "nf_levels", "quantize", "simulate"]


def simulate(cfg, cpus_per_client: float = 1.0):
    from slimtune.federated.simulate import simulate as _simulate
    return _simulate(cfg, cpus_per_client)
