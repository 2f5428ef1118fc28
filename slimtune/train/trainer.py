"""The training loop: sample, step, log, evaluate, checkpoint, stop early or when the privacy budget is spent.

Private runs (dpzero, dplozo, dp-sgd, dp-adamw) draw their noise and Poisson batches from the run's 256-bit key
(privacy/secret.py, kept only in RUN/secret.key, mode 0600) and log only what is released or post-processed: the
noisy scalar (`projected_grad`, ZO), epsilon/delta/noise multiplier, and evaluations on the eval data (which may not
overlap the training data). The training loss, realised batch sizes, clipped fractions and step times / peak memory
(per step, the summary's mean and peak, the progress line's s/step and ETA) are functions of the private batch and
are logged only with `log_private_stats` (not covered by the guarantee; a warning says so). Nothing else depends on individual training rows: warnings raised while a private batch is
processed are suppressed, the memory check uses --max-length rather than the longest row, tiny test models do not
fit their vocabulary to the training text, and errors during private steps name released values only.

Resume (train/resume.py, train/run_dir.py): the settings must be the run's own, and so must the data, model, key and
library versions (train/fingerprint.py); a step whose release was written before the process died is recomputed under
a new `attempt` (fresh noise and batch) and accounted twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from slimtune import SlimtuneError, distributed
from slimtune.data import EpochSampler, PoissonSampler, k_shot
from slimtune.data.readers import EVAL_IS_TRAINING, same_source
from slimtune.models.loading import check_positions
from slimtune.optim import HYBRID_OPTIMIZERS, PRIVATE_OPTIMIZERS, OptimizerArgs, build_optimizer
from slimtune.optim.base import mix_seed
from slimtune.optim.defaults import resolve as resolve_defaults
from slimtune.optim.hybrid import check_split, zo_part_settings
from slimtune.optim.methods import mechanism_refusal
from slimtune.optim.schedule import lr_multiplier
from slimtune.peft import PeftSettings, apply_peft, peft_summary
from slimtune.peft.registry import PISSA_INIT_DIR, adapted_modules, adapter_meta, check_rank_fits, write_adapter
from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec, Segment, check_spec, plan
from slimtune.privacy.secret import (KEY_FILE, KeyedNoise, RunKey, create_key_file, fresh_nonce, is_temporary_of,
                                     read_key_file, retire_key_file)
from slimtune.train import fingerprint
from slimtune.train.checkpoint import LEGACY_SECRET_FILE, load_checkpoint, peek_state, read_state, save_checkpoint
from slimtune.train.metrics import MetricsLog, last_logged_step, peak_memory_mb, reset_peak_memory
from slimtune.train.resume import adopt_unset, check_resume, read_stored
from slimtune.train.run_dir import (LOCK_FILE, STATUS_FILE, RunDirectory, RunFileError, is_writing_temporary,
                                    read_status, recover_adapter, replace_file)
from slimtune.train.objectives import (GenerationSettings, build_objective, check_best_metric, is_better,
                                       load_model_and_data, overlap_key)


@dataclass
class TrainConfig:
    out_dir: str
    train_data: str
    eval_data: str | None = None
    model: str = "smollm2"
    task: str = "sst2"  # sst2, rte, custom (classification) or generation
    text_column: str | None = None
    label_column: str | None = None
    template: str | None = None
    label_words: str | None = None
    optimizer: str = "mezo"
    optim: OptimizerArgs = field(default_factory=OptimizerArgs)
    peft: PeftSettings = field(default_factory=PeftSettings)
    privacy: PrivacySpec | None = None
    steps: int | None = None  # None: the per-method default (optim/defaults.py), like lr, eps and the schedule
    batch_size: int = 16
    eval_every: int = 50
    eval_max: int = 0  # evaluate on at most this many examples (0: all)
    checkpoint_every: int = 50
    patience: int = 0  # early stopping: evaluations without improvement (0: off)
    k_shot: int = 0
    seed: int = 0
    max_length: int = 256
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True
    lr_scheduler: str | None = None  # a transformers.get_scheduler name (see optim/schedule.py); None: default
    warmup_steps: int | None = None
    force: bool = False  # train even when the memory model predicts the run will not fit
    save: str = "best"  # adapter/ holds the best-evaluated adapter ("best", needs eval data) or the last ("last")
    log_private_stats: bool = False  # private runs: also log loss, batch size, clipped fraction, step time (leaks)
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # task "generation" only
    best_metric: str | None = None  # what "best" means for --save best / early stopping (None: accuracy or loss)
    secret_key_file: str | None = None  # private runs: the key file (None: RUN/secret.key, created by the run)
    base_quant: str | None = None  # "int8" / "int4": LoRA on a frozen quantized base (models/quantize.py)


# What a private run's per-step record may contain: released or post-processed values only.
RELEASED_KEYS = ("step", "lr", "projected_grad", "clip", "epsilon", "delta", "noise_multiplier",
                 "curvature", "curvature_clip")  # dphizoo releases its curvature scalar too


@dataclass
class Run:
    """Everything a training run holds; built by `prepare`, advanced by `train`."""

    config: TrainConfig
    model: torch.nn.Module
    tokenizer: object
    optimizer: object
    train_examples: list
    eval_examples: list
    objective: object  # train/objectives.py: encode, per-example losses, evaluation
    sampler: object
    accountant: object = None
    key: RunKey | None = None  # private runs: the secret key of noise and sampling (RUN/secret.key only)
    attempt: int = 0  # private runs: how often steps were recomputed after a resume (fresh noise each time)
    run_dir: RunDirectory | None = None  # rank 0: the directory this process owns (lock, status, release ledger)
    noise: KeyedNoise | None = None  # private runs: the noise source; step t draws from K("noise", attempt, t, i)
    start_step: int = 0
    best_eval: dict | None = None  # the best evaluation's metrics (names without the eval_ prefix)
    best_step: int | None = None
    evals_without_improvement: int = 0
    bytes_before: int = 0  # data-parallel bytes sent before start_step (earlier segments, each in its own world)
    lr_multiplier: object = None  # step -> factor on config.optim.lr
    defaults_origin: dict = field(default_factory=dict)  # setting -> "default" (from optim/defaults.py) or "given"
    world: distributed.World = field(default_factory=distributed.World)  # torchrun data-parallel ZO: rank, size
    fingerprint: dict | None = None  # rank 0: what the run trains with (train/fingerprint.py), in every checkpoint

    @property
    def label_ids(self) -> list:  # classification: the label words' token ids
        return self.objective.label_ids

    @property
    def best_accuracy(self) -> float | None:
        return (self.best_eval or {}).get("accuracy")


def prepare(config: TrainConfig, resume: bool = False, restart: bool = False) -> Run:
    """Check everything, load model and data, claim the run directory, build optimizer and sampler.

    Order: settings and the output directory, read-only (no silent overwrite, resume checked against config.json);
    then data and model, and the checks that need them (overlap, sizes, memory) — nothing is written before these
    pass; then the directory is claimed (lock, status.json) and the run is built."""
    out = Path(config.out_dir)
    world = distributed.setup(config.device)
    from slimtune.settings.rules import normalise_dtype
    config.dtype = normalise_dtype(config.dtype)  # "bf16" is "bfloat16", also against a resumed run's config.json
    stored = read_stored(out) if resume else None
    zo_given = [] if resume else given_zo_settings(config)  # a resumed run's are its config.json's (they must match)
    if stored:
        adopt_unset(config, stored, {"privacy": PrivacySpec})  # settings left unset keep the run's values
        check_resume(config, out)  # a changed optimizer is named before the settings it brings are judged
    origin = resolve_defaults(config)  # config.json stores the resolved values
    record_prompt(config)
    validate(config)
    from slimtune.settings.train import resolve_device
    reset_peak_memory(resolve_device(config.device))  # the run's peak (loading included) is its own, also in a
    # notebook's second run
    multiplier = lr_multiplier(config.lr_scheduler, config.steps, config.warmup_steps)
    distributed.check_supported(config.optimizer, world)
    if world.main:
        _claim(config, resume, restart, [], dry=True)  # the same checks, before any work
    loaded = _load(config)
    if config.optimizer in HYBRID_OPTIMIZERS:
        check_split(loaded[1], config.optim.fo_layers, adapted_modules(loaded[1], config.peft), zo_given)
    check_rank_fits(loaded[1], config.peft)
    if config.optimizer in PRIVATE_OPTIMIZERS and config.privacy is not None and not resume and world.main:
        # a budget no noise can meet, refused before the directory (and its key) exists or a run is moved aside,
        # with the releases a --restart (or an earlier attempt's) would carry; _private_setup plans again
        carried = releases_of(out) if restart and out.is_dir() else carried_by_attempt(out)
        plan(config.privacy, len(loaded[3]), config.batch_size, config.steps, releases_per_step(config),
             adaptive_clipping(config), extra=[Segment.from_dict(d) for d in carried])
    if world.parallel:  # and every rank has passed its checks before rank 0 claims the directory
        distributed.check_ranks_agree(rank_facts(config, loaded[1]), world)
    run_dir, resumed = (_claim_or_release(config, resume, restart) if world.main else (None, {}))
    distributed.barrier(world)  # every rank has checked before rank 0 writes anything
    try:
        return _build(config, world, run_dir, resume, resumed, origin, multiplier, *loaded)
    except BaseException as exc:
        if run_dir is not None:
            try:
                run_dir.update(state="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            finally:
                run_dir.release()
        raise


def record_prompt(config: TrainConfig) -> None:
    """A built-in task's prompt, where not given, is the task's today, written into the config (and so config.json):
    what a run resumes and is evaluated with does not follow later changes of the task's prompt."""
    from slimtune.data.tasks import with_builtin_prompt
    config.template, config.label_words = with_builtin_prompt(config.task, config.template, config.label_words)


PER_RANK = ("out_dir", "train_data", "eval_data", "model", "secret_key_file", "device", "progress")  # paths may differ


def rank_facts(config: TrainConfig, model) -> dict:
    """What every rank of a data-parallel run must share (distributed.check_ranks_agree): each setting but the
    per-machine ones (paths, device, progress), the contents of the data files and the model's weights (by digest),
    and a digest keyed by --secret-key-file's key (never the key)."""
    import hashlib

    from slimtune.train.resume import as_json, flat
    facts = {f"--{k.replace('_', '-').split('.')[-1]}": v for k, v in flat(as_json(config)).items()
             if k.split(".")[0] not in PER_RANK}
    for flag, path in (("--data", config.train_data), ("--eval-data", config.eval_data)):
        if path and config.optimizer not in PRIVATE_OPTIMIZERS:  # a private run's: keyed digests, in _build
            facts[f"the contents of {flag}"] = fingerprint.source_sha256(path)  # compared between ranks
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{float(tensor.double().sum())!r}".encode())
    facts["the model's weights (--model)"] = weights.hexdigest()
    if config.secret_key_file:
        key = read_key_file(Path(config.secret_key_file))
        facts["the key of --secret-key-file"] = key.generator("rank-check").bytes(16).hex()  # a PRF value, not the key
    return facts


def given_zo_settings(config: TrainConfig) -> list[str]:
    """The flags of a hybrid's ZO part (optim/hybrid.zo_part_settings) the caller gave: from the settings' record of
    what was given (TrainSettings.to_config), else, for a TrainConfig built by hand, the ones it left unset are None."""
    if config.optimizer not in HYBRID_OPTIMIZERS:
        return []
    given = getattr(config, "given_settings", None)
    if given is None:
        given = {name for name, value in (("lr", config.optim.lr), ("eps", config.optim.eps),
                                          ("perturbation", config.optim.perturbation)) if value is not None}
    return ["--" + name.replace("_", "-") for name in zo_part_settings(config.optimizer) if name in given]


def _load(config: TrainConfig) -> tuple:
    """(objective, model, tokenizer, train examples, eval examples), checked against the settings."""
    private_run = config.optimizer in PRIVATE_OPTIMIZERS
    objective = build_objective(config)
    config.best_metric = check_best_metric(objective, config.best_metric)
    from slimtune.data.tasks import rows_unquoted
    with rows_unquoted(private_run):  # a private run's data errors quote no row
        model, tokenizer, train_examples, eval_examples = load_model_and_data(
            objective, config.model, config.train_data, config.eval_data, config.seed, getattr(torch, config.dtype),
            config.device, fit_tokenizer_to_training_data=not private_run, base_quant=config.base_quant)
    classes = len(objective.task.label_words)
    if objective.kind == "classification" and not private_run:  # a private run never counts its rows' labels
        warn_label_counts(objective, train_examples, config.k_shot)
    train_examples = k_shot(train_examples, config.k_shot, config.seed, classes)
    if config.eval_max and len(eval_examples) > config.eval_max:  # exactly eval_max, balanced over the classes
        eval_examples = k_shot(eval_examples, -(-config.eval_max // classes), config.seed, classes)[:config.eval_max]
    check_positions(model, config.max_length,
                    config.generation.max_new_tokens if objective.kind == "generation" and config.eval_data else 0)
    check_data(config, objective, train_examples, eval_examples)
    try:
        check_memory(config, model, tokenizer, None if private_run else objective.texts(train_examples))
    except SlimtuneError as exc:
        if not config.force:
            raise
        warnings.warn(f"--force: {exc}", stacklevel=2)  # said, not silently skipped
    return objective, model, tokenizer, train_examples, eval_examples


def _claim_or_release(config: TrainConfig, resume: bool, restart: bool) -> tuple[RunDirectory, dict]:
    holder = []
    try:
        return _claim(config, resume, restart, holder)
    except BaseException:
        for run_dir in holder:
            run_dir.release()
        raise


def _claim(config: TrainConfig, resume: bool, restart: bool, holder: list,
           dry: bool = False) -> tuple[RunDirectory, dict]:
    """Own the output directory: refuse a second process, an existing run (without --resume or --restart) and a
    resume whose settings differ; returns the directory and the settings a resume changes. `dry`: the same checks,
    nothing locked, moved or written."""
    run_dir = RunDirectory(config.out_dir)
    out = run_dir.path
    run_dir.check_writable()
    if resume and restart:
        raise SlimtuneError("--resume and --restart exclude each other")
    if dry:
        run_dir.check_not_held()  # another process trains into it: refused before the model and data are loaded
    else:
        run_dir.acquire()
        holder.append(run_dir)
        recover_adapter(out)  # a kill between write_adapter's two renames: adapter/ (and the user's files) back
    if not restart and (out / "adapter").is_symlink():  # write_adapter would swap the link, not a run's directory
        raise SlimtuneError(f"{out / 'adapter'}: is a symbolic link (to {os.readlink(out / 'adapter')}); a run writes "
                            "its own adapter/ there: move the link away (nothing was changed)")
    state = run_dir.status().get("state")
    holds_run = any((out / name).exists() for name in ("checkpoint", "config.json", "summary.json", "metrics.jsonl"))
    if restart and holds_run:
        if state == "completed" or (out / "summary.json").exists() and state is None:
            raise SlimtuneError(f"--restart {out}: the run there completed; --restart only replaces a failed or "
                                "interrupted run (choose another --out)")
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            raise SlimtuneError(f"--restart --out {out}: is (or holds) the working directory, which --restart would "
                                "move aside under this process; run it from outside the run directory")
        if dry:
            return run_dir, {}
        moved = run_dir.move_aside()
        run_dir.release()
        run_dir = RunDirectory(out)
        run_dir.acquire()
        run_dir.replaced = moved  # a private run composes the releases the replaced run made
        run_dir.update(replaced=str(moved.resolve()))  # and so does any later attempt in this directory
        holder.append(run_dir)
        print(f"--restart: the previous run was moved to {moved}", file=sys.stderr)
    elif resume:
        if not (out / "checkpoint").exists() and not (out / "checkpoint.old").exists():
            raise SlimtuneError(f"--resume {out}: no checkpoint there to resume from")
        resumed = check_resume(config, out)
        if not dry:
            run_dir.update(state="running", pid=os.getpid())
        return run_dir, resumed
    elif holds_run:
        raise SlimtuneError(f"{out}: already holds a run ({state or 'files of a run'}); pass --resume to continue "
                            "it, --restart to start over (a failed or interrupted run is moved aside), or choose "
                            "another --out (nothing was overwritten)")
    else:
        check_only_claim_files(out)
    if not dry:
        run_dir.update(state="running", pid=os.getpid(), step=0)
    return run_dir, {}


# What a new run's directory may already hold: what an earlier attempt that stopped before its first save wrote (the
# lock, status.json, the key of a private run, PiSSA's initial adapter). Anything else is the user's.
# (and a key file's temporary a kill left behind: is_temporary_of; a record's: is_writing_temporary)
CLAIM_FILES = (LOCK_FILE, STATUS_FILE, STATUS_FILE + ".tmp", KEY_FILE, PISSA_INIT_DIR)


def check_only_claim_files(out: Path) -> None:
    """A new run trains into a new or empty directory (or one an earlier attempt only claimed): its adapter/ and
    checkpoint rotation would replace a folder of the user's of the same name."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in CLAIM_FILES and not is_temporary_of(p.name, KEY_FILE)
                     and not is_writing_temporary(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise SlimtuneError(f"--out {out}: exists, is not empty ({shown}) and is not a slimtune run; a run writes "
                            "adapter/, checkpoint/ and its records there: choose a new or empty directory (nothing was "
                            "overwritten)")


def budget_allows(accountant, steps: int) -> bool:
    """Whether `steps` steps (with the releases already accounted, e.g. steps recomputed after a resume) stay within
    the target epsilon. Strict: a calibrated plan ends at or below the target (calibrate_noise returns the safe side
    of its bisection), so a resumed run whose recomputed steps were accounted twice stops before it would overspend,
    instead of going past the target by up to the 0.1% it was once allowed."""
    if accountant is None or accountant.spec.target_epsilon is None:
        return True
    return accountant.epsilon(steps) <= accountant.spec.target_epsilon * (1 + 1e-9)


def _build(config: TrainConfig, world, run_dir, resume: bool, resumed: dict, origin: dict, multiplier, objective,
           model, tokenizer, train_examples: list, eval_examples: list) -> Run:
    out = Path(config.out_dir)
    private_run = config.optimizer in PRIVATE_OPTIMIZERS
    torch.manual_seed(config.seed)
    model = apply_peft(model, config.peft, work_dir=out if world.main else None)  # rank 0 alone writes adapters
    if not any(p.requires_grad for p in model.parameters()):
        raise SlimtuneError(f"--peft {config.peft.method}: the model has no trainable parameters (nothing to train)")
    private, accountant, key, attempt, keyed_noise = None, None, None, 0, None
    if private_run:
        config.privacy = config.privacy or PrivacySpec(target_epsilon=6.0)  # the default budget, enforced like any
        accountant, key, attempt, nonce = _private_setup(config, run_dir, len(train_examples), resume, world)
        # each rank read its own --out's key (paths may differ per rank): the same key, or different batches and noise
        distributed.check_ranks_agree({"the run's key (RUN/secret.key or --secret-key-file)":
                                       key.generator("rank-check").bytes(16).hex()}, world)  # a PRF value, not the key
        if world.parallel:  # the data's contents by digests keyed by the run's key and nonce (never a plain digest:
            distributed.check_ranks_agree({f"the contents of {flag}": fingerprint.data_digest(path, key, str(nonce))
                                           for flag, path in (("--data", config.train_data),
                                                              ("--eval-data", config.eval_data)) if path},
                                          world)  # it would travel between machines)
        objective.warn_per_batch = False  # nothing said per private batch (see check_data for the one notice)
        keyed_noise = KeyedNoise(key, attempt, nonce)
        private = (config.privacy, accountant.noise, config.batch_size, keyed_noise, accountant.quantile_noise)
        sampler = (EpochSampler if config.privacy.sampling == "shuffle" else PoissonSampler)(
            len(train_examples), config.batch_size, key=key, attempt=attempt, run=nonce)
        if config.log_private_stats:
            warnings.warn("--log-private-stats: metrics.jsonl will hold the training loss, realised batch sizes and "
                          "clipped fractions of private batches; they are not noised or accounted, so the run's "
                          "logs are NOT covered by its (epsilon, delta) guarantee", stacklevel=2)
    else:
        sampler = EpochSampler(len(train_examples), config.batch_size, config.seed)
    optimizer = build_optimizer(config.optimizer, model, config.optim, private)
    run = Run(config, model, tokenizer, optimizer, train_examples, eval_examples, objective, sampler, accountant,
              key, attempt, run_dir, keyed_noise, lr_multiplier=multiplier, defaults_origin=origin, world=world)
    if resume:
        state = load_checkpoint(out / "checkpoint", model, optimizer)
        if world.parallel:  # each rank loaded its own --out's checkpoint: a stale copy on one node trains another run
            weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
            distributed.check_ranks_agree({"the resumed checkpoint's step": state["step"],
                                           "the resumed checkpoint's weights and optimizer state":
                                           distributed.state_digest(weights, optimizer.state_dict())}, world)
        # bytes sent before: as the checkpoint recorded them (older checkpoints: every step in this world)
        run.bytes_before = state.get("bytes_communicated", _gather_bytes(run, state["step"]))
        run.start_step = state["step"]
        run.best_eval, run.best_step = state.get("best_eval"), state.get("best_step")
        run.evals_without_improvement = state.get("evals_without_improvement", 0)
        if world.main:
            run.fingerprint = _fingerprint(config, run_dir, key, state)
            MetricsLog(out / "metrics.jsonl").truncate_after(run.start_step)
            _write_config(config, out, resumed, run.start_step)
    elif world.main:
        run.fingerprint = _fingerprint(config, run_dir, key, None)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        _write_config(config, out, {}, 0)
    return run


def _fingerprint(config: TrainConfig, run_dir: RunDirectory, key, state: dict | None) -> dict:
    """The fingerprint this run's checkpoints record (train/fingerprint.py), its run id also in status.json: a new
    run's is fresh; a resumed one keeps its checkpoint's (or status.json's: a run that began before fingerprints)."""
    recorded = (state or {}).get("fingerprint")
    run_id = recorded.get("run") if isinstance(recorded, dict) else None
    if state is not None and not run_id:
        run_id = run_dir.status().get("run_id")
    stamp = fingerprint.compute(config, key, run_id)
    run_dir.update(run_id=stamp["run"])
    return stamp


def _write_config(config: TrainConfig, out: Path, changed: dict, step: int) -> None:
    """config.json: the settings being trained, and each resume's allowed changes (train/resume.py)."""
    history = (read_stored(out) or {}).get("resumed", []) if step else []
    if step:
        history.append({"at_step": step, "changed": changed})
    doc = {**asdict(config), **({"resumed": history} if history else {})}
    replace_file(out / "config.json", json.dumps(doc, indent=2, default=str))  # whole, or the previous one kept


def check_data(config: TrainConfig, objective, train_examples: list, eval_examples: list) -> None:
    """Checks that need the data, before any training: sizes the sampler cannot honour, evaluation data that
    overlaps the training data (refused for private runs: best-model selection would use training rows), and the
    generation truncation notice (once, before training; private runs never count rows)."""
    private = config.optimizer in PRIVATE_OPTIMIZERS
    n = len(train_examples)
    sampling = config.privacy.sampling if private and config.privacy else "shuffle"
    if config.batch_size > n:  # Poisson sampling too: q = B/N would be clamped to 1 and the sum divided by B
        raise SlimtuneError(f"--batch-size {config.batch_size} is larger than the {n} training examples")
    if private and config.privacy is not None:
        check_spec(config.privacy, n)
    if same_source(config.train_data, config.eval_data):
        if private:
            raise SlimtuneError(EVAL_IS_TRAINING)
        warnings.warn("--eval-data is the training data: evaluations measure fit, not generalisation", stacklevel=2)
    elif eval_examples:
        train_keys = {overlap_key(text) for text in objective.texts(train_examples)}  # up to case and spacing
        shared = train_keys.intersection(overlap_key(text) for text in objective.texts(eval_examples))
        if shared and private:
            raise SlimtuneError("--eval-data shares rows with the training data: a private run's evaluations (and the "
                                "best-model choice) would use training rows without noise; remove them from the "
                                "evaluation data")
        if shared:
            warnings.warn(f"{len(shared)} evaluation rows also appear in the training data", stacklevel=2)
    if objective.kind == "generation":
        objective.warn_per_batch = False
        if private:
            print(f"note: training targets longer than --max-length {config.max_length} tokens are truncated "
                  "(private run: rows are not counted)", file=sys.stderr)
        else:
            from slimtune.generation.objective import token_ids
            cut = sum(token_ids(objective.tokenizer, e, config.max_length)[2] for e in train_examples)
            if cut:
                warnings.warn(f"{cut} of {n} training targets are truncated to fit --max-length "
                              f"{config.max_length}; raise --max-length to train on whole targets", stacklevel=2)


def warn_label_counts(objective, examples: list, k: int | None) -> None:
    """Warn when the training rows hold one class only (the label column is likely the wrong one, or the file a
    filtered slice), or fewer rows of a class than --k-shot asks (it then trains on all the class has)."""
    words = objective.task.label_words
    counts = [0] * len(words)
    for e in examples:
        counts[e.label] += 1
    held = [c for c, n in enumerate(counts) if n]
    if len(held) == 1:
        warnings.warn(f"--data: every training row has label {objective.task.label_values[held[0]]!r} "
                      f"({words[held[0]]!r}): the label column holds one class", stacklevel=2)
    short = [objective.task.label_values[c] for c, n in enumerate(counts) if k and n < k]
    if short:
        warnings.warn(f"--k-shot {k}: label(s) {', '.join(map(repr, short))} have fewer than {k} training rows; "
                      "every row of them is used", stacklevel=2)


def validate(config: TrainConfig) -> None:
    """Settings errors before any data or model is loaded: one line naming the flag and what it accepts."""
    from slimtune.optim import OPTIMIZERS
    from slimtune.peft.registry import check_settings
    from slimtune.privacy.accountant import check_names

    if config.optimizer not in OPTIMIZERS:
        raise SlimtuneError(f"unknown --optimizer {config.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    from slimtune.settings.rules import check_device, normalise_dtype
    config.dtype = normalise_dtype(config.dtype)  # a TrainConfig built by hand (the Python layer) checked as --dtype
    from slimtune.optim.first_order import dtype_refusal
    refused = dtype_refusal(config.optimizer, config.peft.method, config.dtype)
    if refused:
        raise SlimtuneError(refused)
    check_device(config.device, config.dtype)
    for flag, value, low in (("--steps", config.steps, 1), ("--batch-size", config.batch_size, 1),
                             ("--eval-every", config.eval_every, 0), ("--checkpoint-every", config.checkpoint_every, 1),
                             ("--n-spsa", config.optim.n_spsa, 1), ("--max-length", config.max_length, 1)):
        if value < low:
            raise SlimtuneError(f"{flag} must be >= {low}, got {value}")
    from slimtune.optim.builders import check_optimizer_args
    from slimtune.zo.perturbation import check_perturbation
    check_perturbation(config.optim.perturbation, config.optimizer)
    refusal = config.privacy is not None and mechanism_refusal(config.optimizer, config.privacy.mechanism,
                                                               config.optim.n_spsa, config.privacy.clipping)
    if refusal:
        raise SlimtuneError(refusal)
    check_optimizer_args(config.optimizer, config.optim)
    if config.save not in ("best", "last"):
        raise SlimtuneError(f"--save {config.save!r}: choose best or last")
    check_settings(config.peft)
    from slimtune.models.quantize import check_base_quant
    check_base_quant(config.base_quant, config.peft.method)
    if config.privacy is not None:
        check_names(config.privacy)
        from slimtune.privacy.accountant import check_releases
        check_releases(config.privacy, releases_per_step(config))  # Laplace: one release a step (before loading)
    if config.k_shot and config.optimizer in PRIVATE_OPTIMIZERS:
        from slimtune.settings.train import K_SHOT_PRIVATE
        raise SlimtuneError(K_SHOT_PRIVATE)


def check_memory(config: TrainConfig, model, tokenizer, texts: list[str] | None) -> None:
    """Refuse a run the memory model predicts will not fit here (before PEFT and any step), naming the pairs that
    would. `model` is the base model, before PEFT; `texts` what one example feeds the model (None: assume
    --max-length tokens, as private runs do)."""
    from slimtune.report.memory_model import check_fits

    if texts is None:  # private runs: what the user configured, never a measurement of the training rows
        seq_len = config.max_length
    else:
        sample = texts[:2000]
        seq_len = min(config.max_length, max((len(ids) for ids in tokenizer(sample, add_special_tokens=False)
                                              ["input_ids"]), default=1))
    world = distributed.torchrun_world_size()  # data-parallel: each rank at its share of the batch; on CPU the
    local = 1 if world == 1 or str(config.device).startswith("cuda") else distributed.local_world_size(world)  # ranks
    check_fits(model, config.optimizer, config.peft.method, config.peft.r, -(-config.batch_size // world), seq_len,
               config.device, config.peft.target_modules, config.optim.fo_layers or 2, config.dtype, config.base_quant,
               processes=local, momentum=config.optim.momentum or 0.0,  # ranks of one machine share its memory
               lozo_rank=config.optim.rank or 2)


def releases_per_step(config: TrainConfig) -> int:
    """Noisy scalars a private step releases on one batch: n-SPSA's n for the ZO optimizers (2 per direction for
    DP-HiZOO: gradient and curvature), one gradient for DP-SGD."""
    from slimtune.optim.builders import private_releases
    return private_releases(config.optimizer, config.optim.n_spsa)


def adaptive_clipping(config: TrainConfig) -> bool:
    """DPZero/DPLOZO clip adaptively unless told --clipping fixed (or with Laplace noise); DP-SGD clips at a fixed C."""
    from slimtune.optim.methods import ADAPTIVE_CLIPPING
    spec, zo = config.privacy, config.optimizer in ADAPTIVE_CLIPPING
    if spec.clipping == "adaptive" and not zo:
        raise SlimtuneError(f"--clipping adaptive is implemented for {', '.join(ADAPTIVE_CLIPPING)} (their ZO "
                            f"scalar); {config.optimizer} "
                            "clips at a fixed --clip (use --clipping fixed)")
    return zo and (spec.clipping == "adaptive" or (spec.clipping == "auto" and spec.mechanism == "gaussian"))


def _private_setup(config: TrainConfig, run_dir: RunDirectory | None, num_examples: int, resume: bool,
                   world) -> tuple[PrivacyAccountant, RunKey, int, int]:
    """The accountant, the run's key, the attempt number and the run's nonce.

    New run: a fresh key in RUN/secret.key (or the given key file). Resume: the same key; steps released after the
    checkpoint (the release ledger in status.json, or metrics.jsonl) are recomputed under attempt + 1, i.e. with fresh
    noise and batches, and accounted as extra releases (kept in status.json and the checkpoint, composed forever).
    Rank 0 (the one with `run_dir`) decides the ledger (attempt, nonce, releases carried or abandoned: public values)
    and writes it to status.json; every rank plans from the ledger rank 0 broadcasts, so the ranks' accountants and
    noise agree whether or not they see the run directory (a rank that read status.json before rank 0 wrote it planned
    without a replaced run's releases: less noise than rank 0)."""
    spec, releases = config.privacy, releases_per_step(config)
    adaptive = adaptive_clipping(config)
    out = Path(config.out_dir)
    key_path = Path(config.secret_key_file) if config.secret_key_file else out / KEY_FILE
    if not resume:
        ledger = None
        if run_dir is not None:  # a fresh nonce: this run's noise and batches are its own, whatever key it shares
            ledger = {"attempt": 0, "released_through": 0, "abandoned": _carried_releases(run_dir),
                      "nonce": fresh_nonce()}
            for stale in out.iterdir():  # a key temporary of a killed attempt (we hold the directory's lock)
                if is_temporary_of(stale.name, KEY_FILE):
                    stale.unlink(missing_ok=True)
            if not config.secret_key_file and not key_path.exists():  # else an attempt that stopped before its
                create_key_file(key_path)  # first release made it (check_only_claim_files); the fresh nonce keeps
                # this run's noise and batches its own
        ledger = distributed.broadcast(ledger, world)  # also: the key file exists before any rank reads it
        accountant = plan(spec, num_examples, config.batch_size, config.steps, releases, adaptive,
                          extra=[Segment.from_dict(d) for d in ledger["abandoned"]])
        if run_dir is not None:
            run_dir.update(**ledger, privacy_segment=asdict(accountant.history(1)[0]))
        return accountant, read_key_file(key_path), 0, int(ledger["nonce"])
    state, legacy = read_state(out / "checkpoint")
    if legacy is not None and not key_path.exists():
        raise SlimtuneError(f"{out}: this private run was made by an older slimtune whose noise came from a 63-bit "
                            f"seed ({LEGACY_SECRET_FILE}); it cannot be continued safely: start a new run")
    key = read_key_file(key_path)
    if not state:
        raise SlimtuneError(f"{out}/checkpoint: no trainer state; this private run cannot be resumed")
    noise = state["noise_multiplier"]  # a resumed run keeps its noise; the loop stops when the budget runs out
    past = [Segment.from_dict(d) for d in state.get("privacy_history") or
            [dict(steps=state["step"], num_examples=num_examples, batch_size=config.batch_size,
                  noise_multiplier=noise)]]
    quantile_noise = past[-1].quantile_noise if adaptive else 0.0
    status = None
    if run_dir is not None:  # rank 0 decides the attempt and the extra releases, durably, before anything new
        status = run_dir.status()
        nonce = status.get("nonce")  # entries of a replaced run carry its own nonce: keys never collide across runs
        legacy = f"legacy:{nonce}"  # entries written before they carried a run: never equal to a new entry's key
        abandoned = {(d.get("run", legacy), d["attempt"], d["from_step"]): {**d, "run": d.get("run", legacy)}
                     for d in state.get("abandoned", []) + status.get("abandoned", [])}
        attempt = max(int(status.get("attempt", 0)), int(state.get("attempt", 0)))
        released = max(int(status.get("released_through", 0)), last_logged_step(out / "metrics.jsonl", "epsilon"))
        if released > state["step"]:  # written, then the process died before the checkpoint: those releases count
            seg = replace(past[-1], steps=released - state["step"], num_examples=num_examples,
                          noise_multiplier=noise)  # at the run's own mechanism and sampling
            abandoned[(nonce, attempt, state["step"])] = {**asdict(seg), "attempt": attempt,
                                                           "from_step": state["step"], "run": nonce}
            attempt += 1
        run_dir.update(attempt=attempt, released_through=state["step"], abandoned=list(abandoned.values()))
        status = run_dir.status()
    status = distributed.broadcast(status, world)  # every rank: rank 0's attempt, nonce and extra releases
    if "nonce" not in status:
        raise SlimtuneError(f"{out}/status.json: no run nonce; this private run cannot be continued safely (start a new "
                            "run)")
    extra = [Segment.from_dict(d) for d in status.get("abandoned", [])]
    accountant = PrivacyAccountant(spec, num_examples, config.batch_size, noise, releases, past, quantile_noise,
                                   extra=extra)
    return accountant, key, int(status.get("attempt", 0)), int(status["nonce"])


def _carried_releases(run_dir: RunDirectory) -> list[dict]:
    """Releases a failed or interrupted private run made before --restart moved it aside. They were published on the
    same data, so the new run's accountant composes them: --restart never starts a fresh budget. The replaced run is
    the one this process moved, or the one status.json names (`replaced`, written as soon as it was moved: an attempt
    refused or stopped before its first save is followed by one that still composes it)."""
    replaced = getattr(run_dir, "replaced", None)
    if replaced is not None:
        return releases_of(replaced)
    return carried_by_attempt(run_dir.path)


def carried_by_attempt(out: Path) -> list[dict]:
    """What an earlier attempt in `out` that stopped before its first save had carried: the releases of the run its
    status.json names as replaced; refused when that status.json is damaged while the attempt's key is there (its
    ledger, and so what it carried, is unknown)."""
    status = read_status(out)
    if status.get("damaged") and (out / KEY_FILE).exists():
        raise SlimtuneError(f"{out}/status.json is damaged, and an earlier private attempt's key is there: the "
                            "releases it carried (a --restart's) cannot be known, so this directory cannot be trained "
                            "into safely; move it aside and compose its runs' epsilon by hand")
    return releases_of(Path(status["replaced"])) if status.get("replaced") else []


def releases_of(run: Path, seen: frozenset = frozenset()) -> list[dict]:
    """A private run's releases as ledger entries: from its status.json (the steps released at its settings, what it
    had itself carried or abandoned), each tagged with its run's nonce (`run`: two runs' entries never share a key);
    without a readable ledger there (a crash damaged it), rebuilt from its checkpoint and metrics.jsonl, or refused.
    A run that is gone, or a chain of `replaced` records that loops, is refused: its releases cannot be composed."""
    resolved = run.resolve()
    if resolved in seen:
        raise SlimtuneError(f"{run}: the runs' `replaced` records in status.json form a loop; the releases they "
                            "carried cannot be composed")
    if not run.is_dir():
        raise SlimtuneError(f"{run}: the run this directory replaced is gone, and its releases on the same data cannot "
                            "be composed; restore it (it was moved aside by --restart), or train in a new --out and "
                            "compose the runs' epsilon by hand")
    status = read_status(run)
    if "nonce" not in status:
        return _rebuilt_releases(run, status, seen | {resolved})
    nonce = status["nonce"]
    carried = [{**d, "run": d.get("run", f"{nonce}:legacy:{i}")} for i, d in enumerate(status.get("abandoned", []))]
    if status.get("released_through") and status.get("privacy_segment"):
        seg = {**status["privacy_segment"], "steps": int(status["released_through"])}
        carried.append({**seg, "attempt": f"replaced:{run.name}", "from_step": 0, "run": nonce})
    return carried


def _rebuilt_releases(run: Path, status: dict, seen: frozenset) -> list[dict]:
    """The releases of a run whose status.json holds no ledger: its checkpoint's trajectory (privacy_history) and
    abandoned entries, and the steps metrics.jsonl shows released after that checkpoint, at its last settings."""
    state = peek_state(run)
    released = last_logged_step(run / "metrics.jsonl", "epsilon")
    history = state.get("privacy_history")
    if not history:
        if released:
            raise SlimtuneError(f"--restart: {run}/status.json holds no readable ledger and its {released} released "
                                "steps cannot be rebuilt (no checkpoint with a privacy history); they cannot be "
                                "composed, so the run is not started over")
        prior = status.get("replaced")  # an attempt that stopped before its ledger: what it had replaced
        return releases_of(Path(prior), seen) if prior else []
    tag = f"rebuilt:{run.name}"
    carried = [{**d, "run": d.get("run", tag)} for d in state.get("abandoned", [])]
    carried += [{**seg, "attempt": f"{tag}:{i}", "from_step": 0, "run": tag} for i, seg in enumerate(history)]
    if released > int(state.get("step", 0)):
        carried.append({**history[-1], "steps": released - int(state["step"]), "attempt": f"{tag}:after",
                        "from_step": int(state["step"]), "run": tag})
    return carried


class TrainingInterrupted(SlimtuneError):
    """Ctrl-C: the run stopped after a whole step and saved its checkpoint (exit code 130)."""

    code = 130


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`timeout`, `kill`, a scheduler, `docker stop`, a closed terminal) while `slimtune train`
    runs: it stops at once, as at a second Ctrl-C (the last checkpoint is kept; a save under way finishes its rollback,
    e.g. write_adapter puts the previous adapter/ back); exit code 128 + the signal's number."""

    def __init__(self, signum: int):
        import signal
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def resume_command(out: str | Path) -> str:
    """The command that resumes the run in `out`, quoted for the shell (a path with spaces can be pasted)."""
    import shlex
    return f"slimtune train --out {shlex.quote(str(out))} --resume"


def stopped_message(out: str | Path | None, exc: BaseException | None = None, what: str | None = None) -> str:
    """One line for a run stopped outside a whole step (a second Ctrl-C, SIGTERM, an OS error on its files): what
    stopped it, and the command that resumes it when its directory holds an unfinished run with a checkpoint."""
    if what is None:
        what = f"stopped by {exc.args[0]}" if isinstance(exc, Stopped) else "interrupted"
    if out is None:
        return what
    from slimtune.train.checkpoint import peek_state
    out = Path(out)
    has_checkpoint = (out / "checkpoint").is_dir() or (out / "checkpoint.old").is_dir()
    if not has_checkpoint or read_status(out).get("state") not in ("interrupted", "failed", "running"):
        return f"{what}; {out} holds no checkpoint of this run to resume from (run the command again)"
    step = peek_state(out).get("step")
    return (f"{what}; the last checkpoint{f' (step {step})' if step is not None else ''} is in {out / 'checkpoint'}; "
            f"resume with: {resume_command(out)}")


def _os_error(exc: OSError, out: Path) -> RunFileError:
    """An OS error on the run's files (a full disk, a quota, a read-only remount) as one line naming the file."""
    import errno as errnos
    if isinstance(exc, RunFileError):
        return exc
    name = errnos.errorcode.get(exc.errno or 0, "")
    reason = f"{exc.strerror or exc}{f' ({name})' if name else ''}"
    return RunFileError(stopped_message(out, what=f"{exc.filename or out}: {reason}; the run stopped (nothing it "
                                                  "had saved was lost)"), exc.errno, exc.filename)


def _mark_stopped(run: Run, exc: BaseException) -> None:
    if run.run_dir is not None:
        try:
            run.run_dir.update(state="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        finally:
            run.run_dir.release()
    if isinstance(exc, OSError):
        raise _os_error(exc, Path(run.config.out_dir)) from None


def train(run: Run) -> dict:
    """Run from `run.start_step` to `config.steps`; returns the summary (also written to summary.json).

    Ctrl-C stops after the current step, checkpoints, and raises TrainingInterrupted with the command that resumes;
    a second Ctrl-C, SIGTERM or SIGHUP stops at once (KeyboardInterrupt, `Stopped`; the last checkpoint is kept),
    also during the final saves. Any failure marks the run failed in status.json; an OS error on the run's files (a
    full disk) is one line naming the file."""
    with _stop_on_interrupt() as interrupted:
        return _train(run, interrupted)


def _train(run: Run, interrupted) -> dict:
    cfg, out = run.config, Path(run.config.out_dir)
    log = MetricsLog(out / "metrics.jsonl") if run.world.main else _NoLog()
    run.model.train(not run.optimizer.zeroth_order)  # ZO: dropout off
    stop_reason, step = "completed", run.start_step
    progress = _progress(cfg, step) if run.world.main else None
    try:
        if progress:
            progress.start()
        if step == 0 and run.eval_examples and cfg.eval_every:
            record = {"step": 0, **_evaluate(run)}  # the starting point (zero-shot accuracy)
            _track_best(run, 0, record)
            log.write(record)
        if cfg.patience and run.evals_without_improvement >= cfg.patience:
            stop_reason = "early stopping"  # a resumed run that had stopped there: its trajectory ends here
        while step < cfg.steps and stop_reason == "completed":
            if not budget_allows(run.accountant, step + 1):
                stop_reason = "privacy budget exhausted"
                break
            if interrupted():
                stop_reason = "interrupted"
                break
            record = _train_step(run, step)
            step += 1
            if run.key is not None and run.run_dir is not None:  # the ledger first, then anything holding the
                run.run_dir.update(released_through=step)  # step's release (its log line, the best adapter)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps) and run.eval_examples:
                record.update(_evaluate(run))
                if _track_best(run, step, record):
                    stop_reason = "early stopping"
            log.write(record)
            if progress:
                progress.update(step, record)
            saved_best = cfg.save == "best" and run.best_step == step  # adapter/ now holds this step's model:
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop_reason != "completed" or saved_best:
                _checkpoint(run, step)  # a resume never starts before it (adapter/ of a lost trajectory)
            if stop_reason != "completed":
                break
    except BaseException as exc:
        if progress:
            progress.stop()
        taken = getattr(run.optimizer, "step_count", None)  # a ZO step counts once its update began
        if run.key is not None and run.run_dir is not None and taken is not None and taken > step:
            run.run_dir.update(released_through=taken)  # it failed there: its releases are priced all the same
        _mark_stopped(run, exc)
        raise
    if progress:
        progress.stop()
    try:  # the last saves fail like a step (a full disk): the run is marked failed, never left "running"
        _checkpoint(run, step)
        if stop_reason != "interrupted":
            if cfg.save == "last" or run.best_step is None:  # "best" without evaluations: the last is all there is
                _save_adapter(run)
            summary = write_summary(run, step, stop_reason)
    except BaseException as exc:
        _mark_stopped(run, exc)
        raise
    if stop_reason == "interrupted":
        if run.run_dir is not None:
            run.run_dir.update(state="interrupted", step=step)
            run.run_dir.release()
        raise TrainingInterrupted(f"interrupted after step {step}; checkpoint in {out / 'checkpoint'}; resume with: "
                                  f"{resume_command(out)}")
    if run.run_dir is not None:
        retired = run.key is not None and not cfg.secret_key_file and _retired(out / KEY_FILE)  # the run's own key;
        # never a file the user gave
        run.run_dir.update(state="completed", step=step, stop_reason=stop_reason, **({"key": "retired"} if retired
                                                                                     else {}))
        run.run_dir.release()
    return summary


def _retired(key_path: Path) -> bool:
    """A completed run's own key retired (privacy/secret.py retire_key_file); one that cannot be is said in one
    warning line, and status.json does not claim it was."""
    try:
        retire_key_file(key_path)
    except OSError as exc:
        warnings.warn(f"{key_path}: the completed run's key could not be retired ({exc.strerror or exc}); delete it "
                      "before sharing the run directory", stacklevel=2)
        return False
    return True


STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # stop at once (Stopped), as a second Ctrl-C does


class _stop_on_interrupt:
    """Within the block, the first SIGINT only sets a flag (the loop stops after the current step, whose in-place
    perturbations must be undone before anything is saved); the second one interrupts at once. SIGTERM and SIGHUP
    raise `Stopped` at once (their sender may follow with SIGKILL); a repeat of them is then ignored, so the clean-up
    (a rollback, status.json) is not cut. `defer_first=False` handles SIGTERM and SIGHUP only (`slimtune train` while
    it loads and claims: a Ctrl-C there is Python's KeyboardInterrupt)."""

    def __init__(self, defer_first: bool = True):
        self.defer_first = defer_first

    def __enter__(self):
        import signal
        import threading
        self.hits, self.stopping, self.previous = 0, False, {}
        if threading.current_thread() is threading.main_thread():
            if self.defer_first:
                self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
            for name in STOP_SIGNALS:  # one the parent set to be ignored (nohup: SIGHUP) stays ignored
                if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) is not signal.SIG_IGN:
                    self.previous[getattr(signal, name)] = signal.signal(getattr(signal, name), self._terminate)
        return lambda: self.hits > 0

    def _handle(self, signum, frame):
        self.hits += 1
        if self.hits > 1:
            raise KeyboardInterrupt
        from slimtune.privacy.withhold import unsilenced  # acknowledged also from inside a private step
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=unsilenced(sys.stderr), flush=True)

    def _terminate(self, signum, frame):
        if self.stopping:
            return
        self.stopping = True
        raise Stopped(signum)

    def __exit__(self, *exc):
        import signal
        for signum, previous in self.previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        return False


def _train_step(run: Run, step: int) -> dict:
    """One step. In a private run nothing about the batch may leave the process except the released values: warnings
    raised while the batch is processed are dropped, and a failure is reported without its (row-dependent) details
    unless the user opted out of the guarantee with --log-private-stats."""
    if run.key is None or run.config.log_private_stats:
        return _step(run, step)
    from slimtune.privacy.withhold import withheld
    with withheld(f"a private training step failed at step {step + 1}", "rerun a copy with --log-private-stats, "
                  "which is not covered by the privacy guarantee, to see them"):
        return _step(run, step)


def _step(run: Run, step: int) -> dict:
    cfg = run.config
    if run.noise is not None:
        run.noise.begin_step(step)
    indices = list(run.sampler.indices(step))  # the global batch; a data-parallel rank encodes its shard of it
    local = distributed.shard(indices, run.world)
    batch = run.objective.encode([run.train_examples[i] for i in local], cfg.max_length).to(cfg.device)
    torch.manual_seed(mix_seed(cfg.seed, step, 0xD0))  # dropout noise (first-order) replays on resume

    lr = cfg.optim.lr * run.lr_multiplier(step)
    run.optimizer.set_lr(lr)
    start = time.perf_counter()
    result = run.optimizer.step(lambda: distributed.gather_losses(run.objective.losses(run.model, batch),
                                                                  len(indices), run.world))
    elapsed = time.perf_counter() - start
    if run.key is not None:
        _check_released(run, step, result)
    elif indices and not math.isfinite(result.loss):
        raise SlimtuneError(f"training loss is {result.loss} at step {step + 1} ({cfg.optimizer}, lr={cfg.optim.lr}); "
                            f"lower --lr or --eps; the last good checkpoint is in {cfg.out_dir}/checkpoint")
    record = {"step": step + 1, "lr": lr, "loss": result.loss, "step_time_s": elapsed, "batch_size": len(indices),
              "peak_mem_mb": peak_memory_mb(cfg.device), **result.info}
    if run.accountant:
        record.update(epsilon=run.accountant.epsilon(step + 1), delta=run.accountant.spec.delta,
                      noise_multiplier=run.accountant.noise)
        if not cfg.log_private_stats:
            record = {k: v for k, v in record.items() if k in RELEASED_KEYS}
    return record


def _check_released(run: Run, step: int, result) -> None:
    """A private step that produced a non-finite update, named by released values only (the noisy scalar, or the
    trained weights, which are post-processing of the releases)."""
    g = result.info.get("projected_grad")
    if g is not None:
        bad = not math.isfinite(g)
    else:
        bad = not all(torch.isfinite(p).all() for p in run.model.parameters() if p.requires_grad)
    if bad:
        raise SlimtuneError(f"the released update of step {step + 1} is not finite ({run.config.optimizer}, "
                            f"lr={run.config.optim.lr}); lower --lr or --eps; the last good checkpoint is in "
                            f"{run.config.out_dir}/checkpoint")


SHOWN = {"loss": "loss", "epsilon": "epsilon", "eval_accuracy": "accuracy", "eval_loss": "eval loss",
         "eval_bleu": "BLEU"}


def _shown(record: dict) -> list[str]:
    return [f"{label} {record[k]:.3f}" for k, label in SHOWN.items() if isinstance(record.get(k), float)]


def _describe(cfg: TrainConfig, record: dict) -> str:
    return " ".join([f"{cfg.optimizer}+{cfg.peft.method}", *_shown(record)])


def _evaluate(run: Run) -> dict:
    """Metrics on the eval data; data-parallel runs evaluate on rank 0 and share the result (same decisions)."""
    res = run.objective.evaluate(run.model, run.eval_examples, run.config.device) if run.world.main else None
    res = distributed.broadcast(res, run.world)
    run.model.train(not run.optimizer.zeroth_order)
    return {f"eval_{k}": v for k, v in res.items()}


def _track_best(run: Run, step: int, record: dict) -> bool:
    """Keep the best evaluation (config.best_metric, ties to the lower loss; the zero-shot model counts) and, with
    save="best", its adapter. Returns True when early stopping should end the run."""
    current = {k[5:]: v for k, v in record.items() if k.startswith("eval_")}
    if is_better(run.config.best_metric, current, run.best_eval):
        run.best_eval, run.best_step, run.evals_without_improvement = current, step, 0
        if run.config.save == "best":
            _save_adapter(run)
        return False
    run.evals_without_improvement += 1
    return bool(run.config.patience) and run.evals_without_improvement >= run.config.patience


def _save_adapter(run: Run) -> None:
    """adapter/ with the run's tokenizer and the base eval/generate must rebuild (model, dtype, quantization)."""
    if not run.world.main:
        return
    cfg = run.config
    meta = adapter_meta(cfg.model, cfg.dtype, cfg.base_quant, cfg.task, cfg.template, cfg.label_words,
                        cfg.generation.input_column, cfg.generation.target_column,
                        scoring={"max_length": cfg.max_length, **({"max_new_tokens": cfg.generation.max_new_tokens,
                                                                   "num_beams": cfg.generation.num_beams}
                                                                  if cfg.task == "generation" else {})})
    write_adapter(run.model, run.tokenizer, Path(run.config.out_dir) / "adapter", work_dir=run.config.out_dir,
                  meta=meta)


def _checkpoint(run: Run, step: int) -> None:
    if not run.world.main:
        return
    acc = run.accountant
    privacy = {} if acc is None else {
        "noise_multiplier": acc.noise, "epsilon": acc.epsilon(step),
        "privacy": {k: getattr(acc.spec, k) for k in ("sampling", "mechanism", "accountant")},
        "privacy_history": [asdict(seg) for seg in acc.history(step)], "attempt": run.attempt,
        "abandoned": (run.run_dir.status().get("abandoned", []) if run.run_dir is not None else [])}
    save_checkpoint(Path(run.config.out_dir) / "checkpoint", run.model, run.optimizer,
                    {"step": step, "best_eval": run.best_eval, "best_step": run.best_step,
                     "evals_without_improvement": run.evals_without_improvement,
                     "bytes_communicated": _gather_bytes(run, step), **privacy,
                     **({"fingerprint": run.fingerprint} if run.fingerprint else {})})


def write_summary(run: Run, step: int, stop_reason: str) -> dict:
    from slimtune.train.metrics import read_jsonl

    cfg, out = run.config, Path(run.config.out_dir)
    if not run.world.main:
        return {}
    records = read_jsonl(out / "metrics.jsonl")
    evals = [r for r in records if r.get("eval_loss") is not None]
    final = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}
    best = run.best_eval or {}
    times = [r["step_time_s"] for r in records if r.get("step_time_s")]
    withheld = run.accountant is not None and not cfg.log_private_stats  # measured on private batches: not released
    summary = {
        "method": cfg.optimizer, "peft": cfg.peft.method, "model": cfg.model, "task": cfg.task,
        **peft_summary(run.model),
        "peak_mem_mb": None if withheld else
        max([r.get("peak_mem_mb") or 0 for r in records] + [peak_memory_mb(cfg.device)]),
        "time_per_step_s": (sum(times) / len(times)) if times and not withheld else None,
        "steps": step, "stop_reason": stop_reason, "batch_size": cfg.batch_size,
        "train_examples": len(run.train_examples), "eval_examples": len(run.eval_examples),
        "final_accuracy": final.get("accuracy"), "best_accuracy": best.get("accuracy"), "best_step": run.best_step,
        "final_eval_loss": final.get("loss"), "best_eval_loss": best.get("loss"),
        "best_metric": cfg.best_metric, "final_eval": final or None, "best_eval": best or None,
        **{f"{which}_{k}": v for which, d in (("final", final), ("best", best)) for k, v in d.items()
           if k not in ("accuracy", "loss")},  # generation: best_bleu, final_rougeL, ...
        "saved_adapter": "last" if cfg.save == "last" or run.best_step is None else f"best (step {run.best_step})",
        "lr_scheduler": cfg.lr_scheduler,
        "epsilon": run.accountant.epsilon(step) if run.accountant else None,
        "delta": run.accountant.spec.delta if run.accountant else None,
        "noise_multiplier": run.accountant.noise if run.accountant else None,
        "accountant": run.accountant.spec.accountant if run.accountant else None,
        "quantile_noise": (run.accountant.quantile_noise or None) if run.accountant else None,
        "private_stats_logged": cfg.log_private_stats if run.accountant else None,
        "bytes_communicated": _gather_bytes(run, step), "device": cfg.device,
        "data_parallel_ranks": run.world.size,
    }
    replace_file(out / "summary.json", json.dumps(summary, indent=2))
    return summary


class _NoLog:
    def write(self, record: dict) -> None:
        pass


def _gather_bytes(run: Run, step: int) -> int:
    """Data-parallel runs: bytes all ranks sent in the loss all-gathers up to `step`, one per forward pass, at the
    expected batch size (the realised sizes of private Poisson batches are not released): the earlier segments' as
    their checkpoints recorded them (each in its own world size), then this world's since start_step."""
    if not run.world.parallel:
        return run.bytes_before
    return run.bytes_before + (run.optimizer.forwards_per_step * (step - run.start_step) * run.world.size
                               * distributed.bytes_per_gather(run.config.batch_size, run.world))


def _progress(cfg: TrainConfig, start: int):
    """A rich progress bar on a terminal; a plain line every ~5% of the run (and at evaluations) otherwise. A private
    run's show no time (elapsed, s/step, ETA): step times depend on the rows of each batch, unless
    --log-private-stats."""
    if not cfg.progress:
        return None
    timing = cfg.privacy is None or cfg.log_private_stats
    if sys.stdout.isatty():
        return BarProgress(cfg, start, timing)
    return LineProgress(cfg, start, timing)


class BarProgress:
    def __init__(self, cfg: TrainConfig, start: int, timing: bool = True):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.cfg, self.timing = cfg, timing
        clock = (TimeElapsedColumn(), TimeRemainingColumn()) if timing else ()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *clock,
                            transient=False)
        self.task = self.bar.add_task(f"{cfg.optimizer}+{cfg.peft.method}", total=cfg.steps, completed=start)

    def start(self):
        self.bar.start()

    def update(self, step: int, record: dict):
        self.bar.update(self.task, advance=1, description=_describe(self.cfg, record))

    def stop(self):
        self.bar.stop()


class LineProgress:
    """For logs and pipes: `step 40/200 | loss 0.512 | accuracy 0.780 | 1.95 s/step | ETA 5m12s`, flushed."""

    def __init__(self, cfg: TrainConfig, start: int, timing: bool = True):
        self.cfg, self.start_step, self.every, self.timing = cfg, start, max(1, cfg.steps // 20), timing
        self.started = time.perf_counter()

    def start(self):
        print(f"{self.cfg.optimizer}+{self.cfg.peft.method}: training steps {self.start_step + 1}..{self.cfg.steps}",
              flush=True)

    def update(self, step: int, record: dict):
        if step % self.every and step != self.cfg.steps and "eval_accuracy" not in record:
            return
        fields = [f"step {step}/{self.cfg.steps}", *_shown(record)]
        if self.timing:
            rate = (time.perf_counter() - self.started) / max(step - self.start_step, 1)
            eta = int(rate * (self.cfg.steps - step))
            fields += [f"{rate:.2f} s/step", f"ETA {eta // 60}m{eta % 60:02d}s"]
        print(" | ".join(fields), flush=True)

    def stop(self):
        pass
