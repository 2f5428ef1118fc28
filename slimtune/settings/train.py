"""`slimtune train` settings: every flag, its rules, and what it applies to (one place; the CLI is generated)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slimtune import SlimtuneError
# what each optimizer is: slimtune/optim/methods.py (one table, torch-free)
from slimtune.optim.methods import (ADAPTIVE_CLIPPING, FIRST_ORDER, HYBRID, N_SPSA, OPTIMIZERS,  # noqa: F401
                                    PRIVATE, WITH_SOURCES, ZEROTH_ORDER, SOURCES, mechanism_refusal,
                                    names, perturbation_refusal)
from slimtune.settings.base import Settings, condition, setting, unless, when
from slimtune.settings.rules import (DTYPES, check_device, check_not_prequantized, check_task_text, normalise_dtype,
                                     require_input_file)

# The smallest noise multiplier (sigma, and adaptive clipping's count noise sigma_b) any path prices: the flag, the
# Python API, noise calibration's search range and the accountant itself (privacy/accountant.py). Below it a run has
# no privacy worth the name, and dp-accounting's arithmetic breaks down (RDP: epsilon NaN, priced as 0, near 1e-152).
MIN_NOISE_MULTIPLIER = 1e-3

LOZO = names(family="lozo")
PEFT = ("none", "lora", "pissa", "adapter", "svfit")
TASKS = ("sst2", "rte", "custom", "generation")
LOZO_M_MOMENTUM = ("{given}: LOZO-M is LOZO with momentum, which must be > 0 (0.9 when left out); LOZO without "
                   "momentum is the optimizer lozo")
CLASSIFICATION = ("sst2", "rte", "custom")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
             "inverse_sqrt")
BEST_METRICS = ("accuracy", "loss", "perplexity", "bleu", "rougeL", "exact_match", "f1")

private = when(optimizer=PRIVATE)
K_SHOT_PRIVATE = ("--k-shot with a private optimizer: the k rows per class are drawn by the public seed from the whole "
                  "file, so one row more or less changes which rows are trained on and the guarantee would hold for "
                  "the subset only, not for the file; write the subset you want to train on to a file instead")
generation = when(task=("generation",))
adaptive = condition(lambda s: s.optimizer in ADAPTIVE_CLIPPING and (s.clipping == "adaptive" or (
    s.clipping == "auto" and s.mechanism == "gaussian")),  # as train.trainer.adaptive_clipping
                     "adaptive clipping (--optimizer dpzero, dplozo, dphizoo or dphybrid with Gaussian noise, "
                     "without --clipping fixed)",
                     lambda s: f"--optimizer {s.optimizer}, --clipping {s.clipping}, --mechanism {s.mechanism}")
evaluates = condition(lambda s: bool(s.eval_data) and s.eval_every > 0, "runs that evaluate (--eval-data with "
                      "--eval-every > 0)", lambda s: "--eval-every 0" if s.eval_data else "no --eval-data")


# The widest beam search a command runs: each beam is a copy of the batch's cache, so memory and time grow with the
# width; widths past a few dozen buy nothing (a typo, 10**8 for 10, tried to allocate gigabytes after loading the model)
MAX_NUM_BEAMS = 64


@dataclass
class TrainSettings(Settings):
    command = "train"

    # -- data and task -------------------------------------------------------------------------------------------
    data: str | None = setting(None, "training data: .tsv/.csv/.jsonl file or hf:DIR (save_to_disk dataset); "
                               "required, here or in --config")
    eval_data: str | None = setting(None, "evaluation data (same formats); held out from the training data")
    out: str = setting("runs/latest", "run directory (metrics, checkpoint, adapter, summary)")
    model: str = setting("smollm2", "smollm2 (embedded default), gemma3-270m, tiny-llama, tiny-gpt2, or a local "
                         "checkpoint directory")
    task: str = setting("sst2", "sst2, rte, custom (classification) or generation (prompt -> completion)",
                        choices=TASKS)
    text_column: str | None = setting(None, "sst2: the text column (default sentence)", applies=when(task=("sst2",)))
    label_column: str | None = setting(None, "classification: the label column (default label)",
                                       applies=when(task=CLASSIFICATION))
    template: str | None = setting(None, "prompt template: custom task '{text} It was'; sst2/rte: another prompt over "
                                   "their columns ('{sentence} It was'); generation '{input}\\n' over the input "
                                   "column (\\n: a newline)", escapes=True)
    label_words: str | None = setting(None, "classification: label words, e.g. '0=terrible,1=great' (custom: "
                                      "required; sst2/rte: instead of the task's own)", applies=when(task=CLASSIFICATION))
    input_column: str | None = setting(None, "generation, tables: prompt column (default input)", applies=generation)
    target_column: str | None = setting(None, "generation, tables: completion column (default target)",
                                        applies=generation)
    max_new_tokens: int = setting(64, "generation: tokens generated per prompt at evaluation", low=1,
                                  applies=generation)
    num_beams: int = setting(1, "generation: beam search width at evaluation (1: greedy)", low=1, high=MAX_NUM_BEAMS,
                             applies=generation)
    eval_generate: bool = setting(True, "generation: decode at each evaluation (BLEU, ROUGE-L, EM, F1) or only "
                                  "compute loss/perplexity", bool_flags="--eval-generate/--no-eval-generate",
                                  applies=generation)
    best_metric: str | None = setting(None, "what --save best keeps: accuracy (default, classification), loss "
                                      "(default, generation), perplexity, bleu, rougeL, exact_match, f1",
                                      choices=BEST_METRICS, applies=evaluates)
    max_length: int = setting(256, "tokens per example: prompts are truncated from the left", low=8)
    k_shot: int = setting(0, "classification: k examples per class (0: all)", low=0, applies=when(task=CLASSIFICATION))

    # -- method ----------------------------------------------------------------------------------------------------
    optimizer: str = setting("mezo", ", ".join(OPTIMIZERS), choices=OPTIMIZERS)
    peft: str = setting("lora", "none, lora, pissa, adapter, svfit", choices=PEFT)
    r: int = setting(8, "LoRA/PiSSA rank, SVFit singular values, adapter bottleneck (--peft-r under torchrun, which "
                     "takes --r as its own option)", flags=("--r", "--peft-r"), low=1, applies=unless(peft=("none",)))
    lora_alpha: float = setting(16.0, "LoRA/PiSSA alpha", low=0, low_open=True, applies=when(peft=("lora", "pissa")))
    lora_dropout: float = setting(0.0, "LoRA/PiSSA dropout (first-order optimizers: zeroth-order and hybrid steps run "
                                  "with dropout off)", low=0, high=1, high_open=True,
                                  applies=when(peft=("lora", "pissa"), optimizer=FIRST_ORDER))
    target_modules: str | None = setting(None, "comma-separated layer names (default per architecture)",
                                         applies=unless(peft=("none",)), list_of_str=True)
    svfit_relative: bool = setting(True, "SVFit: train multiplicative scales of the singular values or the values "
                                   "themselves", bool_flags="--svfit-relative/--svfit-absolute",
                                   applies=when(peft=("svfit",)))
    learn_scale: bool = setting(False, "SVFit: also learn a scale per singular value", applies=when(peft=("svfit",)))
    pissa_niter: int | None = setting(None, "PiSSA: randomized SVD with this many iterations (fast)", low=1,
                                      applies=when(peft=("pissa",)))
    lr: float | None = setting(None, "learning rate (default: per optimizer x PEFT, printed at start)", low=0,
                               low_open=True, high=100)
    eps: float | None = setting(None, "ZO perturbation scale (default: per optimizer x PEFT)", low=0, low_open=True,
                                applies=when(optimizer=ZEROTH_ORDER + HYBRID))
    weight_decay: float = setting(0.0, "decoupled weight decay on matrices", low=0)
    n_spsa: int | None = setting(None, "ZO: perturbations averaged per step (default 1; FZOO: its N >= 2 one-sided "
                                 "directions, default 8)", low=1, applies=when(optimizer=N_SPSA))
    lozo_rank: int = setting(2, "LOZO: rank of the perturbation", low=1, applies=when(optimizer=LOZO))
    lozo_nu: int = setting(50, "LOZO: steps between resampling V", low=1, applies=when(optimizer=LOZO))
    momentum: float = setting(0.0, "LOZO-M, SGD: momentum", low=0, high=1, high_open=True,
                              applies=when(optimizer=("lozo-m", "sgd", "dp-sgd")))
    perturbation: str | None = setting(None, "ZO direction z: gaussian (default), rademacher (FZOO's default), or "
                                       "pool (slices of a seeded Gaussian pool: faster full-parameter ZO on CPU)",
                                       choices=SOURCES, applies=when(optimizer=WITH_SOURCES))
    hessian_smooth: float | None = setting(None, "HiZOO: moving-average weight of the diagonal Hessian estimate",
                                           low=0, high=1, low_open=True, high_open=True,
                                           applies=when(optimizer=("hizoo", "hizoo-l", "dphizoo")))
    sparsity: float | None = setting(None, "sparse-mezo: fraction of each tensor left unperturbed (its largest |w|)",
                                     low=0, high=1, high_open=True, applies=when(optimizer=("sparse-mezo",)))
    mask_every: int | None = setting(None, "sparse-mezo: steps between recomputing the masks", low=1,
                                     applies=when(optimizer=("sparse-mezo",)))
    fo_layers: int | None = setting(None, "hybrid: top transformer blocks trained by backprop (with the head)", low=1,
                                    applies=when(optimizer=HYBRID))
    fo_lr: float | None = setting(None, "hybrid: AdamW learning rate of the backprop part", low=0, low_open=True,
                                  applies=when(optimizer=HYBRID))
    fo_clip: float | None = setting(None, "dphybrid: per-example L2 clip of the backprop part's gradient (default 1, "
                                    "DP-AdamW's; the ZO scalar's clip is --clip)", low=0, low_open=True,
                                    applies=when(optimizer=("dphybrid",)))

    # -- schedule and bookkeeping ----------------------------------------------------------------------------------
    steps: int | None = setting(None, "training steps (default: 300 backprop, 2,000 zeroth-order)", low=1)
    lr_scheduler: str | None = setting(None, "transformers' schedules: constant, constant_with_warmup, linear "
                                       "(default), cosine, cosine_with_restarts, polynomial, inverse_sqrt",
                                       choices=SCHEDULES)
    warmup_steps: int | None = setting(None, "linear warm-up steps (default: 5% of the steps with backprop, none with "
                                       "ZO)", low=0)
    save: str = setting("best", "adapter/ holds the best-evaluated adapter (best; needs --eval-data) or the last "
                        "(last)", choices=("best", "last"))
    batch_size: int = setting(16, "examples per step (private runs: the expected Poisson batch size)", low=1)
    eval_every: int = setting(50, "steps between evaluations (0: none)", low=0,
                              applies=condition(lambda s: bool(s.eval_data) or s.eval_every == 0,
                                                "runs with --eval-data", lambda s: "no --eval-data"))
    eval_max: int = setting(0, "evaluate on at most this many examples (0: all)", low=0, applies=evaluates)
    checkpoint_every: int = setting(50, "steps between checkpoints", low=1)
    patience: int = setting(0, "early stopping after this many evaluations without improvement (0: off)", low=0,
                            applies=evaluates)
    seed: int = setting(0, "public seed: initialisation, ZO directions, data order of non-private runs", low=0,
                        high=2**63 - 1)

    # -- privacy -----------------------------------------------------------------------------------------------------
    epsilon: float | None = setting(None, "DP: target epsilon (noise is calibrated to it; default 6)", low=0,
                                    low_open=True, applies=private)
    delta: float = setting(1e-5, "DP: target delta (< 1/N)", low=0, high=1, low_open=True, high_open=True,
                           applies=private)
    noise_multiplier: float | None = setting(None, "DP: fixed noise multiplier instead of calibrating",
                                             low=MIN_NOISE_MULTIPLIER,
                                             applies=private)
    clip: float = setting(1.0, "DP: clipping threshold C (the starting C with adaptive clipping)", low=0,
                          low_open=True, applies=private)
    clipping: str = setting("auto", "DP: adaptive (C tracks --target-quantile of the per-example scalars, privately "
                            "and accounted), fixed, or auto (adaptive for dpzero/dplozo/dphizoo/dphybrid)",
                            choices=("auto", "adaptive", "fixed"), applies=private)
    target_quantile: float = setting(0.9, "DP, adaptive clipping: fraction of scalars left unclipped", low=0, high=1,
                                     low_open=True, high_open=True, applies=adaptive)
    clip_lr: float = setting(0.2, "DP, adaptive clipping: Q <- Q exp(-clip_lr (fraction below Q - target))", low=0,
                             low_open=True, applies=adaptive)
    clip_multiplier: float = setting(2.0, "DP, adaptive clipping: clip at C = clip_multiplier x Q", low=0,
                                     low_open=True, applies=adaptive)
    sampling: str = setting("poisson", "DP: poisson (default, exact) or shuffle (an approximation, not a proven guarantee)", choices=("poisson", "shuffle"),
                            applies=private)
    mechanism: str = setting("gaussian", "DP: gaussian or laplace", choices=("gaussian", "laplace"), applies=private)
    accountant: str = setting("rdp", "DP: rdp (fast) or pld (tighter: less noise for the same epsilon)",
                              choices=("rdp", "pld"), applies=private)
    pld_discretization: float = setting(1e-3, "DP, PLD accountant: value discretisation (pessimistic)", low=0,
                                        high=0.1, low_open=True, applies=when(accountant=("pld",)))
    log_private_stats: bool = setting(False, "DP: also log training loss, batch sizes and clipped fractions of "
                                      "private batches (NOT covered by the guarantee)", applies=private)
    secret_key_file: str | None = setting(None, "DP: the run's key file, given to every data-parallel rank out of "
                                          "band (default: RUN/secret.key, created by the run)", applies=private)

    # -- runtime -------------------------------------------------------------------------------------------------------
    device: str = setting("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = setting("float32", "float32, bfloat16 (bf16) or float16 (fp16, CUDA only): weights, activations and "
                         "ZO perturbations (LoRA adapters stay fp32)", choices=DTYPES)
    base_quant: str | None = setting(None, "LoRA on a frozen base whose linear layers are int8 or int4 (NF4), via "
                                     'bitsandbytes (pip install "slimtune[quant]")', choices=("int8", "int4"),
                                     applies=when(peft=("lora",)))
    force: bool = setting(False, "train even if the memory model predicts the run will not fit")
    resume: bool = setting(False, "continue the run in --out from its checkpoint (settings come from its config.json; "
                           "only --steps, --eval-every, --checkpoint-every, --patience may change)")
    restart: bool = setting(False, "start over in an --out whose run failed or was interrupted (the old directory "
                            "is moved to OUT.failed-N)")
    quiet: bool = setting(False, "no progress bar")
    dry_run: bool = setting(False, "check every setting and print them resolved, then stop (nothing is written)")

    # -- cross-field rules -------------------------------------------------------------------------------------------
    def check(self) -> None:
        self.dtype = normalise_dtype(self.dtype)
        if not self.data:
            raise SlimtuneError("--data is required (on the command line or in --config)")
        if self.model and Path(self.model).is_dir():  # before the model is loaded
            check_not_prequantized(Path(self.model) / "config.json", self.where("model") + f" {self.model}")
        if self.target_modules:  # a stray comma named a layer "" that no model has: refused after loading the model
            names = [t.strip() for t in self.target_modules.split(",")]
            if "" in names:
                raise SlimtuneError(f"{self.where('target_modules')} {self.target_modules!r}: layer "
                                    f"{names.index('') + 1} of the list is empty (a stray comma?); name each layer")
        if not self.resume:
            require_input_file(self.data, self.where("data"))
            if self.eval_data:
                require_input_file(self.eval_data, self.where("eval_data"))
        if self.optimizer == "lozo-m" and self.given("momentum") and self.momentum == 0:  # a run's record: not given
            raise SlimtuneError(LOZO_M_MOMENTUM.format(given=f"{self.where('momentum')} 0"))
        if self.secret_key_file is not None:  # before any work: the run reads it only after loading model and data
            require_input_file(self.secret_key_file, self.where("secret_key_file"), regular=False)
            from slimtune.privacy.secret import read_key_file
            try:  # what the run will refuse (readable by others, not a key), refused now
                read_key_file(self.secret_key_file)
            except SlimtuneError as exc:
                raise SlimtuneError(f"--secret-key-file {exc}") from None
            from slimtune.privacy.secret import KEY_FILE
            from slimtune.train.run_dir import is_run_directory
            given = Path(self.secret_key_file).resolve()
            owner = given.parent
            if given.name == KEY_FILE and is_run_directory(owner) and owner != Path(self.out).resolve():
                raise SlimtuneError(f"{self.where('secret_key_file')} {self.secret_key_file}: the key of the run in "
                                    f"{owner}, which retires (deletes) it when that run completes; copy it outside "
                                    "any run directory and give the copy")
        elif self.optimizer in PRIVATE and self.out:
            from slimtune.privacy.secret import KEY_FILE
            linked = Path(self.out) / KEY_FILE
            if linked.is_symlink():  # the run's own key is retired when it completes: never through a link
                raise SlimtuneError(f"{linked}: is a symbolic link; a run keeps its own key file there (and destroys "
                                    "it when it completes): give the key with --secret-key-file instead")
        if self.optimizer == "fzoo" and self.n_spsa is not None and self.n_spsa < 2:
            raise SlimtuneError(f"--n-spsa {self.n_spsa}: FZOO estimates from N >= 2 one-sided directions (default 8)")
        refusal = mechanism_refusal(self.optimizer, self.mechanism, self.n_spsa, self.clipping)
        if refusal:
            raise SlimtuneError(refusal)
        refusal = perturbation_refusal(self.perturbation, self.optimizer)
        if refusal:
            raise SlimtuneError(refusal)
        if self.resume and self.restart:
            raise SlimtuneError("--resume and --restart exclude each other")
        check_device(self.device, self.dtype)
        check_task_text(self)
        if self.steps is not None and self.warmup_steps is not None and self.warmup_steps >= self.steps:
            raise SlimtuneError(f"{self.where('warmup_steps')} {self.warmup_steps}: must be below --steps "
                                f"({self.steps})")
        if self.given("save") and self.save == "best" and not evaluates.test(self):
            raise SlimtuneError("--save best keeps the best-evaluated adapter and needs --eval-data with "
                                "--eval-every > 0")
        if self.k_shot and self.optimizer in PRIVATE:
            raise SlimtuneError(K_SHOT_PRIVATE)
        if self.best_metric:
            allowed = ("accuracy", "loss") if self.task in CLASSIFICATION else \
                ("loss", "perplexity", *(("bleu", "rougeL", "exact_match", "f1") if self.eval_generate else ()))
            if self.best_metric not in allowed:
                raise SlimtuneError(f"--best-metric {self.best_metric!r}: a {self.task} run evaluates "
                                    f"{', '.join(allowed)}")
        from slimtune.data.readers import EVAL_IS_TRAINING, same_source  # (slimtune.data imports torch)
        if self.optimizer in PRIVATE and same_source(self.data, self.eval_data):  # before the model loads
            raise SlimtuneError(EVAL_IS_TRAINING)

    # -- to the trainer ----------------------------------------------------------------------------------------------
    def to_config(self):
        """The TrainConfig the trainer runs (nested: optimizer, PEFT, privacy and generation groups)."""
        from slimtune.data.tasks import canonical_label_words
        from slimtune.optim import OptimizerArgs
        from slimtune.peft import PeftSettings
        from slimtune.privacy import PrivacySpec
        from slimtune.train import TrainConfig
        from slimtune.train.objectives import GenerationSettings

        privacy = None
        if self.optimizer in PRIVATE:
            target = self.epsilon if self.epsilon is not None or self.noise_multiplier is not None else 6.0
            privacy = PrivacySpec(target, self.delta, self.noise_multiplier, self.clip, self.sampling, self.mechanism,
                                  self.accountant, self.pld_discretization, self.clipping, self.target_quantile,
                                  self.clip_lr, self.clip_multiplier)
        targets = [t.strip() for t in self.target_modules.split(",")] if self.target_modules else None
        n_spsa = self.n_spsa if self.n_spsa is not None else (8 if self.optimizer == "fzoo" else 1)
        optim = OptimizerArgs(self.lr, self.weight_decay, self.eps, n_spsa, self.seed, self.lozo_rank,
                              self.lozo_nu, self.momentum, self.perturbation)
        for name in ("hessian_smooth", "sparsity", "mask_every", "fo_layers", "fo_lr", "fo_clip"):
            if hasattr(optim, name):
                setattr(optim, name, getattr(self, name))
        config = TrainConfig(
            out_dir=self.out, train_data=self.data, eval_data=self.eval_data, model=self.model, task=self.task,
            text_column=self.text_column, label_column=self.label_column, template=self.template,
            label_words=canonical_label_words(self.task, self.label_words), optimizer=self.optimizer, optim=optim,
            peft=PeftSettings(self.peft, self.r, self.lora_alpha, self.lora_dropout, targets, self.pissa_niter,
                              self.learn_scale, self.svfit_relative),
            generation=GenerationSettings(self.input_column, self.target_column, self.max_new_tokens, self.num_beams,
                                          self.eval_generate),
            best_metric=self.best_metric, privacy=privacy, steps=self.steps, batch_size=self.batch_size,
            eval_every=self.eval_every, eval_max=self.eval_max, checkpoint_every=self.checkpoint_every,
            patience=self.patience, k_shot=self.k_shot, seed=self.seed, max_length=self.max_length,
            device=resolve_device(self.device), dtype=self.dtype, progress=not self.quiet,
            log_private_stats=self.log_private_stats, lr_scheduler=self.lr_scheduler,
            warmup_steps=self.warmup_steps, save=self.save, force=self.force, secret_key_file=self.secret_key_file,
            base_quant=self.base_quant)
        config.given_settings = set(getattr(self, "_given", ()))  # not a field: never in config.json or a resume check
        return config


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# A run's config.json (the nested TrainConfig) -> flat settings: field -> setting name (None: not a setting)
RUN_CONFIG_NAMES = {
    "out_dir": "out", "train_data": "data", "optim.seed": None, "optim.rank": "lozo_rank", "optim.nu": "lozo_nu",
    "peft.method": "peft", "peft.alpha": "lora_alpha", "peft.dropout": "lora_dropout",
    "privacy.target_epsilon": "epsilon", "generation.eval_batch_size": None, "progress": None, "resumed": None,
    "privacy": None, "generation": None,
}


PER_INVOCATION = ("force", "resume", "restart")  # recorded in config.json, never adopted from it
# Keys older versions recorded that no setting reads any more (read as nothing, never refused)
RETIRED_RECORD_KEYS = ("peft.extra", "generation.learned")


def from_run_config(stored: dict, where: str = "config.json") -> dict:
    """A run's config.json as flat train settings (what `--resume` and `--config RUN/config.json` start from), with
    what the run trained with where an older version recorded something else (resume.as_trained: the prompt of a
    run that recorded null). An edited file is read as strictly as a flat settings file: a key no setting reads (a
    misspelling) or two keys naming one setting (`"lr"` beside `"optim": {"lr": ...}`) is a one-line error naming
    `where`; a key a user added beside a non-private run's null "privacy" (`"epsilon": 1`) is kept, never dropped."""
    import copy

    from slimtune.train.resume import as_trained
    stored = as_trained(copy.deepcopy(stored))
    known = set(TrainSettings.defaults())
    flat, origin = {}, {}

    from slimtune.settings.cli import NULL_IS_UNSET

    def put(key: str, name: str | None, value) -> None:
        if not name or key in RETIRED_RECORD_KEYS or value is None and name in NULL_IS_UNSET:
            return  # (older runs recorded null for a switch that has a default now: unset)
        if name not in known:
            raise SlimtuneError(f"{where}: unknown setting {key!r} for `slimtune train` (a run's config.json holds "
                                "the keys a run records; `slimtune train --help` lists the settings)")
        if name in flat:
            raise SlimtuneError(f"{where}: {origin[name]!r} and {key!r} name the same setting ({name}); keep one")
        flat[name], origin[name] = value, key

    for key, value in stored.items():
        if isinstance(value, dict) and key in ("optim", "peft", "privacy", "generation"):
            for sub, v in value.items():
                put(f"{key}.{sub}", RUN_CONFIG_NAMES.get(f"{key}.{sub}", sub), v)
        else:
            put(key, RUN_CONFIG_NAMES.get(key, key), value)
    if "progress" in stored:
        if "quiet" in flat:
            raise SlimtuneError(f"{where}: 'progress' and 'quiet' name the same setting (quiet); keep one")
        flat["quiet"] = not stored["progress"]
    if isinstance(flat.get("target_modules"), list):
        flat["target_modules"] = ",".join(flat["target_modules"])
    for name in PER_INVOCATION:  # an override given once (--force past a refusal) is not the next invocation's
        flat.pop(name, None)
    return flat  # (a non-private run records privacy as null: no DP value comes from a group; a DP key a user added
    #               at the top level is kept and checked as any setting)


def run_identity(values: dict) -> tuple:
    """What a run's table defaults depend on (optim/defaults.py): the model's architecture, optimizer and PEFT."""
    from slimtune.models.loading import builtin_architecture
    model = values.get("model") or TrainSettings.defaults()["model"]
    return builtin_architecture(str(model)), values.get("optimizer"), values.get("peft")


def retable(merged: dict, stored: dict, keep: set[str]) -> dict:
    """`--config RUN/config.json` with another model, optimizer or PEFT: config.json stores resolved values, so the
    ones the source run took from the defaults table (equal to the table's entry for *its* model, optimizer and PEFT)
    would come back as if chosen, e.g. SmolLM2's ZO lr 1e-3 for a Gemma run, where it diverges. Those are dropped so
    the new combination's entry fills them; `keep` (set on the command line) and any value that differs from the
    table (the source run's own choice) stay. The same model, optimizer and PEFT: everything stays (the run is
    reproduced)."""
    from slimtune.optim.defaults import defaults_for
    source = from_run_config(stored)
    model, optimizer, peft = run_identity(source)
    try:
        d = defaults_for(optimizer, peft, model)
    except SlimtuneError:
        return merged
    if "steps" in keep and "warmup_steps" not in keep and isinstance(source.get("steps"), int) \
            and source.get("warmup_steps") == int(d.warmup_ratio * source["steps"]):
        # the source's warm-up was its default share of its steps: another --steps gets its own share
        merged = {k: v for k, v in merged.items() if k != "warmup_steps"}
    if run_identity(merged) == run_identity(source):
        return merged
    steps = source.get("steps")
    table = {"lr": d.lr, "eps": d.eps, "lr_scheduler": d.lr_scheduler, "steps": d.steps,
             "warmup_steps": int(d.warmup_ratio * steps) if isinstance(steps, int) else None, **dict(d.extra)}
    return {k: v for k, v in merged.items()
            if k in keep or k not in table or k not in source or source[k] != table[k] or v != source[k]}


def retable_from_file(merged: dict, path: str, keep: set[str]) -> dict:
    """`retable` and `retask` when the config file at `path` is a run's own config.json; other files are user
    choices, kept."""
    from slimtune.settings.cli import read_config_file
    data = read_config_file(path)
    return retask(retable(merged, data, keep), data, keep) if is_run_config(data) else merged


def retask(merged: dict, stored: dict, keep: set[str]) -> dict:
    """`--config RUN/config.json --task OTHER`: the run's prompt (template, label words: its task's, recorded) belongs
    to its task, so it is dropped for another task unless given on the command line."""
    if merged.get("task", stored.get("task")) == stored.get("task"):
        return merged
    return {k: v for k, v in merged.items() if k in keep or k not in ("template", "label_words")}


def is_run_config(values: dict) -> bool:
    """A run's own config.json (nested groups) rather than a flat settings file."""
    return isinstance(values.get("optim"), dict) and isinstance(values.get("peft"), dict) and "out_dir" in values
