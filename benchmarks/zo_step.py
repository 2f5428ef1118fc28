"""Per-step time and peak memory of inference, backprop AdamW, naive MeZO and slimtune's ZO optimizers (SmolLM2-135M).

Each configuration runs in its own subprocess so peak memory (CUDA max allocated, or peak RSS on CPU) is its own.
Time: every step is timed right after two forward passes of the same model in the same process (its floor), and
`time_vs_two_forwards` is the ratio of the medians; comparing processes run minutes apart added up to +-20% of drift
on these CPUs (`time_vs_floor_process`, kept for reference, divides by the separate inference process instead).
Writes benchmarks/results/zo_step.json. Run by hand: `python benchmarks/zo_step.py [--batch 16 --steps 6]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = ["inference", "inference_lora", "adamw_full", "naive_mezo_full", "mezo_full", "mezo-pool_full",
           "mezo-rademacher_full", "lozo_full", "mezo_lora", "lozo_lora", "hybrid_lora", "adamw_lora"]
ROOT = Path(__file__).resolve().parents[1]


def naive_mezo_step(model, closure, seed, lr=1e-6, eps=1e-3):
    """The textbook version: out-of-place z per parameter, four sweeps (perturb, perturb, restore, update)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def sweep(scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.randn_like(p)
            p.data = p.data + scale * z

    sweep(eps)
    lp = closure().mean()
    sweep(-2 * eps)
    lm = closure().mean()
    sweep(eps)
    g = ((lp - lm) / (2 * eps)).item()
    sweep(-lr * g)


def run_one(name: str, batch_size: int, steps: int, device: str) -> dict:
    from slimtune.data import get_task, read_examples
    from slimtune.models import load_model_and_tokenizer
    from slimtune.optim import OptimizerArgs, build_optimizer
    from slimtune.peft import PeftSettings, apply_peft, peft_summary
    from slimtune.train.metrics import peak_memory_mb
    from slimtune.train.classification import encode, label_token_ids, per_example_losses

    task = get_task("sst2")
    examples = read_examples(str(ROOT / "slimtune/data/demo/sst2_demo_train.tsv"), task)[:batch_size]
    model, tok = load_model_and_tokenizer("smollm2", device=device)
    if name.endswith("_lora"):  # inference_lora: the fair floor for ZO+LoRA (same adapter forward cost)
        model = apply_peft(model, PeftSettings("lora", r=8))
    else:
        for p in model.parameters():
            p.requires_grad_(name != "inference")
    label_ids = label_token_ids(tok, task)
    batch = encode(tok, examples).to(device)
    closure = lambda: per_example_losses(model, batch, label_ids)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    optimizer = None
    if name.startswith(("mezo", "lozo", "adamw")):
        method, _, source = name.split("_")[0].partition("-")  # mezo-pool_full: MeZO with the pool source
        optimizer = build_optimizer(method, model, OptimizerArgs(lr=1e-6, eps=1e-3, rank=2, nu=50,
                                                                 perturbation=source or "gaussian"))
    elif name == "hybrid_lora":  # issue 36: AdamW through the top 2 blocks' LoRA and the head, MeZO below
        optimizer = build_optimizer("hybrid", model, OptimizerArgs(lr=1e-3, eps=1e-2, fo_lr=3e-3))
    model.train(name.startswith("adamw"))

    def two_forwards() -> None:  # the cost floor of any two-sided ZO step, on this very model
        with torch.inference_mode():
            closure()
            closure()

    def one_step(step: int) -> None:
        if name.startswith("inference"):
            two_forwards()
        elif name == "naive_mezo_full":
            with torch.inference_mode():
                naive_mezo_step(model, closure, seed=step)
        else:
            optimizer.step(closure)

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # Each step is timed right after two forward passes of the same model in the same process, so the ratio
    # compares like with like whatever the CPU's state (frequency, neighbours) was at that moment; medians of both.
    times, floors = [], []
    for step in range(steps + 1):  # first pair is warm-up
        floor, t = timed(two_forwards), timed(lambda: one_step(step))
        if step:
            times.append(t)
            floors.append(floor)
    return {"config": name, "device": device, "batch_size": batch_size, "step_time_s": statistics.median(times),
            "two_forwards_s": statistics.median(floors),
            "peak_mem_mb": peak_memory_mb(device), "trainable_params": peft_summary(model)["trainable_params"],
            "threads": torch.get_num_threads()}


def floor_of(name: str) -> str:
    """The inference row a configuration's process ratios divide by."""
    return "inference_lora" if name.endswith("_lora") else "inference"


def same_run_as_floor(doc: dict, name: str) -> bool:
    """Whether row `name` of a zo_step.json was measured in the same invocation and thread setting as its inference
    row (`floor_of`): a row merged in later with --only was not, so its time and memory over that row's mix two runs.
    Rows record their threads and (since --only) their invocation; rows without them are the file's first run."""
    rows = doc.get("results", {})
    row, floor = rows.get(name, {}), rows.get(floor_of(name), {})
    threads = lambda r: r.get("threads") or doc.get("threads")  # noqa: E731
    return threads(row) == threads(floor) and row.get("invocation") == floor.get("invocation")


def ratios_from(results: dict) -> dict:
    """Time: the step over two forwards timed in the same process (issue 13's measure); `time_vs_floor_process`
    divides by the separate inference process instead. Memory: peak over the inference process's peak (both process
    ratios mean something only for rows of one invocation: `same_run_as_floor`)."""
    floor = lambda name: results[floor_of(name)]  # noqa: E731
    return {name: {"time_vs_two_forwards": r["step_time_s"] / r["two_forwards_s"],
                   "time_vs_floor_process": r["step_time_s"] / floor(name)["step_time_s"],
                   "memory_vs_inference": r["peak_mem_mb"] / floor(name)["peak_mem_mb"]}
            for name, r in results.items()}


def targets_met(ratios: dict) -> dict:
    """Issue 13's targets (CPU, ratios from one run)."""
    time, mem = (lambda n: ratios[n]["time_vs_two_forwards"]), (lambda n: ratios[n]["memory_vs_inference"])
    return {"mezo_full_pool_le_1.5x_two_forwards": time("mezo-pool_full") <= 1.5,
            "lozo_full_le_1.2x_two_forwards": time("lozo_full") <= 1.2,
            "mezo_lora_le_1.05x_two_forwards": time("mezo_lora") <= 1.05,
            "zo_memory_le_1.05x_inference_pool_included": all(
                mem(n) <= 1.05 for n in ("mezo_full", "mezo-pool_full", "lozo_full", "mezo_lora", "lozo_lora"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/zo_step.json"))
    ap.add_argument("--only", nargs="+", choices=CONFIGS,
                    help="run these configurations and merge them into --out (the other rows and the file's thread "
                         "setting are kept; each row records its own threads)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.steps, args.device)))
        return
    previous = json.loads(Path(args.out).read_text()) if args.only and Path(args.out).exists() else {}
    results = dict(previous.get("results", {}))
    invocation = time.strftime("%Y-%m-%dT%H:%M:%S") if args.only else None  # rows merged in later say so
    for name in args.only or CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--steps",
                               str(args.steps), "--device", args.device], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        results[name] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                         **({"invocation": invocation} if invocation else {})}
        print(json.dumps(results[name]))
    ratios = ratios_from(results)
    targets = targets_met(ratios)
    out = {"results": results, "ratios": ratios, "targets_met": targets,
           "torch": torch.__version__, "threads": previous.get("threads", torch.get_num_threads()),
           "steps": args.steps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({"ratios": ratios, "targets_met": targets}, indent=2))


if __name__ == "__main__":
    main()
