"""What server and clients share: the run configuration, the model with its LoRA structure, the wire format."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

import torch

from slimtune import SlimtuneError
from slimtune.federated.quantization import QuantizedTensor, dequantize, quantize
from slimtune.peft import PeftSettings, apply_peft

FP32 = 32  # "bits" value meaning: no quantization (the non-private baseline)
# Settings only the server reads: never sent to clients.
SERVER_ONLY = ("out_dir", "eval_data", "eval_max", "rounds", "client_dp_clip", "client_dp_noise", "client_dp_delta",
               "max_update_norm", "round_timeout", "node_timeout", "server_optimizer", "server_lr",
               "server_momentum", "robust", "clients_per_round", "attack_coalition", "attack_window", "dither",
               "server_average")


@dataclass
class FederatedConfig:
    data: str = ""
    eval_data: str = ""
    model: str = "tiny-llama"
    task: str = "sst2"  # a classification task, or "generation" (prompt -> completion; see train/objectives.py)
    input_column: str | None = None  # generation tables: prompt / completion columns, template
    target_column: str | None = None
    template: str | None = None
    max_length: int = 256
    num_clients: int = 4
    rounds: int = 3
    bits: int = 4  # 1..8, or 32 for full precision
    block_size: int = 64
    upload_bits: int = FP32  # quantize client deltas too (32: send fp32)
    local_steps: int = 3  # benchmarks/federated_sweep.py: 3 (0.725) against 5 (0.722) under FedAdam 3e-3
    local_optimizer: str = "adamw"  # any slimtune optimizer
    local_dp_noise: float = 1.0  # private local optimizers (dpzero, dp-adamw...): noise multiplier per local step
    local_dp_clip: float = 1.0
    lr: float = 1e-3
    eps: float = 1e-3
    batch_size: int = 8
    lora_r: int = 4
    dirichlet_alpha: float = 0.5
    aggregation: str = "fedavg"  # fedavg (FedIT: average A and B) or ffa (FFA-LoRA: A frozen)
    mode: str = "lora"  # lora (send deltas) or zo-seeds (FedKSeed-style: send (seed, scalar) pairs)
    client_dp_clip: float = 0.0  # > 0: clip each client's delta to this L2 norm
    client_dp_noise: float = 0.0  # Gaussian noise multiplier on the clipped sum
    client_dp_delta: float = 1e-5
    eval_max: int = 200
    max_update_norm: float = 1e3  # server: replies whose delta has a larger L2 norm are rejected
    robust: str = "none"  # robust aggregation: none (weighted mean), median (coordinate-wise), clip (to the median norm)
    seed: int = 0
    out_dir: str = "runs/federated"
    # fedavg, fedavgm, fedadam, fedyogi; None: the swept default for the local optimizer (server_opt.server_defaults),
    # which then also sets server_lr and server_average where they are None
    server_optimizer: str | None = None
    server_lr: float | None = None  # None: Flower's default for the server optimizer
    server_momentum: float = 0.9  # fedavgm
    server_average: float | None = None  # EMA decay of the server's model over its iterates (server_opt.py; 0: off)
    round_timeout: float = 600.0  # server: seconds to wait for a round's replies (late clients are dropped)
    node_timeout: float = 300.0  # server: seconds to wait for num_clients SuperNodes to connect before giving up
    dither: float = 0.0  # server: fixed secret dither on the broadcast, in units of the largest level gap (0: off)
    clients_per_round: int = 0  # server: clients sampled to train each round (0: all num_clients)
    attack_coalition: int = 0  # server, measurement only: k > 0 scores what k pooled clients rebuild (attacks.py)
    attack_window: int = 5  # the multi-round attack averages this many of the latest broadcasts

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def client_json(self) -> str:
        """What a client is sent: how to train, never the server's settings (output, evaluation, rounds, its DP)."""
        return json.dumps({k: v for k, v in asdict(self).items() if k not in SERVER_ONLY})

    def resolved(self) -> "FederatedConfig":
        """This config with the server step filled in where it was left unset (None): without --server-optimizer,
        the swept (optimizer, lr, averaging) for the local optimizer; with it, Flower's lr and no averaging."""
        from slimtune.federated.server_opt import server_defaults
        if self.server_optimizer is None:
            name, lr, average = server_defaults(self.local_optimizer, self.mode)
            return replace(self, server_optimizer=name, server_lr=lr if self.server_lr is None else self.server_lr,
                           server_average=average if self.server_average is None else self.server_average)
        return replace(self, server_average=0.0) if self.server_average is None else self

    def validate(self) -> None:
        """One-line errors for combinations that would claim privacy they do not give, or do nothing."""
        if self.client_dp_noise > 0 and not self.client_dp_clip > 0:
            raise SlimtuneError("--client-dp-noise needs --client-dp-clip > 0 (noise is calibrated to the clip; "
                                "without it there is no client-level DP)")
        if self.client_dp_clip > 0 and self.mode == "zo-seeds":
            raise SlimtuneError("client-level DP clips and noises LoRA deltas; --mode zo-seeds replies are (seed, "
                                "scalar) pairs that it does not cover: use --mode lora, or drop --client-dp-*")
        if self.robust not in ("none", "median", "clip"):
            raise SlimtuneError(f"--robust {self.robust!r}: choose none, median or clip")
        if self.robust != "none" and self.client_dp_clip > 0:
            raise SlimtuneError("--robust changes what one client can move the aggregate by, which the client-level DP "
                                "accounting does not cover: use one of --robust or --client-dp-clip")
        from slimtune.federated.server_opt import IterateAverage, ServerOptimizer
        server = self.resolved()
        ServerOptimizer(server.server_optimizer, server.server_lr, server.server_momentum)  # one-line errors
        IterateAverage(server.server_average)
        if not 0 <= self.clients_per_round <= self.num_clients:
            raise SlimtuneError(f"--clients-per-round {self.clients_per_round}: must be in 1..--clients "
                                f"({self.num_clients}), or 0 for all")
        if self.clients_per_round and self.client_dp_clip > 0:
            raise SlimtuneError("client-level DP accounting assumes every client takes part in every round: drop "
                                "--clients-per-round or --client-dp-*")
        if not 0 <= self.attack_coalition <= self.num_clients or self.attack_window < 1:
            raise SlimtuneError(f"--attack-coalition must be in 0..--clients ({self.num_clients}) and --attack-window "
                                f">= 1")
        if self.attack_coalition and self.mode == "zo-seeds":
            raise SlimtuneError("--attack-coalition measures LoRA broadcasts; --mode zo-seeds is not covered")
        if not 0 <= self.dither <= 2 or (self.dither and self.bits == FP32):
            raise SlimtuneError(f"--dither {self.dither:g}: must be in [0, 2] (units of the largest quantization step) "
                                f"and needs a quantized broadcast (--bits 1..8)")
        if not self.round_timeout > 0:
            raise SlimtuneError(f"--round-timeout {self.round_timeout:g}: must be > 0 seconds")
        if self.client_dp_noise < 0 or self.client_dp_clip < 0:
            raise SlimtuneError("--client-dp-clip and --client-dp-noise must be >= 0")

    @classmethod
    def from_json(cls, text: str) -> "FederatedConfig":
        return cls(**json.loads(text))

    @classmethod
    def from_run_config(cls, run_config: dict) -> "FederatedConfig":
        """From `[tool.flwr.app.config]` (keys with dashes) or any mapping."""
        known = {f.name: f.type for f in fields(cls)}
        values = {}
        for key, value in dict(run_config).items():
            name = key.replace("-", "_")
            if name == "num_server_rounds":
                name = "rounds"
            if name in known:
                values[name] = value
        return cls(**values)


def build_model(cfg: FederatedConfig, lora_seed: int | None = None):
    """(model with LoRA, tokenizer, train examples, eval examples, objective): the same base on server and clients.

    `lora_seed` seeds the LoRA initialisation theta_0. The server passes a secret one (OS entropy): clients only ever
    hold Q(theta), so they cannot rebuild theta_0 (with FFA, the frozen A) from the public settings.
    """
    from slimtune.train.objectives import load_model_and_data

    objective = federated_objective(cfg)
    model, tok, train, evals = load_model_and_data(objective, cfg.model, cfg.data, cfg.eval_data or None, cfg.seed)
    if cfg.eval_max and len(evals) > cfg.eval_max:
        evals = evals[:cfg.eval_max]
    torch.manual_seed(cfg.seed if lora_seed is None else lora_seed)
    model = apply_peft(model, PeftSettings("lora", r=cfg.lora_r, alpha=2 * cfg.lora_r))
    for name, p in model.named_parameters():
        if "lora_" in name and not is_trained(name, cfg):
            p.requires_grad_(False)
    return model, tok, train, evals, objective


def federated_objective(cfg: FederatedConfig):
    """The clients' local objective (and the server's evaluation): the same as a centralized run's. Generation
    servers evaluate loss and perplexity of theta and Q(theta) (no decoding: it is the slow part)."""
    from slimtune.train.objectives import GenerationSettings, make_objective
    return make_objective(cfg.task, template=cfg.template, max_length=cfg.max_length,
                          generation=GenerationSettings(cfg.input_column, cfg.target_column, eval_generate=False))


def is_trained(name: str, cfg: FederatedConfig) -> bool:
    """Whether clients train this LoRA entry: all of them (FedIT), or B only under FFA-LoRA, whose A stays frozen at
    its (secret) initialisation."""
    return not (cfg.aggregation == "ffa" and "lora_A" in name)


def uploaded(shapes: dict, cfg: FederatedConfig) -> dict:
    """The entries a client uploads deltas of: the trained ones. A frozen A's delta is all zeros and is never sent,
    which under FFA-LoRA cuts the upload to B's share."""
    return {k: v for k, v in shapes.items() if is_trained(k, cfg)}


def lora_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def lora_state(model) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in lora_names(model)}


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# -- wire format: one ArrayRecord entry per piece ---------------------------------------------------------------
def encode_state(state: dict[str, torch.Tensor], bits: int, block_size: int,
                 dither: dict[str, torch.Tensor] | None = None) -> tuple[dict, int]:
    """Arrays to send for `state` (quantized unless bits == 32; `dither`: a per-entry offset in normalised units
    added before rounding, see quantize) and their byte count."""
    arrays, nbytes = {}, 0
    for name, tensor in state.items():
        if bits == FP32:
            arrays[name] = tensor.detach().float().cpu().numpy()
            nbytes += arrays[name].nbytes
            continue
        q = quantize(tensor, bits, block_size, None if dither is None else dither[name])
        arrays[f"{name}::codes"], arrays[f"{name}::scales"] = q.packed, q.scales
        nbytes += q.nbytes
    return arrays, nbytes


def decode_state(arrays: dict, shapes: dict[str, tuple], bits: int, block_size: int) -> dict[str, torch.Tensor]:
    """Inverse of encode_state; raises ValueError naming the entry when something is missing or mis-shaped."""
    out = {}
    for name, shape in shapes.items():
        if bits == FP32:
            if name not in arrays:
                raise ValueError(f"missing array {name!r}")
            value = torch.as_tensor(arrays[name]).float()
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"array {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
            out[name] = value
            continue
        codes, scales = arrays.get(f"{name}::codes"), arrays.get(f"{name}::scales")
        if codes is None or scales is None:
            raise ValueError(f"missing quantized array for {name!r}")
        n = int(torch.tensor(shape).prod())
        if codes.size * 8 < n * bits or scales.size != -(-n // block_size):
            raise ValueError(f"quantized array {name!r} has the wrong size for shape {tuple(shape)}")
        out[name] = dequantize(QuantizedTensor(codes, scales, tuple(shape), bits, block_size))
    return out
