"""Command line: `slimtune train | eval | merge | report | federate`."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from slimtune import SlimtuneError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # slimtune never downloads: no library may try to reach the Hub
# Deprecation notices from the libraries underneath are for their developers, not for slimtune's users.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|opacus|torch|flwr)\b")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft|opacus|torch|flwr)\b")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune LLMs when memory and privacy are the constraints.")
console = Console(width=None if sys.stdout.isatty() else 100)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 1000)
DEMO_DIR = Path(__file__).parent / "data" / "demo"


def _print_error(exc: Exception) -> None:
    """One line on stderr."""
    errors.print(f"[bold red]error:[/] {escape(' '.join(str(exc).split()))}", soft_wrap=True, highlight=False)


def _fail(exc: Exception) -> None:
    """One line on stderr, exit code 2."""
    _print_error(exc)
    raise typer.Exit(2)


@app.command()
def train(
    ctx: typer.Context,
    config_file: Optional[str] = typer.Option(None, "--config", help="YAML/JSON file of settings (flag names, or a "
                                              "run's config.json); flags given here override it"),
    data: Optional[str] = typer.Option(None, help="training data: .tsv/.csv/.jsonl file or hf:DIR (save_to_disk "
                                       "dataset); required, here or in --config"),
    out: str = typer.Option("runs/latest", help="run directory (metrics, checkpoint, adapter, summary)"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="evaluation data (same formats)"),
    model: str = typer.Option("smollm2", help="smollm2 (embedded default), tiny-llama, tiny-gpt2, or a local checkpoint dir"),
    task: str = typer.Option("sst2", help="sst2, rte, custom (classification) or generation (prompt -> completion)"),
    text_column: Optional[str] = typer.Option(None, help="text column (single-text tasks)"),
    label_column: Optional[str] = typer.Option(None, help="label column"),
    template: Optional[str] = typer.Option(None, help="prompt template: custom task '{text} It was'; generation "
                                           "'{input}\n' over the input column"),
    label_words: Optional[str] = typer.Option(None, help="custom task label words, e.g. '0=terrible,1=great'"),
    input_column: Optional[str] = typer.Option(None, help="generation, tables: prompt column (default input)"),
    target_column: Optional[str] = typer.Option(None, help="generation, tables: completion column (default target)"),
    max_new_tokens: int = typer.Option(64, help="generation: tokens generated per prompt at evaluation"),
    num_beams: int = typer.Option(1, help="generation: beam search width at evaluation (1: greedy)"),
    eval_generate: bool = typer.Option(True, "--eval-generate/--no-eval-generate",
                                       help="generation: decode at each evaluation (BLEU, ROUGE-L, EM, F1) or only "
                                       "compute loss/perplexity"),
    best_metric: Optional[str] = typer.Option(None, help="what --save best keeps: accuracy (default, classification), "
                                              "loss (default, generation), perplexity, bleu, rougeL, exact_match, f1"),
    optimizer: str = typer.Option("mezo", help="adamw, sgd, mezo, lozo, lozo-m, fzoo, dpzero, dplozo, dp-adamw, dp-sgd"),
    peft: str = typer.Option("lora", help="none, lora, pissa, adapter, svfit"),
    r: int = typer.Option(8, "--r", "--peft-r", help="LoRA/PiSSA rank, SVFit singular values, adapter bottleneck "
                          "(--peft-r under torchrun, which takes --r as its own --rdzv-* options)"),
    lora_alpha: float = typer.Option(16.0),
    lora_dropout: float = typer.Option(0.0),
    target_modules: Optional[str] = typer.Option(None, help="comma-separated layer names (default per architecture)"),
    svfit_relative: bool = typer.Option(True, "--svfit-relative/--svfit-absolute",
                                        help="SVFit: train multiplicative scales of the singular values "
                                        "or the values themselves"),
    learn_scale: bool = typer.Option(False, help="SVFit: also learn a scale per singular value"),
    pissa_niter: Optional[int] = typer.Option(None, help="PiSSA: randomized SVD with this many iterations (fast)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: per optimizer x PEFT, printed at start)"),
    eps: Optional[float] = typer.Option(None, help="ZO perturbation scale (default: per optimizer x PEFT)"),
    weight_decay: float = typer.Option(0.0),
    n_spsa: int = typer.Option(1),
    lozo_rank: int = typer.Option(2),
    lozo_nu: int = typer.Option(50),
    momentum: float = typer.Option(0.0),
    perturbation: str = typer.Option("gaussian", help="MeZO/DPZero direction z: gaussian, rademacher, or pool (slices "
                                     "of a seeded Gaussian pool: faster full-parameter ZO on CPU; see README)"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: 300 backprop, 2,000 zeroth-order)"),
    lr_scheduler: Optional[str] = typer.Option(None, help="default linear; constant, constant_with_warmup, linear, cosine, "
                                     "cosine_with_restarts, polynomial, inverse_sqrt (transformers' schedules)"),
    warmup_steps: Optional[int] = typer.Option(None, help="linear warm-up steps of the learning-rate schedule "
                                               "(default: 5% of the steps with backprop, none with ZO)"),
    save: str = typer.Option("best", help="adapter/ holds the best-evaluated adapter (best; needs --eval-data) "
                             "or the last one (last)"),
    batch_size: int = typer.Option(16),
    eval_every: int = typer.Option(50),
    eval_max: int = typer.Option(0, help="evaluate on at most this many examples (0: all)"),
    checkpoint_every: int = typer.Option(50),
    patience: int = typer.Option(0, help="early stopping after this many evaluations without improvement"),
    k_shot: int = typer.Option(0, help="k examples per class (0: all)"),
    seed: int = typer.Option(0),
    epsilon: Optional[float] = typer.Option(None, help="DP: target epsilon (noise is calibrated to it)"),
    delta: float = typer.Option(1e-5, help="DP: target delta"),
    noise_multiplier: Optional[float] = typer.Option(None, help="DP: fixed noise multiplier instead of calibrating"),
    clip: float = typer.Option(1.0, help="DP: clipping threshold C (the starting C with adaptive clipping)"),
    clipping: str = typer.Option("auto", help="DP: adaptive (C tracks --target-quantile of the per-example scalars, "
                                 "privately and accounted), fixed, or auto (adaptive for dpzero/dplozo)"),
    target_quantile: float = typer.Option(0.9, help="DP, adaptive clipping: fraction of scalars left unclipped"),
    clip_lr: float = typer.Option(0.2, help="DP, adaptive clipping: Q <- Q exp(-clip_lr (fraction below Q - target))"),
    clip_multiplier: float = typer.Option(2.0, help="DP, adaptive clipping: clip at C = clip_multiplier x Q"),
    sampling: str = typer.Option("poisson", help="DP: poisson (default, exact) or shuffle"),
    mechanism: str = typer.Option("gaussian", help="DP: gaussian or laplace"),
    accountant: str = typer.Option("rdp", help="DP: rdp (fast) or pld (tighter: less noise for the same epsilon)"),
    pld_discretization: float = typer.Option(1e-3, help="DP, PLD accountant: value discretisation (pessimistic)"),
    log_private_stats: bool = typer.Option(False, help="DP: also log training loss, batch sizes and clipped fractions "
                                           "of private batches (NOT covered by the guarantee)"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    dtype: str = typer.Option("float32"),
    max_length: int = typer.Option(256, help="truncate prompts to this many tokens (from the left)"),
    force: bool = typer.Option(False, help="train even if the memory model predicts the run will not fit"),
    resume: bool = typer.Option(False, help="continue the run in --out from its checkpoint"),
    quiet: bool = typer.Option(False, help="no progress bar"),
):
    """Fine-tune a causal LM on labelled text; writes metrics.jsonl, summary.json, checkpoint/ and adapter/."""
    from slimtune.config_file import TRAIN_FIELDS, apply_config
    from slimtune.train import prepare
    from slimtune.train import train as run_training

    try:
        p = apply_config(ctx, dict(ctx.params), config_file, TRAIN_FIELDS)
        config = _train_config(p)
    except SlimtuneError as exc:
        _fail(exc)
    resume = p["resume"]
    from slimtune.optim.defaults import describe
    try:
        run = prepare(config, resume=resume)
        console.print(f"hyper-parameters: {escape(describe(config, run.defaults_origin))}", highlight=False)
        summary = run_training(run)
    except SlimtuneError as exc:
        _fail(exc)
    from slimtune.report import print_summary
    print_summary([summary], console)
    console.print(f"run written to [bold]{config.out_dir}[/] (summary.json, metrics.jsonl, adapter/)")


def _train_config(p: dict):
    """TrainConfig from the train command's (flag or file) values."""
    from slimtune.optim import PRIVATE_OPTIMIZERS, OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.privacy import PrivacySpec
    from slimtune.train import TrainConfig
    from slimtune.train.objectives import GenerationSettings

    if not p["data"]:
        raise SlimtuneError("--data is required (on the command line or in --config)")
    privacy = None
    if p["optimizer"] in PRIVATE_OPTIMIZERS:
        target = p["epsilon"] if p["epsilon"] is not None or p["noise_multiplier"] is not None else 6.0
        privacy = PrivacySpec(target, p["delta"], p["noise_multiplier"], p["clip"], p["sampling"], p["mechanism"],
                              p["accountant"], p["pld_discretization"], p["clipping"], p["target_quantile"],
                              p["clip_lr"], p["clip_multiplier"])
    targets = p["target_modules"].split(",") if p["target_modules"] else None
    return TrainConfig(
        out_dir=p["out"], train_data=p["data"], eval_data=p["eval_data"], model=p["model"], task=p["task"],
        text_column=p["text_column"], label_column=p["label_column"], template=p["template"],
        label_words=p["label_words"], optimizer=p["optimizer"],
        optim=OptimizerArgs(p["lr"], p["weight_decay"], p["eps"], p["n_spsa"], p["seed"], p["lozo_rank"], p["lozo_nu"],
                            p["momentum"], p["perturbation"]),
        peft=PeftSettings(p["peft"], p["r"], p["lora_alpha"], p["lora_dropout"], targets, p["pissa_niter"],
                          p["learn_scale"], p["svfit_relative"]),
        generation=GenerationSettings(p["input_column"], p["target_column"], p["max_new_tokens"], p["num_beams"],
                                      p["eval_generate"]),
        best_metric=p["best_metric"], privacy=privacy, steps=p["steps"], batch_size=p["batch_size"], eval_every=p["eval_every"],
        eval_max=p["eval_max"], checkpoint_every=p["checkpoint_every"], patience=p["patience"], k_shot=p["k_shot"],
        seed=p["seed"], max_length=p["max_length"], device=_resolve_device(p["device"]), dtype=p["dtype"],
        progress=not p["quiet"], log_private_stats=p["log_private_stats"], lr_scheduler=p["lr_scheduler"],
        warmup_steps=p["warmup_steps"], save=p["save"], force=p["force"])


@app.command()
def demo(out: str = typer.Option("runs/demo"), steps: int = typer.Option(60), model: str = typer.Option("smollm2")):
    """Fine-tune the embedded SmolLM2 with ZO (MeZO) + LoRA on the bundled demo set and print the report."""
    import shutil
    shutil.rmtree(Path(out) / "fo-lora", ignore_errors=True)
    shutil.rmtree(Path(out) / "zo-lora", ignore_errors=True)
    common = dict(data=str(DEMO_DIR / "sst2_demo_train.tsv"), eval_data=str(DEMO_DIR / "sst2_demo_dev.tsv"),
                  model=model, peft="lora", steps=steps, batch_size=16, eval_every=max(steps // 3, 1))
    console.rule("zeroth-order (MeZO) + LoRA")
    _invoke_train(out=f"{out}/zo-lora", optimizer="mezo", lr=5e-3, eps=1e-2, **common)
    console.rule("first-order (AdamW) + LoRA, for comparison")
    _invoke_train(out=f"{out}/fo-lora", optimizer="adamw", **common)  # the adamw+lora defaults
    report(runs=[f"{out}/zo-lora", f"{out}/fo-lora"], out=f"{out}/report")


def _invoke_train(**kwargs):
    args = []
    for k, v in kwargs.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    from typer.main import get_command
    try:
        get_command(app).main(["train", *args], standalone_mode=False)
    except typer.Exit as exc:
        if exc.exit_code:
            raise


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    config_file: Optional[str] = typer.Option(None, "--config", help="YAML/JSON file of settings; flags override it"),
    data: Optional[str] = typer.Option(None, help="evaluation data (required, here or in --config)"),
    model: str = typer.Option("smollm2"),
    adapter: Optional[str] = typer.Option(None, help="a saved adapter directory (run_dir/adapter)"),
    task: str = typer.Option("sst2", help="sst2, rte, custom or generation"),
    text_column: Optional[str] = typer.Option(None),
    label_column: Optional[str] = typer.Option(None),
    template: Optional[str] = typer.Option(None, help="prompt template (custom task or generation)"),
    label_words: Optional[str] = typer.Option(None, help="custom task label words"),
    input_column: Optional[str] = typer.Option(None, help="generation, tables: prompt column"),
    target_column: Optional[str] = typer.Option(None, help="generation, tables: reference column"),
    max_new_tokens: int = typer.Option(64, help="generation: tokens generated per prompt"),
    num_beams: int = typer.Option(1, help="generation: beam search width (1: greedy)"),
    max_length: int = typer.Option(256, help="prompt (+ target) tokens kept"),
    predictions: Optional[str] = typer.Option(None, help="generation: write each prompt's output and references "
                                              "to this JSONL file"),
    batch_size: int = typer.Option(32),
    device: str = typer.Option("auto"),
):
    """Accuracy (classification) or loss, perplexity, BLEU, ROUGE-L, EM, F1 (generation) of a model, optionally with
    a trained adapter."""
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft import load_peft
    from slimtune.config_file import apply_config
    from slimtune.train.objectives import GenerationSettings, make_objective

    try:
        p = apply_config(ctx, dict(ctx.params), config_file, {})
        if not p["data"]:
            raise SlimtuneError("--data is required (on the command line or in --config)")
        if p["predictions"] and (p["task"] != "generation" or Path(p["predictions"]).exists()):
            raise SlimtuneError(f"--predictions {p['predictions']}: " + ("only for --task generation"
                                if p["task"] != "generation" else "exists (nothing was overwritten)"))
        objective = make_objective(p["task"], p["text_column"], p["label_column"], p["template"], p["label_words"],
                                   GenerationSettings(p["input_column"], p["target_column"], p["max_new_tokens"],
                                                      p["num_beams"], True, p["batch_size"]), p["max_length"],
                                   p["batch_size"])
        raw, texts = objective.load(p["data"], "validation")
        dev = _resolve_device(p["device"])
        m, tok = load_model_and_tokenizer(p["model"], device=dev, texts=texts, tokenizer_dir=p["adapter"])
        if p["adapter"]:
            m = load_peft(m, p["adapter"])
        objective.bind(tok)
        examples = objective.examples(raw, tok)
        outputs = [] if p["predictions"] else None
        res = objective.evaluate(m, examples, dev, predictions=outputs)
    except SlimtuneError as exc:
        _fail(exc)
    if outputs is not None:
        Path(p["predictions"]).write_text("".join(json.dumps(o) + "\n" for o in outputs))
    console.print_json(json.dumps({"examples": len(examples), **res}))


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, help="one prompt; the completion streams to the terminal"),
    input: Optional[str] = typer.Option(None, "--input", help="a file of prompts (.jsonl with prompt or messages, "
                                        ".tsv/.csv with --input-column, .txt one per line)"),
    output: Optional[str] = typer.Option(None, "--output", help="with --input: write {prompt, completion} JSONL here "
                                         "(default: print)"),
    model: str = typer.Option("smollm2", help="the base model the adapter was trained on"),
    adapter: Optional[str] = typer.Option(None, help="a saved adapter directory (run_dir/adapter)"),
    chat: bool = typer.Option(False, help="wrap each prompt as a user message in the model's chat template"),
    template: Optional[str] = typer.Option(None, help="prompt template over the input column, e.g. '{input}\n'"),
    input_column: Optional[str] = typer.Option(None, help="tables: the prompt column (default input)"),
    max_new_tokens: int = typer.Option(128),
    num_beams: int = typer.Option(1, help="beam search width (1: greedy; streaming needs 1)"),
    max_length: int = typer.Option(1024, help="prompt tokens kept (from the left)"),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("auto"),
):
    """Generate completions with a model and (optionally) a trained adapter."""
    from slimtune.generation.decode import DecodeSettings, generate_texts, stream_generate
    from slimtune.generation.prompts import prompt_texts, read_prompt_items, render_prompts
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft import load_peft

    try:
        if (prompt is None) == (input is None):
            raise SlimtuneError("give exactly one of --prompt or --input")
        if output and Path(output).exists():
            raise SlimtuneError(f"--output {output}: exists (nothing was overwritten)")
        if max_new_tokens < 1 or num_beams < 1 or batch_size < 1:
            raise SlimtuneError("--max-new-tokens, --num-beams and --batch-size must be >= 1")
        items = [prompt] if prompt is not None else read_prompt_items(input, input_column)
        dev = _resolve_device(device)
        m, tok = load_model_and_tokenizer(model, device=dev, texts=prompt_texts(items), tokenizer_dir=adapter)
        if adapter:
            m = load_peft(m, adapter)
        prompts = render_prompts(items, tok, template, input_column, chat)
        settings = DecodeSettings(max_new_tokens, num_beams, batch_size, max_length)
        if prompt is not None and num_beams == 1:
            stream_generate(m, tok, prompts[0], settings, dev)
            console.print()
            return
        outputs = generate_texts(m, tok, prompts, settings, dev)
    except SlimtuneError as exc:
        _fail(exc)
    if output:
        Path(output).write_text("".join(json.dumps({"prompt": p, "completion": o}) + "\n"
                                        for p, o in zip(prompts, outputs)))
        console.print(f"{len(outputs)} completions written to [bold]{output}[/]")
    else:
        for o in outputs:
            print(o, flush=True)


@app.command()
def merge(adapter: str = typer.Argument(..., help="adapter directory"), out: str = typer.Option(...),
          model: str = typer.Option("smollm2", help="the base model the adapter was trained on")):
    """Fold an adapter into the base weights and save a plain transformers checkpoint."""
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft import load_peft, merge_peft

    if Path(out).exists() and any(Path(out).iterdir()):
        _fail(SlimtuneError(f"{out}: exists and is not empty (nothing was overwritten)"))
    try:
        base, tok = load_model_and_tokenizer(model, tokenizer_dir=adapter)
        merged = merge_peft(load_peft(base, adapter))
    except SlimtuneError as exc:
        _fail(exc)
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    console.print(f"merged checkpoint written to [bold]{out}[/]")


@app.command()
def export(adapter: str = typer.Argument(..., help="an adapter directory (run_dir/adapter) or a merged checkpoint"),
           out: str = typer.Option(..., help="the .gguf file to write (never overwritten)"),
           format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama)"),
           quant: str = typer.Option("f16", help="f32, f16, bf16 or q8_0"),
           model: str = typer.Option("smollm2", help="the base model the adapter was trained on"),
           verify: bool = typer.Option(True, "--verify/--no-verify", help="reload the file with transformers and "
                                       "compare logits with the merged model")):
    """Merge an adapter into its base model and write one GGUF file (verified by reloading it)."""
    import torch

    from slimtune.export import export_gguf
    from slimtune.models import load_model_and_tokenizer
    from slimtune.models.loading import load_local
    from slimtune.peft import load_peft, merge_peft

    try:
        if format != "gguf":
            raise SlimtuneError(f"--format {format!r}: only gguf is supported")
        if Path(out).exists():
            raise SlimtuneError(f"--out {out}: exists (nothing was overwritten)")
        if not Path(adapter).is_dir():
            raise SlimtuneError(f"{adapter}: not a directory (an adapter directory or a merged checkpoint)")
        if (Path(adapter) / "config.json").exists():  # already a plain transformers checkpoint
            merged, tok = load_local(adapter, torch.float32)
        else:
            base, tok = load_model_and_tokenizer(model, tokenizer_dir=adapter)
            merged = merge_peft(load_peft(base, adapter))
        report = export_gguf(merged, tok, Path(out), quant, verify)
    except SlimtuneError as exc:
        _fail(exc)
    console.print_json(json.dumps(report))


@app.command()
def plan(model: str = typer.Option("smollm2", help="the model to plan for"),
         batch_size: int = typer.Option(16), max_length: int = typer.Option(128, help="tokens per example"),
         r: int = typer.Option(8, help="LoRA/PiSSA rank, SVFit values, adapter bottleneck"),
         device: str = typer.Option("auto", help="cpu, cuda or auto")):
    """Predicted peak memory of every optimizer x PEFT pair against the memory available here (what fits)."""
    from rich.table import Table

    from slimtune.models import load_model_and_tokenizer
    from slimtune.report.memory_model import plan_rows

    try:
        if batch_size < 1 or max_length < 1 or r < 1:
            raise SlimtuneError("--batch-size, --max-length and --r must be >= 1")
        dev = _resolve_device(device)
        m, _ = load_model_and_tokenizer(model, texts=["plan"])
        rows = plan_rows(m, batch_size, max_length, dev, r)
    except SlimtuneError as exc:
        _fail(exc)
    table = Table(title=f"{model}: batch {batch_size} x {max_length} tokens on {dev} "
                        f"(budget {rows[0]['budget_mb']:,.0f} MB = 90% of available)")
    for col in ("optimizer", "PEFT", "trainable", "peak MB", "fits"):
        table.add_column(col, justify="right" if col in ("trainable", "peak MB") else "left")
    for row in rows:
        table.add_row(row["optimizer"], row["peft"], f"{row['trainable_params']:,}", f"{row['peak_mb']:,.0f}",
                      "yes" if row["fits"] else "[red]no[/]")
    console.print(table)


@app.command()
def report(runs: list[str] = typer.Argument(..., help="run directories (each with summary.json)"),
           out: str = typer.Option("report", help="output directory for report.html, report.md and plots")):
    """Render an HTML + Markdown report comparing runs (table and plots)."""
    from slimtune.report import load_runs, print_summary, render_report

    try:
        loaded = load_runs(runs)
        paths = render_report(loaded, out)
    except SlimtuneError as exc:
        _fail(exc)
    print_summary([r.summary for r in loaded], console)
    console.print(f"report: [bold]{paths['html']}[/] and {paths['markdown']}")


@app.command()
def federate(
    ctx: typer.Context,
    config_file: Optional[str] = typer.Option(None, "--config", help="YAML/JSON file of settings (flag names or "
                                              "FederatedConfig fields); flags override it"),
    data: Optional[str] = typer.Option(None, help="training data, split across clients (required, here or in "
                                       "--config)"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="server-side evaluation data"),
    out: str = typer.Option("runs/federated"),
    model: str = typer.Option("smollm2"),
    task: str = typer.Option("sst2", help="sst2, rte or generation (clients train on the completion loss; the server "
                             "reports the loss of theta and Q(theta))"),
    input_column: Optional[str] = typer.Option(None, help="generation, tables: prompt column"),
    target_column: Optional[str] = typer.Option(None, help="generation, tables: completion column"),
    template: Optional[str] = typer.Option(None, help="generation: prompt template over the input column"),
    max_length: int = typer.Option(256, help="tokens per example (prompt + completion)"),
    clients: int = typer.Option(4),
    rounds: int = typer.Option(5),
    bits: int = typer.Option(4, help="broadcast precision: 1..8 bits (NF levels), or 32 for no quantization"),
    block_size: int = typer.Option(64),
    upload_bits: int = typer.Option(32, help="quantize client deltas too (32: fp32 uploads)"),
    local_steps: int = typer.Option(3, help="local steps per round (3: benchmarks/federated_sweep.py)"),
    local_optimizer: str = typer.Option("adamw", help="any slimtune optimizer"),
    lr: float = typer.Option(1e-3),
    eps: float = typer.Option(1e-3),
    batch_size: int = typer.Option(8),
    lora_r: int = typer.Option(8),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration over labels (small: non-IID)"),
    aggregation: str = typer.Option("fedavg", help="fedavg (FedIT) or ffa (FFA-LoRA, A frozen)"),
    server_optimizer: Optional[str] = typer.Option(None, help="server step on the aggregated update: fedavg, "
                                                   "fedavgm, fedadam, fedyogi (Flower's semantics); default: for "
                                                   "AdamW clients fedadam at server lr 3e-3 with --server-average 0.8 "
                                                   "(benchmarks/federated_sweep.py), else fedavg"),
    server_lr: Optional[float] = typer.Option(None, help="server learning rate (default: the swept one without "
                                              "--server-optimizer; else Flower's: 1 fedavg/fedavgm, 0.1 fedadam, "
                                              "0.01 fedyogi)"),
    server_momentum: float = typer.Option(0.9, help="fedavgm: server momentum"),
    server_average: Optional[float] = typer.Option(None, help="the server keeps an exponential moving average of its "
                                                   "iterates with this decay as its model (0: off; 0.8 ~ the last 5 "
                                                   "rounds; default: the swept one without --server-optimizer, else "
                                                   "0); clients still receive Q(theta) of the current iterate"),
    mode: str = typer.Option("lora", help="lora (deltas) or zo-seeds (FedKSeed-style seed/scalar pairs)"),
    client_dp_clip: float = typer.Option(0.0, help="client-level DP: L2 clip of each delta (0: off)"),
    client_dp_noise: float = typer.Option(0.0, help="client-level DP: noise multiplier"),
    eval_max: int = typer.Option(200),
    max_update_norm: float = typer.Option(1e3, help="server: reject client updates with a larger L2 norm"),
    robust: str = typer.Option("none", help="robust aggregation: none (weighted mean), median (coordinate-wise), "
                               "clip (each update clipped to the round's median norm)"),
    dither: float = typer.Option(0.0, help="fixed secret dither on the broadcast, in units of the largest "
                                 "quantization step (0: off; clients cannot subtract or average it away)"),
    clients_per_round: int = typer.Option(0, help="clients sampled to train each round (0: all)"),
    attack_coalition: int = typer.Option(0, help="measurement: score what k colluding clients rebuild of theta from "
                                         "the broadcasts (multi-round average, then fine-tuning on their pooled data); "
                                         "0: off"),
    attack_window: int = typer.Option(5, help="broadcasts the multi-round attack averages"),
    round_timeout: float = typer.Option(3600.0, help="seconds the server waits for a round's replies; simulated "
                                        "clients share this machine's CPUs, so a slow round would lose its updates"),
    seed: int = typer.Option(0),
):
    """Federated LoRA fine-tuning with model privacy (FedLPP) simulated on this machine with Flower."""
    from slimtune.federated import FederatedConfig, simulate
    from slimtune.report import print_summary

    from slimtune.config_file import FEDERATED_FIELDS, apply_config

    try:
        p = apply_config(ctx, dict(ctx.params), config_file, FEDERATED_FIELDS)
        if not p["data"]:
            raise SlimtuneError("--data is required (on the command line or in --config)")
        out = p["out"]
        if Path(out, "summary.json").exists():
            raise SlimtuneError(f"{out}: already holds a federated run (nothing was overwritten); choose another --out")
        cfg = FederatedConfig(
            data=p["data"], eval_data=p["eval_data"] or "", model=p["model"], task=p["task"],
            input_column=p["input_column"], target_column=p["target_column"], template=p["template"],
            max_length=p["max_length"],
            num_clients=p["clients"], rounds=p["rounds"], bits=p["bits"], block_size=p["block_size"],
            upload_bits=p["upload_bits"], local_steps=p["local_steps"], local_optimizer=p["local_optimizer"],
            lr=p["lr"], eps=p["eps"], batch_size=p["batch_size"], lora_r=p["lora_r"], dirichlet_alpha=p["alpha"],
            aggregation=p["aggregation"], server_optimizer=p["server_optimizer"], server_lr=p["server_lr"],
            server_momentum=p["server_momentum"], server_average=p["server_average"], mode=p["mode"], client_dp_clip=p["client_dp_clip"],
            client_dp_noise=p["client_dp_noise"], eval_max=p["eval_max"], max_update_norm=p["max_update_norm"], robust=p["robust"],
            dither=p["dither"], clients_per_round=p["clients_per_round"], attack_coalition=p["attack_coalition"],
            attack_window=p["attack_window"], round_timeout=p["round_timeout"], seed=p["seed"], out_dir=out)
        _validate_federated(cfg)
        summary = simulate(cfg)
    except SlimtuneError as exc:
        _fail(exc)
    print_summary([summary], console)
    console.print(f"server accuracy (theta) {summary['final_accuracy']}, client-visible accuracy (Q(theta)) "
                  f"{summary['client_visible_accuracy']}; run written to [bold]{out}[/]")
    if summary.get("rounds_with_lost_updates"):
        console.print(f"[yellow]warning:[/] rounds {summary['rounds_with_lost_updates']} lost client updates "
                      f"(rejected, failed or later than --round-timeout {cfg.round_timeout:g} s); see the log above")
    if summary.get("attack_best_score") is not None:
        console.print(f"best reconstruction by {summary['attack_coalition_clients']} colluding clients: "
                      f"{summary['attack_best_score']:.4g} (theta {summary['attack_theta_score']:.4g}, received "
                      f"{summary['attack_received_score']:.4g}, multi-round mean {summary['attack_multi_round_score']:.4g}"
                      f", coalition fine-tune {summary['attack_coalition_score']:.4g})")


def _validate_federated(cfg) -> None:
    from slimtune.federated.common import federated_objective
    cfg.validate()
    if not (1 <= cfg.bits <= 8 or cfg.bits == 32) or not (1 <= cfg.upload_bits <= 8 or cfg.upload_bits == 32):
        raise SlimtuneError("--bits/--upload-bits must be 1..8 or 32")
    if cfg.aggregation not in ("fedavg", "ffa") or cfg.mode not in ("lora", "zo-seeds"):
        raise SlimtuneError("--aggregation is fedavg or ffa; --mode is lora or zo-seeds")
    objective = federated_objective(cfg)  # fail here, with file/line, not inside a Ray worker
    for path in (cfg.data, cfg.eval_data):
        if path:
            raw, _ = objective.load(path, "train")
            if objective.kind == "generation" and "messages" not in raw[0][0][1]:
                objective.examples(raw, None)  # chat rows are checked once the tokenizer is loaded


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _resolve_device(device: str) -> str:
    return ("cuda" if _cuda() else "cpu") if device == "auto" else device


def main() -> None:  # pragma: no cover
    try:
        app()
    except SlimtuneError as exc:
        _print_error(exc)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
