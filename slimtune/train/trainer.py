"""The training loop: sample, step, log, evaluate, checkpoint, stop early or when the privacy budget is spent.

Private runs (dpzero, dplozo, dp-sgd, dp-adamw) draw their noise and Poisson batches from a secret seed (OS entropy,
kept only in checkpoint/secret.json) and log only what is released or post-processed: the noisy scalar
(`projected_grad`, ZO), epsilon/delta/noise multiplier, and evaluations on the eval data. The training loss, realised
batch sizes, clipped fractions and per-step timing/memory are functions of the private batch and are logged only
with `log_private_stats` (not covered by the guarantee; a warning says so).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
import tempfile
from pathlib import Path

import torch

from slimtune import SlimtuneError, distributed
from slimtune.data import EpochSampler, PoissonSampler, k_shot
from slimtune.optim import PRIVATE_OPTIMIZERS, OptimizerArgs, build_optimizer
from slimtune.optim.base import mix_seed
from slimtune.optim.defaults import resolve as resolve_defaults
from slimtune.optim.schedule import lr_multiplier
from slimtune.peft import PeftSettings, apply_peft, peft_summary, save_peft
from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec, Segment, plan
from slimtune.privacy.secret import NOISE, SAMPLING, fresh_secret, seed_for
from slimtune.train.checkpoint import load_checkpoint, read_state, save_checkpoint
from slimtune.train.metrics import MetricsLog, peak_memory_mb
from slimtune.train.objectives import (GenerationSettings, build_objective, check_best_metric, is_better,
                                       load_model_and_data)


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


# What a private run's per-step record may contain: released or post-processed values only.
RELEASED_KEYS = ("step", "lr", "projected_grad", "clip", "epsilon", "delta", "noise_multiplier")


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
    secret: dict | None = None  # private runs: the secret seed of noise and sampling (checkpoint only)
    start_step: int = 0
    best_eval: dict | None = None  # the best evaluation's metrics (names without the eval_ prefix)
    best_step: int | None = None
    evals_without_improvement: int = 0
    lr_multiplier: object = None  # step -> factor on config.optim.lr
    step_times: list = field(default_factory=list)  # private runs: kept in memory for the summary's mean only
    defaults_origin: dict = field(default_factory=dict)  # setting -> "default" (from optim/defaults.py) or "given"
    world: distributed.World = field(default_factory=distributed.World)  # torchrun data-parallel ZO: rank, size

    @property
    def label_ids(self) -> list:  # classification: the label words' token ids
        return self.objective.label_ids

    @property
    def best_accuracy(self) -> float | None:
        return (self.best_eval or {}).get("accuracy")


def prepare(config: TrainConfig, resume: bool = False) -> Run:
    out = Path(config.out_dir)
    origin = resolve_defaults(config)  # config.json stores the resolved values
    validate(config)
    multiplier = lr_multiplier(config.lr_scheduler, config.steps, config.warmup_steps)
    world = distributed.setup(config.device)
    distributed.check_supported(config.optimizer, world)
    if not resume and (out / "checkpoint").exists():
        raise SlimtuneError(f"{out}: already holds a run (checkpoint/); pass --resume to continue it or choose "
                            "another --out (nothing was overwritten)")
    distributed.barrier(world)  # every rank has checked before rank 0 writes anything
    objective = build_objective(config)
    config.best_metric = check_best_metric(objective, config.best_metric)
    model, tokenizer, train_examples, eval_examples = load_model_and_data(
        objective, config.model, config.train_data, config.eval_data, config.seed, getattr(torch, config.dtype),
        config.device)
    classes = len(objective.task.label_words)
    train_examples = k_shot(train_examples, config.k_shot, config.seed, classes)
    if config.eval_max and len(eval_examples) > config.eval_max:
        eval_examples = k_shot(eval_examples, config.eval_max // classes, config.seed, classes)
    if not config.force:
        check_memory(config, model, tokenizer, objective.texts(train_examples))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = apply_peft(model, config.peft, work_dir=out if world.main else Path(tempfile.mkdtemp()))
    if not any(p.requires_grad for p in model.parameters()):
        raise SlimtuneError(f"--peft {config.peft.method}: the model has no trainable parameters (nothing to train)")
    private, accountant, secret = None, None, None
    if config.optimizer in PRIVATE_OPTIMIZERS:
        config.privacy = config.privacy or PrivacySpec(target_epsilon=6.0)  # the default budget, enforced like any
        accountant, secret = _private_setup(config, out, len(train_examples), resume)
        secret = distributed.broadcast(secret, world)  # one secret: the same noise and batches on every rank
        private = (config.privacy, accountant.noise, config.batch_size, seed_for(secret["seed"], NOISE),
                   accountant.quantile_noise)
        sampler = (EpochSampler if config.privacy.sampling == "shuffle" else PoissonSampler)(
            len(train_examples), config.batch_size, seed_for(secret["seed"], SAMPLING))
        if config.log_private_stats:
            warnings.warn("--log-private-stats: metrics.jsonl will hold the training loss, realised batch sizes and "
                          "clipped fractions of private batches; they are not noised or accounted, so the run's "
                          "logs are NOT covered by its (epsilon, delta) guarantee", stacklevel=2)
    else:
        sampler = EpochSampler(len(train_examples), config.batch_size, config.seed)
    optimizer = build_optimizer(config.optimizer, model, config.optim, private)
    run = Run(config, model, tokenizer, optimizer, train_examples, eval_examples, objective, sampler, accountant, secret,
              lr_multiplier=multiplier, defaults_origin=origin, world=world)
    if resume:
        state = load_checkpoint(out / "checkpoint", model, optimizer)
        run.start_step = state["step"]
        run.best_eval, run.best_step = state.get("best_eval"), state.get("best_step")
        run.evals_without_improvement = state.get("evals_without_improvement", 0)
        if world.main:
            MetricsLog(out / "metrics.jsonl").truncate_after(run.start_step)
    elif world.main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    return run


def validate(config: TrainConfig) -> None:
    """Settings errors before any data or model is loaded: one line naming the flag and what it accepts."""
    from slimtune.optim import OPTIMIZERS
    from slimtune.peft.registry import check_settings
    from slimtune.privacy.accountant import check_names

    if config.optimizer not in OPTIMIZERS:
        raise SlimtuneError(f"unknown --optimizer {config.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    for flag, value, low in (("--steps", config.steps, 1), ("--batch-size", config.batch_size, 1),
                             ("--eval-every", config.eval_every, 0), ("--checkpoint-every", config.checkpoint_every, 1),
                             ("--n-spsa", config.optim.n_spsa, 1), ("--max-length", config.max_length, 1)):
        if value < low:
            raise SlimtuneError(f"{flag} must be >= {low}, got {value}")
    from slimtune.zo.perturbation import check_perturbation
    check_perturbation(config.optim.perturbation, config.optimizer)
    if config.save not in ("best", "last"):
        raise SlimtuneError(f"--save {config.save!r}: choose best or last")
    check_settings(config.peft)
    if config.privacy is not None:
        check_names(config.privacy)


def check_memory(config: TrainConfig, model, tokenizer, texts: list[str]) -> None:
    """Refuse a run the memory model predicts will not fit here (before PEFT and any step), naming the pairs that
    would. `model` is the base model, before PEFT; `texts` what one example feeds the model."""
    from slimtune.report.memory_model import budget_mb, plan_rows, predict_run_mb

    sample = texts[:2000]
    seq_len = min(config.max_length, max((len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"]),
                                         default=1))
    peak, _ = predict_run_mb(model, config.optimizer, config.peft.method, config.peft.r, config.batch_size, seq_len,
                             config.device, config.peft.target_modules)
    budget = budget_mb(config.device)
    if peak <= budget:
        return
    fitting = [f"{r['optimizer']}+{r['peft']} ({r['peak_mb']:,.0f} MB)" for r in
               plan_rows(model, config.batch_size, seq_len, config.device, config.peft.r) if r["fits"]]
    raise SlimtuneError(f"{config.optimizer}+{config.peft.method} at batch {config.batch_size} x {seq_len} tokens is "
                        f"predicted to peak at {peak:,.0f} MB, over the {budget:,.0f} MB available here; "
                        f"what fits: {', '.join(fitting) or 'nothing (lower --batch-size or --max-length)'}; "
                        "--force to try anyway")


def releases_per_step(config: TrainConfig) -> int:
    """Noisy scalars a private step releases on one batch: n-SPSA's n for the ZO optimizers, one gradient for DP-SGD."""
    return config.optim.n_spsa if config.optimizer in ("dpzero", "dplozo") else 1


def adaptive_clipping(config: TrainConfig) -> bool:
    """DPZero/DPLOZO clip adaptively unless told --clipping fixed (or with Laplace noise); DP-SGD clips at a fixed C."""
    spec, zo = config.privacy, config.optimizer in ("dpzero", "dplozo")
    if spec.clipping == "adaptive" and not zo:
        raise SlimtuneError(f"--clipping adaptive is implemented for dpzero and dplozo; {config.optimizer} clips at "
                            "a fixed --clip (use --clipping fixed)")
    return zo and (spec.clipping == "adaptive" or (spec.clipping == "auto" and spec.mechanism == "gaussian"))


def _private_setup(config: TrainConfig, out: Path, num_examples: int, resume: bool) -> tuple[PrivacyAccountant, dict]:
    """The accountant (past segments composed at their own rates on resume) and the run's secret."""
    spec, releases = config.privacy, releases_per_step(config)
    adaptive = adaptive_clipping(config)
    state, secret = read_state(out / "checkpoint") if resume else ({}, None)
    if not state:
        return (plan(spec, num_examples, config.batch_size, config.steps, releases, adaptive),
                {"seed": fresh_secret()})
    if secret is None:
        raise SlimtuneError(f"{out}/checkpoint: no secret.json; this private run cannot be resumed with the same noise "
                            "and batches (start a new run in another --out)")
    saved = state.get("privacy") or {}
    for key in ("sampling", "mechanism", "accountant"):
        if key in saved and saved[key] != getattr(spec, key):
            raise SlimtuneError(f"--{key} {getattr(spec, key)} differs from the run being resumed ({saved[key]}); "
                                "its accounting cannot change mid-run")
    noise = state["noise_multiplier"]  # a resumed run keeps its noise; the loop stops when the budget runs out
    past = [Segment.from_dict(d) for d in state.get("privacy_history") or
            [dict(steps=state["step"], num_examples=num_examples, batch_size=config.batch_size,
                  noise_multiplier=noise)]]
    quantile_noise = past[-1].quantile_noise if adaptive else 0.0
    if adaptive and not quantile_noise:
        raise SlimtuneError("the run being resumed clipped at a fixed C: resume it with --clipping fixed")
    return PrivacyAccountant(spec, num_examples, config.batch_size, noise, releases, past, quantile_noise), secret


def train(run: Run) -> dict:
    """Run from `run.start_step` to `config.steps`; returns the summary (also written to summary.json)."""
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
        while step < cfg.steps:
            if run.accountant and run.accountant.spec.target_epsilon is not None \
                    and run.accountant.epsilon(step + 1) > run.accountant.spec.target_epsilon * 1.001:
                stop_reason = "privacy budget exhausted"
                break
            record = _train_step(run, step)
            step += 1
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps) and run.eval_examples:
                record.update(_evaluate(run))
                if _track_best(run, step, record):
                    stop_reason = "early stopping"
            log.write(record)
            if progress:
                progress.update(step, record)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop_reason != "completed":
                _checkpoint(run, step)
            if stop_reason != "completed":
                break
    finally:
        if progress:
            progress.stop()
    _checkpoint(run, step)
    if cfg.save == "last" or run.best_step is None:  # "best" without evaluations: the last is all there is
        _save_adapter(run)
    return write_summary(run, step, stop_reason)


def _train_step(run: Run, step: int) -> dict:
    cfg = run.config
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
    if indices and not math.isfinite(result.loss):
        raise SlimtuneError(f"training loss is {result.loss} at step {step + 1} ({cfg.optimizer}, lr={cfg.optim.lr}); "
                            f"lower --lr or --eps; the last good checkpoint is in {cfg.out_dir}/checkpoint")
    record = {"step": step + 1, "lr": lr, "loss": result.loss, "step_time_s": elapsed, "batch_size": len(indices),
              "peak_mem_mb": peak_memory_mb(cfg.device), **result.info}
    if run.accountant:
        record.update(epsilon=run.accountant.epsilon(step + 1), delta=run.accountant.spec.delta,
                      noise_multiplier=run.accountant.noise)
        run.step_times.append(elapsed)
        if not cfg.log_private_stats:
            record = {k: v for k, v in record.items() if k in RELEASED_KEYS}
    return record


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
    """Write adapter/ through a temporary directory so a crash never leaves a half-written adapter."""
    if not run.world.main:
        return
    out = Path(run.config.out_dir)
    tmp, final, old = out / "adapter.tmp", out / "adapter", out / "adapter.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_peft(run.model, tmp, work_dir=out)
    run.tokenizer.save_pretrained(tmp)  # eval/merge rebuild exactly this base (tiny models fit their vocabulary)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint(run: Run, step: int) -> None:
    if not run.world.main:
        return
    acc = run.accountant
    privacy = {} if acc is None else {
        "noise_multiplier": acc.noise, "epsilon": acc.epsilon(step),
        "privacy": {k: getattr(acc.spec, k) for k in ("sampling", "mechanism", "accountant")},
        "privacy_history": [asdict(seg) for seg in acc.history(step)]}
    save_checkpoint(Path(run.config.out_dir) / "checkpoint", run.model, run.optimizer,
                    {"step": step, "best_eval": run.best_eval, "best_step": run.best_step,
                     "evals_without_improvement": run.evals_without_improvement, **privacy}, secret=run.secret)


def write_summary(run: Run, step: int, stop_reason: str) -> dict:
    from slimtune.train.metrics import read_jsonl

    cfg, out = run.config, Path(run.config.out_dir)
    if not run.world.main:
        return {}
    records = read_jsonl(out / "metrics.jsonl")
    evals = [r for r in records if r.get("eval_loss") is not None]
    final = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}
    best = run.best_eval or {}
    times = [r["step_time_s"] for r in records if r.get("step_time_s")] or run.step_times  # private: run-level mean
    summary = {
        "method": cfg.optimizer, "peft": cfg.peft.method, "model": cfg.model, "task": cfg.task,
        **peft_summary(run.model),
        "peak_mem_mb": max([r.get("peak_mem_mb") or 0 for r in records] + [peak_memory_mb(cfg.device)]),
        "time_per_step_s": (sum(times) / len(times)) if times else None,
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
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class _NoLog:
    def write(self, record: dict) -> None:
        pass


def _gather_bytes(run: Run, steps: int) -> int:
    """Data-parallel runs: bytes all ranks sent in the loss all-gathers, one per forward pass, at the expected batch
    size (the realised sizes of private Poisson batches are not released)."""
    if not run.world.parallel:
        return 0
    return (run.optimizer.forwards_per_step * steps * run.world.size
            * distributed.bytes_per_gather(run.config.batch_size, run.world))


def _progress(cfg: TrainConfig, start: int):
    """A rich progress bar on a terminal; a plain line every ~5% of the run (and at evaluations) otherwise."""
    if not cfg.progress:
        return None
    if sys.stdout.isatty():
        return BarProgress(cfg, start)
    return LineProgress(cfg, start)


class BarProgress:
    def __init__(self, cfg: TrainConfig, start: int):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.cfg = cfg
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), transient=False)
        self.task = self.bar.add_task(f"{cfg.optimizer}+{cfg.peft.method}", total=cfg.steps, completed=start)

    def start(self):
        self.bar.start()

    def update(self, step: int, record: dict):
        self.bar.update(self.task, advance=1, description=_describe(self.cfg, record))

    def stop(self):
        self.bar.stop()


class LineProgress:
    """For logs and pipes: `step 40/200 | loss 0.512 | accuracy 0.780 | 1.95 s/step | ETA 5m12s`, flushed."""

    def __init__(self, cfg: TrainConfig, start: int):
        self.cfg, self.start_step, self.every = cfg, start, max(1, cfg.steps // 20)
        self.started = time.perf_counter()

    def start(self):
        print(f"{self.cfg.optimizer}+{self.cfg.peft.method}: training steps {self.start_step + 1}..{self.cfg.steps}",
              flush=True)

    def update(self, step: int, record: dict):
        if step % self.every and step != self.cfg.steps and "eval_accuracy" not in record:
            return
        rate = (time.perf_counter() - self.started) / max(step - self.start_step, 1)
        eta = int(rate * (self.cfg.steps - step))
        fields = [f"step {step}/{self.cfg.steps}", *_shown(record), f"{rate:.2f} s/step",
                  f"ETA {eta // 60}m{eta % 60:02d}s"]
        print(" | ".join(fields), flush=True)

    def stop(self):
        pass
