"""`slimtune federate` settings: the flags of a simulated FedLPP run (the run itself is federated/config.py's
FederatedConfig, which every path — this command, `flwr run .`, the deployment script — checks with check_run)."""

from __future__ import annotations

from dataclasses import dataclass

from slimtune import SlimtuneError
from slimtune.settings.base import Settings, condition, setting, when
from slimtune.settings.train import HYBRID, OPTIMIZERS, PRIVATE, ZEROTH_ORDER

# --robust choices (federated/bounds.aggregate); clip: kept for old configs, the same as none
ROBUST_RULES = ("auto", "none", "median", "direction", "trust", "clip")
MAX_BLOCK_SIZE = 65536  # a quantization block: larger is no use, and a hostile server's 2**40 must not reach a node
MAX_LOCAL_DP_NOISE = 1e4  # a noise multiplier the accountant prices (a node's ledger must stay summable)

generation = when(task=("generation",))
private_clients = when(local_optimizer=PRIVATE)
zo_clients = condition(lambda s: s.local_optimizer in ZEROTH_ORDER + HYBRID or s.mode == "zo-seeds",
                       "zeroth-order clients (--local-optimizer mezo, ... or --mode zo-seeds)",
                       lambda s: f"--local-optimizer {s.local_optimizer}, --mode {s.mode}")
client_dp = condition(lambda s: s.client_dp_clip > 0, "client-level DP (--client-dp-clip > 0)",
                      lambda s: "--client-dp-clip 0")
# the delta is used only by an accountant, which client-level DP has only with noise (server_app builds none for a
# clipped, un-noised aggregate)
client_dp_noised = condition(lambda s: s.client_dp_clip > 0 and s.client_dp_noise > 0,
                             "client-level DP with noise (--client-dp-clip > 0 and --client-dp-noise > 0)",
                             lambda s: f"--client-dp-clip {s.client_dp_clip:g}, "
                                       f"--client-dp-noise {s.client_dp_noise:g}")
# under client-level DP every update is clipped to the fixed --client-dp-clip and weighed 1 / --clients (bounds.py):
# the server's adaptive bound and example weights are not used, so they are refused, not ignored
server_bound = condition(lambda s: not s.client_dp_clip > 0, "the server's adaptive bound (no client-level DP)",
                         lambda s: f"--client-dp-clip {s.client_dp_clip:g}")
quantized = condition(lambda s: s.bits != 32 or s.upload_bits != 32, "quantized broadcasts or uploads (--bits or "
                      "--upload-bits 1..8)", lambda s: "--bits 32 --upload-bits 32")
# the server scores theta on --eval-data: the evaluation settings and the coalition measurement (scored on it) do
# nothing without it (run_server skips them), so they are refused, not ignored
server_eval = condition(lambda s: bool(s.eval_data), "server evaluation (--eval-data)", lambda s: "no --eval-data")
lora_uploads = when(mode=("lora",))  # zo-seeds clients upload (seed, scalar) pairs, never a quantized delta


CONFIG_NAMES = {"num_clients": "clients", "dirichlet_alpha": "alpha", "out_dir": "out"}  # FederatedConfig -> setting


def check_config_values(cfg, origin: str | None = None) -> None:
    """Every FederatedConfig value through the settings' rules (exact types, choices, ranges, and where each applies):
    the one validation of `slimtune federate`, `flwr run .` (run config and server settings file) and the deployment
    script. A config does not record which keys were given, so every setting it sets to something other than left
    unset (FederatedConfig.changed: its default, or what resolved() fills in) must apply to the run, by the same
    `applies` conditions (Settings.check_applicable) that refuse a `slimtune federate` flag."""
    from dataclasses import fields as dc_fields
    values = {CONFIG_NAMES.get(f.name, f.name): getattr(cfg, f.name) for f in dc_fields(cfg)}
    values["eval_data"] = values["eval_data"] or None
    values["root_data"] = values["root_data"] or None
    if values.get("data") == "":
        values["data"] = None
    checked = FederateSettings.check_values(values, origin)
    settings = FederateSettings(**checked)
    settings._given = {CONFIG_NAMES.get(name, name) for name in cfg.changed()}
    settings._origin = dict.fromkeys(settings._given, origin) if origin else {}
    settings.check_applicable()
    from slimtune.settings.train import MIN_NOISE_MULTIPLIER
    for name in ("client_dp_noise", "local_dp_noise"):  # the accountant's one floor (privacy/accountant.check_noise)
        value = getattr(settings, name)
        if value and value < MIN_NOISE_MULTIPLIER:
            raise SlimtuneError(f"{settings.where(name)} {value:g}: below {MIN_NOISE_MULTIPLIER:g}, the least noise the "
                                "privacy accountant prices (so little noise leaves nothing private to account)")
    if cfg.bits not in (*range(1, 9), 32) or cfg.upload_bits not in (*range(1, 9), 32):
        raise SlimtuneError(f"--bits {cfg.bits} / --upload-bits {cfg.upload_bits}: each must be 1..8 or 32")


# --server-lr-scheduler: transformers' schedules without a warm-up (the server has none: constant_with_warmup would be
# constant, and one cosine cycle is cosine)
SERVER_LR_SCHEDULES = ("constant", "linear", "cosine", "polynomial", "inverse_sqrt")


@dataclass
class FederateSettings(Settings):
    command = "federate"
    ALIASES = {"num_clients": "clients", "dirichlet_alpha": "alpha", "out_dir": "out"}  # FederatedConfig names

    data: str | None = setting(None, "training data, split across clients (required, here or in --config)")
    eval_data: str | None = setting(None, "server-side evaluation data")
    out: str = setting("runs/federated", "run directory (new or empty)")
    model: str = setting("smollm2", "the base model")
    task: str = setting("sst2", "sst2, rte or generation (clients train on the completion loss; the server reports "
                        "the loss of theta and Q(theta))", choices=("sst2", "rte", "generation"))
    input_column: str | None = setting(None, "generation, tables: prompt column", applies=generation)
    target_column: str | None = setting(None, "generation, tables: completion column", applies=generation)
    template: str | None = setting(None, "prompt template (\\n: a newline): sst2/rte: another prompt over their "
                                   "columns; generation: over the input column (sent to every client with the task's "
                                   "label words)", escapes=True)
    label_words: str | None = setting(None, "sst2/rte: label words instead of the task's own, e.g. '0=bad,1=good'",
                                      applies=when(task=("sst2", "rte")))
    max_length: int = setting(256, "tokens per example (prompt + completion)", low=8)
    clients: int = setting(4, "simulated clients (SuperNodes)", low=1)
    rounds: int = setting(5, "server rounds", low=1)
    bits: int = setting(4, "broadcast precision: 1..8 bits (NF levels), or 32 for no quantization", low=1, high=32)
    block_size: int = setting(64, "quantization block size (16..65536: each block's scale is sent with its codes)",
                              low=16, high=MAX_BLOCK_SIZE,
                              applies=quantized)
    upload_bits: int = setting(32, "quantize client deltas too (32: fp32 uploads)", low=1, high=32,
                               applies=lora_uploads)
    local_steps: int = setting(3, "local steps per round (3: benchmarks/federated_sweep.py)", low=1)
    local_optimizer: str = setting("adamw", "any slimtune optimizer", choices=OPTIMIZERS)
    local_dp_noise: float = setting(1.0, "private local optimizers: noise multiplier per local step", low=0,
                                    low_open=True, high=MAX_LOCAL_DP_NOISE, applies=private_clients)
    local_dp_clip: float = setting(1.0, "private local optimizers: clipping threshold", low=0, low_open=True,
                                   applies=private_clients)
    local_dp_delta: float = setting(1e-5, "private local optimizers: the delta of the clients' local epsilon (in a "
                                    "simulation, with --local-dp-min-examples: its clients report none of their own)",
                                    low=0, high=1, low_open=True, high_open=True, applies=private_clients)
    local_dp_min_examples: int | None = setting(None, "private local optimizers: a public lower bound on each "
                                                "client's training rows; each client then samples at a rate of at "
                                                "most batch-size / this, and the server reports the clients' local "
                                                "epsilon from public settings alone (without it each client prints "
                                                "its own on its node; nothing about it is sent)", low=1,
                                                applies=private_clients)
    lr: float | None = setting(None, "clients' learning rate (default 1e-3; ZO clients on a model with its own "
                               "swept ZO lr take the same ratio, e.g. 3e-4 on gemma3-270m)", low=0, low_open=True)
    eps: float = setting(1e-3, "ZO clients' perturbation scale", low=0, low_open=True, applies=zo_clients)
    batch_size: int = setting(8, "clients' batch size", low=1)
    lora_r: int = setting(8, "LoRA rank", low=1)
    alpha: float = setting(0.5, "Dirichlet concentration over labels (small: non-IID)", low=0, low_open=True)
    aggregation: str = setting("fedavg", "fedavg (FedIT) or ffa (FFA-LoRA, A frozen)", choices=("fedavg", "ffa"))
    server_optimizer: str | None = setting(None, "server step on the aggregated update: fedavg, fedavgm, fedadam, "
                                           "fedyogi (Flower's semantics); default: for AdamW clients fedavgm (momentum "
                                           "0.5, lr 1), else fedavg",
                                           choices=("fedavg", "fedavgm", "fedadam", "fedyogi"))
    server_lr: float | None = setting(None, "server learning rate (default: the swept one without --server-optimizer; "
                                      "else Flower's)", low=0, low_open=True)
    server_momentum: float | None = setting(None, "fedavgm: server momentum (default 0.9; the default server step "
                                            "for AdamW clients uses 0.5)", low=0, high=1, high_open=True,
                                     applies=when(server_optimizer=("fedavgm",)))
    server_average: float | None = setting(None, "the server keeps an EMA of its iterates with this decay as its "
                                           "model (0: off)", low=0, high=1, high_open=True)
    server_lr_scheduler: str = setting("cosine", "the server lr over the rounds (transformers' schedule names): "
                                       "cosine takes small steps late, where a hostile push that got past the "
                                       "aggregation would otherwise undo what was learnt",
                                       choices=SERVER_LR_SCHEDULES)
    mode: str = setting("lora", "lora (deltas) or zo-seeds (FedKSeed-style seed/scalar pairs)",
                        choices=("lora", "zo-seeds"))
    client_dp_clip: float = setting(0.0, "client-level DP: L2 clip of each delta (0: off)", low=0)
    client_dp_noise: float = setting(0.0, "client-level DP: noise multiplier", low=0, applies=client_dp)
    client_dp_delta: float = setting(1e-5, "client-level DP: delta (with --client-dp-noise > 0)", low=0, high=1,
                                     low_open=True, high_open=True, applies=client_dp_noised)
    eval_max: int = setting(200, "server evaluation: at most this many examples (0: all)", low=0,
                            applies=server_eval)
    eval_every: int = setting(1, "server evaluation at round 0, every this many rounds, and in each of the last 5",
                              low=1, applies=server_eval)
    norm_bound: float = setting(1.0, "server: every update is clipped to this multiple of the median update norm of "
                                "the round's (and the last rounds') replies", low=0, low_open=True,
                                applies=server_bound)
    max_update_norm: float = setting(0.0, "server: also reject replies above this fixed L2 norm (0: no fixed cap; "
                                     "the adaptive bound applies either way)", low=0)
    weighting: str = setting("equal", "server: equal weights, or examples (claimed counts, each capped at the round's "
                             "median claim)", choices=("equal", "examples"), applies=server_bound)
    robust: str = setting("auto", "aggregation of the bounded updates: auto (trust with --root-data; else direction "
                          "for LoRA replies, the mean for zo-seeds and client-level DP), none (mean), median "
                          "(coordinate-wise), direction (the mean of the replies that agree with the round's median; a "
                          "reply pushing against it gets no weight) or trust (FLTrust: each reply rescaled to the "
                          "server's own update on --root-data and weighted by its positive cosine with it, never more "
                          "than in the mean; needs first-order clients)", choices=ROBUST_RULES)
    root_data: str | None = setting(None, "--robust trust: the server's own labelled examples of the task (e.g. 100; "
                                    "never the evaluation data), on which it computes the reference update each "
                                    "round (with it, --robust auto is trust); never sent to clients",
                                    applies=when(robust=("trust", "auto")))
    dither: float = setting(0.0, "fixed secret dither on the broadcast, in units of the largest quantization step "
                            "(0: off)", low=0, high=2)
    clients_per_round: int = setting(0, "clients sampled to train each round (0: all)", low=0)
    attack_coalition: int = setting(0, "measurement: score what k colluding clients rebuild of theta on the "
                                    "evaluation data (0: off)", low=0, applies=server_eval)
    attack_window: int = setting(5, "broadcasts the multi-round attack averages", low=1,
                                 applies=condition(lambda s: s.attack_coalition > 0, "--attack-coalition > 0",
                                                   lambda s: "--attack-coalition 0"))
    round_timeout: float = setting(3600.0, "seconds the server waits for a round's replies (simulated clients share "
                                   "this machine's CPUs)", low=0, low_open=True)
    seed: int = setting(0, "public seed (data partition, clients' local sampling)", low=0, high=2**63 - 1)
    node_timeout: float = setting(300.0, "deployment: seconds to wait for the SuperNodes to connect", low=0,
                                  low_open=True, cli=False)
    allowed_nodes: str | None = setting(None, "deployment: the Flower node ids (comma-separated) whose keys the run "
                                        "registered; the server trains with no other node", cli=False)

    def check(self) -> None:
        from slimtune.settings.rules import require_input_file
        if self.allowed_nodes is not None:
            raise SlimtuneError("allowed_nodes: the deployment script sets it for its server (the nodes whose keys it "
                                "registered); a simulation has no registered nodes")
        if not self.data:
            raise SlimtuneError("--data is required (on the command line or in --config)")
        require_input_file(self.data, "--data")
        if self.eval_data:
            require_input_file(self.eval_data, "--eval-data")
        if self.root_data:
            require_input_file(self.root_data, "--root-data")
        if self.given("local_dp_delta") and self.local_dp_min_examples is None:
            # a simulation's clients compute nothing at the delta: only the server's public bound does (a deployment
            # node's ledger uses its own, which `flwr run` may pin; that path is not this command's)
            raise SlimtuneError(f"{self.where('local_dp_delta')}: a simulation's clients report no epsilon of their "
                                "own; the delta is used by the server's public bound only: give "
                                "--local-dp-min-examples too, or leave --local-dp-delta out")
        self.to_config().validate()

    def to_config(self):
        """The FederatedConfig of these settings: every config field from its setting (CONFIG_NAMES renames)."""
        from dataclasses import fields as dc_fields

        from slimtune.federated import FederatedConfig
        values = {f.name: getattr(self, CONFIG_NAMES.get(f.name, f.name)) for f in dc_fields(FederatedConfig)}
        values["eval_data"] = values["eval_data"] or ""  # the config's "no eval data"
        values["root_data"] = values["root_data"] or ""
        return FederatedConfig(**values)
