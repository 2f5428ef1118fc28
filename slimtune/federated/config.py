"""The run's settings (FederatedConfig): what each one means, which ones clients are sent, and the checks that refuse
a combination before any work starts."""

from __future__ import annotations

import json
import logging
import os
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from slimtune import SlimtuneError
from slimtune.federated.wire import FP32
from slimtune.settings.federate import ROBUST_RULES as ROBUST  # --robust choices (bounds.aggregate)


def robust_rule(robust: str, mode: str, client_dp: bool, root_data: bool = False) -> str:
    """The aggregation a --robust setting gives: auto (the default) is `trust` when the server has root data
    (--root-data: a reference no client can move), else `direction` for LoRA replies and the mean ("none") for
    zo-seeds replies (nearly orthogonal random directions: the filter would drop honest ones at random, and cannot
    tell a flipped one) and under client-level DP (whose accounting is for the uniform mean); clip is the mean (kept
    for old configs). Where trust cannot work (zeroth-order clients, client-level DP) the config refuses it rather
    than fall back: root data given is never silently unused."""
    if robust == "auto":
        if root_data:
            return "trust"
        return "none" if mode == "zo-seeds" or client_dp else "direction"
    return "none" if robust == "clip" else robust

log = logging.getLogger("slimtune.federated")
CLIENT_LR = 1e-3  # the clients' lr when none is given (before a model's own correction)
SETTINGS_ENV = "SLIMTUNE_SERVER_SETTINGS"  # path of the server's settings file (TOML or JSON)
SETTINGS_FILE = "slimtune-server.toml"  # its default place: $FLWR_HOME (the SuperLink's, default ~/.flwr)

# Settings only the server reads: never sent to clients.
SERVER_ONLY = ("out_dir", "eval_data", "root_data", "eval_max", "eval_every", "rounds", "client_dp_clip",
               "client_dp_noise", "client_dp_delta", "max_update_norm", "round_timeout", "node_timeout",
               "server_optimizer", "server_lr", "server_momentum", "robust", "clients_per_round", "attack_coalition",
               "attack_window", "dither", "server_average", "weighting", "norm_bound", "server_lr_scheduler",
               "allowed_nodes")


# the settings FederatedConfig.resolved() fills in where they are None
RESOLVED = ("template", "label_words", "lr", "server_optimizer", "server_lr", "server_average", "server_momentum")


@dataclass
class FederatedConfig:
    data: str = ""
    eval_data: str = ""
    model: str = "tiny-llama"
    task: str = "sst2"  # a classification task, or "generation" (prompt -> completion; see train/objectives.py)
    input_column: str | None = None  # generation tables: prompt / completion columns, template
    target_column: str | None = None
    template: str | None = None  # classification: filled with the task's own by resolved(), so clients use the server's
    label_words: str | None = None
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
    local_dp_delta: float = 1e-5  # the delta of the clients' local epsilon
    # a public lower bound M on each private client's rows: clients sample at rate <= batch_size / M, and the server
    # reports their local epsilon from (M, batch_size, noise, steps) alone (federated/local_privacy.py)
    local_dp_min_examples: int | None = None
    lr: float | None = None  # clients' lr; None: CLIENT_LR, scaled for a model with its own ZO lr (resolved())
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
    eval_every: int = 1  # server: evaluate at round 0, every this many rounds, and in each of the last 5 rounds
    max_update_norm: float = 0.0  # server: replies whose delta has a larger L2 norm are rejected (0: no fixed cap;
    # the adaptive bound below applies either way)
    norm_bound: float = 1.0  # server: every update is clipped to this multiple of the median update norm of the
    # round's (and the last rounds') replies (bounds.py); zo-seeds scalars likewise per seed
    weighting: str = "equal"  # server: equal (every accepted reply the same weight) or examples (claimed example
    # counts, each capped at the round's median claim); a claim never buys more than that
    robust: str = "auto"  # aggregation of the bounded updates: none (weighted mean), median (coordinate-wise),
    # direction (the replies agreeing with the round's median; bounds.py), trust (FLTrust against the server's own
    # update on root_data), auto (trust with root_data, else direction for LoRA replies, the mean for zo-seeds and
    # client-level DP: robust_rule); clip: kept for old configs, the same as none
    root_data: str = ""  # --robust trust: the server's own labelled examples (root_reference.py); never sent
    seed: int = 0
    out_dir: str = "runs/federated"
    # fedavg, fedavgm, fedadam, fedyogi; None: the swept default for the local optimizer (server_opt.server_defaults),
    # which then also sets server_lr and server_average where they are None
    server_optimizer: str | None = None
    server_lr: float | None = None  # None: Flower's default for the server optimizer
    server_momentum: float | None = None  # fedavgm; None: the default step's, or 0.9 (server_opt.FEDAVGM_MOMENTUM)
    server_average: float | None = None  # EMA decay of the server's model over its iterates (server_opt.py; 0: off)
    # the server lr over the rounds, a transformers.get_scheduler name (optim/schedule.py): round t steps with
    # server_lr * multiplier(t - 1) over `rounds`. cosine: late rounds take small steps, so a push that gets past the
    # aggregation late in training cannot undo what was learnt (server_opt.py)
    server_lr_scheduler: str = "cosine"
    round_timeout: float = 600.0  # server: seconds to wait for a round's replies (late clients are dropped)
    node_timeout: float = 300.0  # server: seconds to wait for num_clients SuperNodes to connect before giving up
    # deployment: the node ids whose keys the run registered ("12,34"); the server samples no other node (anyone who
    # reaches the SuperLink's Control API can register a key in open-source Flower). None: every connected node
    allowed_nodes: str | None = None
    dither: float = 0.0  # server: fixed secret dither on the broadcast, in units of the largest level gap (0: off)
    clients_per_round: int = 0  # server: clients sampled to train each round (0: all num_clients)
    attack_coalition: int = 0  # server, measurement only: k > 0 scores what k pooled clients rebuild (attacks.py)
    attack_window: int = 5  # the multi-round attack averages this many of the latest broadcasts

    @property
    def aggregation_rule(self) -> str:
        """The server's aggregation of this run (robust_rule of --robust, the mode, client-level DP, --root-data)."""
        return robust_rule(self.robust, self.mode, self.client_dp_clip > 0, bool(self.root_data))

    @property
    def client_level_dp(self) -> bool:
        """Client-level DP with noise: the server releases only the noised, accounted aggregate of the updates."""
        return self.client_dp_clip > 0 and self.client_dp_noise > 0

    def evaluates(self, server_round: int) -> bool:
        """Whether the server scores round `server_round`: round 0, every eval_every-th, and the last five (whose mean
        the reports show)."""
        return server_round % self.eval_every == 0 or server_round > self.rounds - 5

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def client_json(self) -> str:
        """What a client is sent: how to train, never the server's settings (output, evaluation, rounds, its DP)."""
        return json.dumps({k: v for k, v in asdict(self).items() if k not in SERVER_ONLY})

    def resolved(self) -> "FederatedConfig":
        """This config with the clients' lr and the server step filled in where they were left unset (None): the lr
        is CLIENT_LR times the model's own ZO correction (optim/defaults.py, e.g. 0.3 for gemma3-270m's ZO clients);
        without --server-optimizer, the swept (optimizer, lr, averaging) for the local optimizer; with it, Flower's lr
        and no averaging."""
        from slimtune.federated.server_opt import FEDAVGM_MOMENTUM, server_defaults
        from slimtune.data.tasks import with_builtin_prompt
        prompt = with_builtin_prompt(self.task, self.template, self.label_words)  # sent to every client (their
        if prompt != (self.template, self.label_words):  # slimtune's defaults may differ from the server's)
            return replace(self, template=prompt[0], label_words=prompt[1]).resolved()
        if self.lr is None:
            from slimtune.models.loading import builtin_architecture
            from slimtune.optim.defaults import model_lr_scale
            trained_by = "mezo" if self.mode == "zo-seeds" else self.local_optimizer  # zo-seeds clients run MeZO
            scale = model_lr_scale(trained_by, builtin_architecture(self.model))
            return replace(self, lr=float(f"{CLIENT_LR * scale:.3g}")).resolved()
        if self.server_optimizer is None:
            name, lr, average, momentum = server_defaults(self.local_optimizer, self.mode)
            return replace(self, server_optimizer=name, server_lr=lr if self.server_lr is None else self.server_lr,
                           server_average=average if self.server_average is None else self.server_average,
                           server_momentum=momentum if self.server_momentum is None else self.server_momentum)
        return replace(self, server_average=0.0 if self.server_average is None else self.server_average,
                       server_momentum=FEDAVGM_MOMENTUM if self.server_momentum is None else self.server_momentum)

    def changed(self) -> set[str]:
        """The settings this config sets to something other than what they are when left unset: the field's default,
        or, for one resolved() fills in (the clients' lr, the server step, the prompt), what it fills in for this
        run. A config (run config, server settings file, a client's received one) does not say which keys were given;
        these are the ones that must apply to the run (check_config_values)."""
        out = set()
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if f.name in RESOLVED and f.default is None and value == getattr(replace(self, **{f.name: None}).resolved(),
                                                                             f.name):
                continue
            out.add(f.name)
        return out

    def validate(self) -> None:
        """One-line errors for values out of range and for combinations that would claim privacy they do not give,
        or do nothing. Every path runs it (check_run) before any work."""
        from slimtune.optim import OPTIMIZERS
        from slimtune.settings.federate import check_config_values
        check_config_values(self)  # types, choices and ranges: the rules of `slimtune federate`
        from slimtune.settings.rules import check_task_text
        check_task_text(self)  # a classification task's own prompt, a generation template's column
        if self.aggregation not in ("fedavg", "ffa"):
            raise SlimtuneError(f"--aggregation {self.aggregation!r}: choose fedavg or ffa")
        if self.mode not in ("lora", "zo-seeds"):
            raise SlimtuneError(f"--mode {self.mode!r}: choose lora or zo-seeds")
        if self.local_optimizer not in OPTIMIZERS:
            raise SlimtuneError(f"--local-optimizer {self.local_optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        from slimtune.settings.rules import is_whole
        for flag, value in (("--clients", self.num_clients), ("--rounds", self.rounds),
                            ("--eval-every", self.eval_every), ("--local-steps", self.local_steps),
                            ("--batch-size", self.batch_size), ("--lora-r", self.lora_r),
                            ("--block-size", self.block_size)):
            if not is_whole(value):
                raise SlimtuneError(f"{flag} {value!r}: must be a whole number >= 1")
        from slimtune.settings.federate import MAX_BLOCK_SIZE, MAX_LOCAL_DP_NOISE
        if self.block_size > MAX_BLOCK_SIZE:
            raise SlimtuneError(f"--block-size {self.block_size}: at most {MAX_BLOCK_SIZE}")
        if isinstance(self.local_dp_noise, (int, float)) and self.local_dp_noise > MAX_LOCAL_DP_NOISE:
            raise SlimtuneError(f"--local-dp-noise {self.local_dp_noise:g}: at most {MAX_LOCAL_DP_NOISE:g} (a larger "
                                "noise multiplier cannot be accounted)")
        if self.allowed_nodes is not None:
            ids = [part.strip() for part in self.allowed_nodes.split(",")]
            if not all(part.isascii() and part.isdigit() for part in ids):  # str.isdigit alone takes '²', int() not
                raise SlimtuneError(f"allowed_nodes {self.allowed_nodes!r}: Flower node ids (digits 0-9) separated by "
                                    "commas (the deployment script writes them)")
            if len({int(part) for part in ids}) < self.num_clients:  # the server would wait node_timeout for nothing
                raise SlimtuneError(f"allowed_nodes {self.allowed_nodes!r}: {len({int(p) for p in ids})} distinct "
                                    f"node id(s) for num-clients {self.num_clients}; the server samples only these "
                                    "nodes, so no round could start: list every node the run registered")
        if self.client_dp_noise > 0 and not self.client_dp_clip > 0:
            raise SlimtuneError("--client-dp-noise needs --client-dp-clip > 0 (noise is calibrated to the clip; "
                                "without it there is no client-level DP)")
        if self.client_dp_clip > 0 and is_whole(self.num_clients) and self.client_dp_delta >= 1 / self.num_clients:
            raise SlimtuneError(f"--client-dp-delta {self.client_dp_delta:g} >= 1/clients = {1 / self.num_clients:.3g}:"
                                " such a delta allows leaking a whole client; choose a delta below 1/clients (as "
                                "train's --delta < 1/N)")
        from slimtune.optim import PRIVATE_OPTIMIZERS
        if self.mode == "zo-seeds" and self.local_optimizer not in ("mezo", "adamw"):  # adamw: the default, unused
            raise SlimtuneError(f"--mode zo-seeds clients run MeZO and release (seed, scalar) pairs: --local-optimizer "
                                f"{self.local_optimizer} would not be used (no local DP there); use --mode lora, or "
                                f"drop --local-optimizer")
        from slimtune.federated.local_privacy import is_private
        if is_private(self) and isinstance(self.local_dp_min_examples, int) and self.local_dp_min_examples >= 1 \
                and self.local_dp_delta >= 1 / self.local_dp_min_examples:  # the public bound's delta, as a node's own
            raise SlimtuneError(f"--local-dp-delta {self.local_dp_delta:g} >= 1/--local-dp-min-examples = "
                                f"{1 / self.local_dp_min_examples:.3g}: such a delta allows leaking a whole example of "
                                "the smallest client, and the server's public epsilon bound would understate; choose a "
                                "smaller delta")
        if self.local_dp_min_examples is not None and not is_private(self):
            raise SlimtuneError(f"--local-dp-min-examples caps the sampling rate of private local optimizers "
                                f"({', '.join(PRIVATE_OPTIMIZERS)}; --mode lora); these clients (--local-optimizer "
                                f"{self.local_optimizer}, --mode {self.mode}) would ignore it: drop it")
        if self.weighting == "examples" and self.local_optimizer in PRIVATE_OPTIMIZERS:
            raise SlimtuneError(f"--weighting examples needs clients' example counts, which private local optimizers "
                                f"({self.local_optimizer}) do not send: use --weighting equal")
        if self.client_dp_clip > 0 and self.mode == "zo-seeds":
            raise SlimtuneError("client-level DP clips and noises LoRA deltas; --mode zo-seeds replies are (seed, "
                                "scalar) pairs that it does not cover: use --mode lora, or drop --client-dp-*")
        if self.robust not in ROBUST:
            raise SlimtuneError(f"--robust {self.robust!r}: choose auto, none, median, direction or trust (clip: "
                                "the same as none)")
        self._check_trust()
        if self.weighting not in ("equal", "examples"):
            raise SlimtuneError(f"--weighting {self.weighting!r}: choose equal or examples")
        if not self.norm_bound > 0 or self.max_update_norm < 0:
            raise SlimtuneError(f"--norm-bound {self.norm_bound:g} must be > 0 (a multiple of the round's median update "
                                f"norm) and --max-update-norm >= 0 (0: no fixed cap)")
        if self.client_dp_clip > 0 and (self.weighting != "equal" or self.norm_bound != 1.0):
            given = (f"--weighting {self.weighting}" if self.weighting != "equal"
                     else f"--norm-bound {self.norm_bound:g}")
            raise SlimtuneError(f"{given} applies only to the server's adaptive bound: under client-level DP every "
                                "update is clipped to --client-dp-clip and weighed 1 / --clients: drop it")
        if self.max_update_norm > 0 and self.client_dp_clip > 0:
            raise SlimtuneError("--max-update-norm drops replies by their norm, so whether a client is counted would "
                                "depend on its data, outside the client-level DP accounting; --client-dp-clip already "
                                "bounds every update: drop --max-update-norm")
        if self.aggregation_rule in ("median", "direction", "trust") and self.client_dp_clip > 0:
            given = f"--robust {self.robust}" + (" with --root-data" if self.root_data else "")
            raise SlimtuneError(f"{given} changes what one client can move the aggregate by, which the client-level "
                                f"DP accounting does not cover: use one of --robust (or --root-data) or "
                                f"--client-dp-clip")
        from slimtune.federated.server_opt import IterateAverage, ServerOptimizer
        server = self.resolved()
        ServerOptimizer(server.server_optimizer, server.server_lr, server.server_momentum)  # one-line errors
        from slimtune.settings.federate import SERVER_LR_SCHEDULES
        if self.server_lr_scheduler not in SERVER_LR_SCHEDULES:
            raise SlimtuneError(f"--server-lr-scheduler {self.server_lr_scheduler!r}: choose one of "
                                f"{', '.join(SERVER_LR_SCHEDULES)}")
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
        from slimtune.federated.local_privacy import private_clients
        if self.attack_coalition and private_clients(self):  # summary.json: un-noised functions of the pooled rows
            raise SlimtuneError(f"--attack-coalition {self.attack_coalition} fine-tunes without DP on the pooled rows "
                                "of its clients and writes the score and row count to summary.json, which no DP "
                                "accounting covers: it is refused in a private run (local or client-level DP); "
                                "drop it, or measure on a run without DP")
        if self.attack_coalition and not self.eval_data:  # run_server scores the attacks on the evaluation data
            raise SlimtuneError(f"--attack-coalition {self.attack_coalition} scores what the coalition rebuilds on the "
                                "evaluation data: it needs --eval-data (without it nothing would be measured)")
        if self.mode == "zo-seeds" and self.upload_bits != FP32:
            raise SlimtuneError(f"--upload-bits {self.upload_bits} quantizes LoRA deltas; --mode zo-seeds clients "
                                "upload (seed, scalar) pairs, which it does not apply to: drop --upload-bits, or use "
                                "--mode lora")
        if not 0 <= self.dither <= 2 or (self.dither and self.bits == FP32):
            raise SlimtuneError(f"--dither {self.dither:g}: must be in [0, 2] (units of the largest quantization step) "
                                f"and needs a quantized broadcast (--bits 1..8)")
        if not self.round_timeout > 0:
            raise SlimtuneError(f"--round-timeout {self.round_timeout:g}: must be > 0 seconds")
        if self.client_dp_noise < 0 or self.client_dp_clip < 0:
            raise SlimtuneError("--client-dp-clip and --client-dp-noise must be >= 0")

    def _check_trust(self) -> None:
        """--robust trust and --root-data come together; the rule needs replies that carry the task's direction."""
        from slimtune.optim.methods import METHODS
        if self.aggregation_rule != "trust":
            if self.root_data:
                raise SlimtuneError(f"--root-data applies only to --robust trust or auto (now --robust "
                                    f"{self.robust}): drop it, or use --robust trust")
            return
        if not self.root_data:
            raise SlimtuneError("--robust trust needs --root-data: the server's own labelled examples of the task, on "
                                "which it computes the update each reply is compared with")
        root = Path(self.root_data).resolve()
        for flag, path, why in (("--data", self.data, "the clients' data: the server would train without noise on "
                                 "their examples, and hostile clients would know its reference"),
                                ("--eval-data", self.eval_data, "the evaluation data: the server would train on what "
                                 "it reports accuracy on")):
            if flag == "--eval-data" and self.root_data.startswith("hf:"):
                continue  # one saved DatasetDict: root rows from its train split, evaluation from its validation
                # split (rows they share are refused by check_inputs)
            if path and root == Path(path).resolve():
                raise SlimtuneError(f"--root-data {self.root_data} is {flag}, {why}; give it examples of its own")
        if self.mode == "zo-seeds" or METHODS[self.local_optimizer].kind != "first-order":
            raise SlimtuneError(f"--robust trust compares each reply with the server's own update; replies of "
                                f"zeroth-order or hybrid clients (--mode {self.mode}, --local-optimizer "
                                f"{self.local_optimizer}) are near-random directions (cosine ~0.01 with any "
                                f"reference), so trust cannot tell a flipped one: use first-order clients (adamw, sgd, "
                                f"dp-adamw, dp-sgd) or another --robust")

    @classmethod
    def from_json(cls, text: str) -> "FederatedConfig":
        return cls(**json.loads(text))

    @classmethod
    def from_server(cls, text: str) -> "FederatedConfig":
        """A client's settings from what its server sent: client_json() never holds the server's own settings, so
        one set to anything but its default is refused (a hostile server could otherwise name a file on the node as
        eval_data or root_data, which the node would read); the rest as from_json."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise SlimtuneError("the server's settings are not a JSON object (round refused)")
        defaults = cls()
        sent = sorted(k for k in SERVER_ONLY if k in values and values[k] != getattr(defaults, k))
        if sent:
            raise SlimtuneError(f"the server sent its own setting(s) {', '.join(sent)} to this client: server-only "
                                "settings are never a client's (round refused)")
        return cls(**{k: v for k, v in values.items() if k not in SERVER_ONLY})

    @classmethod
    def from_flower(cls, run_config: dict, settings: Path | None) -> "FederatedConfig":
        """The ServerApp's settings under `flwr run`: the training settings from the run config
        ([tool.flwr.app.config] fused with --run-config), the server's own from its settings file.

        Flower hands every ClientApp the same run config (Context.run_config), so a server setting found there is
        refused instead of used. The settings file lives on the server only (settings_path()); for a key it sets, it
        wins over the run config (logged when they differ)."""
        values, keys = {}, {}
        for key, value in dict(run_config).items():
            name = _field_name(key)
            _one_key(keys, name, key, "the run config ([tool.flwr.app.config] and --run-config)")
            if name in SERVER_ONLY:
                raise SlimtuneError(f"run config key {key!r} is a server setting: every ClientApp receives the run "
                                    f"config, so it belongs in the server's settings file ({SETTINGS_ENV} or "
                                    f"$FLWR_HOME/{SETTINGS_FILE}), not in [tool.flwr.app.config] or --run-config")
            if name not in _FIELDS:
                raise SlimtuneError(f"run config key {key!r}: not a slimtune federated setting")
            values[name] = value
        if settings is not None:
            check_not_writable_by_others(Path(settings))
            for name, value in read_settings(settings).items():
                if name in values and values[name] != value:
                    log.warning("%s sets %s = %r over the run config's %r", settings, name, value, values[name])
                values[name] = value
        return cls(**values)


_FIELDS = {f.name: f for f in fields(FederatedConfig)}
CLIENT_SETTINGS = tuple(name for name in _FIELDS if name not in SERVER_ONLY)  # what each client is sent


def _field_name(key: str) -> str:
    name = key.replace("-", "_")
    return "rounds" if name == "num_server_rounds" else name


def _one_key(keys: dict, name: str, key: str, where: str) -> None:
    """Record that setting `name` came from `key` in `keys` ({setting: key}); one line when another key (another
    spelling: rounds and num-server-rounds, out-dir and out_dir) already set it: which one wins would be silent."""
    if name in keys:
        raise SlimtuneError(f"{where}: keys {keys[name]!r} and {key!r} both set the setting {name!r}; keep one")
    keys[name] = key


def settings_path() -> Path | None:
    """The server's settings file: $SLIMTUNE_SERVER_SETTINGS, else $FLWR_HOME/slimtune-server.toml if present."""
    if os.environ.get(SETTINGS_ENV):
        return Path(os.environ[SETTINGS_ENV])
    from flwr.supercore.utils import get_flwr_home
    default = get_flwr_home() / SETTINGS_FILE
    if os.path.lexists(default) and not default.is_file():  # a broken link or a directory: never "no settings"
        raise SlimtuneError(f"{default}: the server's settings file is not a file (a broken link or a directory); "
                            "the server would run without its allowed-nodes and privacy settings")
    return default if default.is_file() else None


def check_not_writable_by_others(path: Path) -> None:
    """The server's settings file decides who joins the federation (allowed-nodes), its privacy (client-level DP) and
    its bounds: one that every user may change would let any of them admit a node or turn the privacy off for the
    next run. Refused in one line, as key files readable by others are: a file every user may write, one in a
    directory every user may write (without the sticky bit: anyone may replace it there), and a symbolic link in
    such a directory (anyone may point it elsewhere), the link's target judged the same way. (Group-writable is a
    umask 002 system's default, its group the user's own: not refused.)"""
    import stat

    def shared(directory: Path) -> bool:
        try:
            mode = directory.stat().st_mode
        except OSError:
            return False
        return bool(mode & stat.S_IWOTH) and not mode & stat.S_ISVTX

    def refuse(why: str) -> SlimtuneError:
        return SlimtuneError(f"{path}: {why}; it decides who joins the federation and its privacy: keep it where "
                             "only you can change it")
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # read_settings names a missing file
    if mode & stat.S_IWOTH:
        raise refuse(f"writable by every user (mode {oct(stat.S_IMODE(mode))}; `chmod o-w {path}`)")
    chains = (Path(os.path.abspath(path)).parents, path.resolve().parents)  # as written (links: anyone in a shared
    # directory may re-point them) and as resolved; any directory above it that every user may write lets anyone
    # move the one below aside and put their own in its place
    for directory in dict.fromkeys(d for chain in chains for d in chain):
        if shared(directory):
            raise refuse(f"below {directory}, a directory every user may write (anyone may replace what is under it)")


def read_settings(path: Path) -> dict:
    """A TOML or JSON file of FederatedConfig settings (flag-style keys with dashes, or field names); one-line
    errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"{path}: no such server settings file")
    from slimtune.data.readers import read_text

    is_json = path.suffix.lower() == ".json"
    text = read_text(path)  # UTF-8, a byte order mark allowed: as every file a user edits (--config, data)
    try:
        raw = json.loads(text) if is_json else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SlimtuneError(f"{path}: not valid {'JSON' if is_json else 'TOML'} ({exc})") from None
    if not isinstance(raw, dict):
        raise SlimtuneError(f"{path}: expected a mapping of settings (key = value), got {type(raw).__name__}")
    values, keys = {}, {}
    for key, value in raw.items():
        name = _field_name(key)
        if name not in _FIELDS:
            raise SlimtuneError(f"{path}: key {key!r}: not a slimtune federated setting")
        _one_key(keys, name, key, str(path))
        default = _FIELDS[name].default
        unset = {"float | None": (int, float), "str | None": (str,)}.get(_FIELDS[name].type)  # None: filled in later
        kinds = (int, float) if isinstance(default, float) else (type(default),) if default is not None else unset
        if kinds and not (isinstance(value, kinds) and not isinstance(value, bool) or value is None):
            raise SlimtuneError(f"{path}: key {key!r}: expected {kinds[0].__name__}, got {value!r}")
        values[name] = value
    return values


def check_inputs(cfg: FederatedConfig) -> tuple[list[int], list[str]] | None:
    """Read the data files the server was given through the objective: a bad file stops here with its file, line
    and field, not inside a client. Returns the labels and row keys of --data's rows (None without --data), as the
    clients split them (partition_rows; generation rows: label 0)."""
    from slimtune.data.tasks import rows_unquoted
    from slimtune.federated.local_privacy import private_clients
    with rows_unquoted(private_clients(cfg)):  # a private run's data errors quote no row
        return _check_inputs(cfg)


def _check_inputs(cfg: FederatedConfig) -> tuple[list[int], list[str]] | None:
    from slimtune.federated.local_privacy import private_clients
    from slimtune.federated.model import federated_objective
    objective = federated_objective(cfg)
    keys, data_rows = {}, None
    for flag, path, split in (("--data", cfg.data, "train"), ("--eval-data", cfg.eval_data, "validation"),
                              ("--root-data", cfg.root_data, "train")):  # the splits the clients and server read
        if path:
            raw, _ = objective.load(path, split)
            rows = raw[0] if objective.kind == "generation" else raw
            if objective.kind == "generation" and (not rows or "messages" not in rows[0][1]):
                objective.examples(raw, None)  # an empty file is refused here; chat rows once the tokenizer is loaded
            if flag == "--data":
                data_rows = partition_rows(objective, raw)
            if flag == "--root-data" and objective.kind == "classification":
                check_root_labels(cfg.root_data, {e.label for e in raw}, len(objective.task.label_words))
            keys[flag] = data_rows[1] if flag == "--data" else objective.row_keys(raw) if cfg.root_data or (
                flag == "--eval-data" and private_clients(cfg)) else []
    if private_clients(cfg) and cfg.eval_data:  # as a private `slimtune train`: scores on the clients' rows are no
        # release the accountant prices (a new query of their data, not post-processing)
        from slimtune.data.readers import EVAL_IS_TRAINING, same_source
        if same_source(cfg.data, cfg.eval_data):
            raise SlimtuneError(EVAL_IS_TRAINING)
        theirs = set(keys.get("--data", ()))
        if any(key in theirs for key in keys.get("--eval-data", ())):
            raise SlimtuneError("--eval-data shares rows with the clients' training data: a private run's scores would "
                                "be computed on their rows without noise; remove them from the evaluation data")
    if cfg.root_data:  # the server's own examples: none of the clients' and none it evaluates on (_check_trust)
        for flag in ("--data", "--eval-data"):
            theirs = set(keys.get(flag, ()))
            shared = sum(key in theirs for key in keys["--root-data"])  # rows equal up to case and spacing
            if shared:
                raise SlimtuneError(f"--root-data {cfg.root_data}: {shared} of its rows also appear in {flag}; the "
                                    f"server's root data must be examples of its own (drop those rows)")
    return data_rows


def check_root_labels(path: str, labels: set[int], need: int) -> None:
    """The server's root data holds every label of the task: the trust reference must carry the task's direction,
    not one label's pull (which would down-weight every honest client of another label)."""
    if len(labels) < need:
        raise SlimtuneError(f"--root-data {path}: rows of {len(labels)} of the task's {need} labels; the trust "
                            "reference needs every label")


def partition_rows(objective, raw) -> tuple[list[int], list[str], int]:
    """(labels, row keys, the task's number of labels) of `objective.load`'s raw rows: what
    partition.dirichlet_partition splits (generation rows: label 0 of 1)."""
    rows = raw[0] if objective.kind == "generation" else raw
    if objective.kind == "classification":
        return [e.label for e in raw], objective.row_keys(raw), len(objective.task.label_words)
    return [0] * len(rows), objective.row_keys(raw), 1


def check_partition(cfg: FederatedConfig, labels: list[int], keys: list[str], num_labels: int) -> None:
    """The Dirichlet split of --data over --clients that every simulated client draws (client_app._setup: the same
    rows, clients, alpha and seed), drawn here: a split that leaves a client without rows is one line naming
    --clients and --alpha, before Flower starts, not an error in every client after it."""
    from slimtune.federated.partition import dirichlet_partition
    rows = len(labels)
    if cfg.num_clients > rows:
        raise SlimtuneError(f"--clients {cfg.num_clients}: more clients than --data {cfg.data} has rows ({rows}); "
                            f"every client needs at least one: use at most {rows} clients")
    sizes = [len(p) for p in dirichlet_partition(labels, keys, cfg.num_clients, cfg.dirichlet_alpha, cfg.seed,
                                                 num_labels=num_labels)]
    if min(sizes) == 0:
        raise SlimtuneError(f"--clients {cfg.num_clients} --alpha {cfg.dirichlet_alpha:g}: the Dirichlet split of "
                            f"--data {cfg.data} ({rows} rows, seed {cfg.seed}) leaves client {sizes.index(0)} without "
                            f"rows; use fewer --clients, a larger --alpha or another --seed")


def check_output(out_dir: str) -> None:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimtuneError(f"{out}: already holds a run or other files (nothing was overwritten); choose another "
                            f"output directory")
    from slimtune.train.run_dir import check_not_in_a_run
    check_not_in_a_run(out, "--out")


def check_run(cfg: FederatedConfig, dirichlet: bool = True) -> FederatedConfig:
    """Everything refused before any work, on every path (`slimtune federate`, `flwr run .`, the deployment
    script): settings, data files, the clients' split of --data (`dirichlet`: the simulation's, check_partition; the
    deployment script shards rows itself and checks its own split), an output directory that already holds
    something. Returns the resolved config (the server step filled in)."""
    from slimtune.settings.rules import check_model

    cfg = cfg.resolved()
    cfg.validate()
    check_model(cfg.model)
    rows = check_inputs(cfg)
    if dirichlet and rows is not None:
        check_partition(cfg, *rows)
    check_output(cfg.out_dir)
    return cfg
