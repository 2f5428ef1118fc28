"""Issue 36, the private target: why DP-hybrid + LoRA learns slowly. At epsilon 6 on the defaults sweep's train split,
300 steps, DP-hybrid ends at 0.663 (plateau from step 120) where DP-AdamW + LoRA reaches 0.804 in 150 steps and the
non-private hybrid 0.802 by step 120. Two runs take one part away each, same split, sampler, accountant and epsilon:

- `dphybrid-zo-off`: DP-hybrid with the ZO lr at 1e-9 (the top part's lr follows fo_lr x schedule, so it trains as
  before; the ZO scalar is still released and accounted): is the noised ZO part below what holds it back?
- `dp-adamw-top2`: DP-AdamW on the LoRA of the top 2 blocks only (one release a step; nothing below needs a gradient,
  so memory is the hybrid's): is it top-2-only training under DP noise?
- `adamw-top2`: the same top-2 LoRA by AdamW without DP: is it the top 2 blocks' capacity or the noise?
- `dphybrid-fo8`, `dphybrid-fo15`: DP-hybrid with 8 and 15 of the 30 blocks by backprop: what accuracy each step of
  memory buys under DP (DP-AdamW + LoRA, all 30 blocks by backprop, is the far end).

    python benchmarks/dphybrid_diagnosis.py --threads 1
"""

from __future__ import annotations

import argparse
import json

from defaults_sweep import OUT as SWEEP_OUT
from defaults_sweep import carve_split, disjoint
from dpzero_clipping import ROOT
from launch import merged, train_run

OUT = ROOT / "benchmarks" / "results" / "dphybrid_diagnosis"
TOP2 = ",".join(f"layers.{i}.self_attn.{m}" for i in (28, 29) for m in ("q_proj", "v_proj"))  # SmolLM2: 30 blocks
SHARED = ["--model", "smollm2", "--peft", "lora", "--steps", "300", "--lr-scheduler", "linear", "--batch-size", "16",
          "--eval-every", "60", "--checkpoint-every", "25", "--seed", "0"]
COMMON = [*SHARED, "--epsilon", "6"]
RUNS = {
    "dphybrid-zo-off": ["--optimizer", "dphybrid", "--lr", "1e-9", "--eps", "1e-2", "--fo-lr", "3e-3", *COMMON],
    "dp-adamw-top2": ["--optimizer", "dp-adamw", "--lr", "3e-3", "--target-modules", TOP2, *COMMON],
    # Is it capacity or noise? The same top-2 LoRA without DP (AdamW, one gradient a step, nothing accounted).
    "adamw-top2": ["--optimizer", "adamw", "--lr", "3e-3", "--target-modules", TOP2, *SHARED],
    # The memory / accuracy frontier: more blocks by backprop under DP (the planner's peak beside each).
    "dphybrid-fo8": ["--optimizer", "dphybrid", "--lr", "1e-3", "--eps", "1e-2", "--fo-lr", "3e-3",
                     "--fo-layers", "8", *COMMON],
    "dphybrid-fo15": ["--optimizer", "dphybrid", "--lr", "1e-3", "--eps", "1e-2", "--fo-lr", "3e-3",
                      "--fo-layers", "15", *COMMON],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    train, val = carve_split(SWEEP_OUT / "data")
    val = disjoint(train, val)  # private runs refuse evaluation rows they train on
    for name, flags in RUNS.items():
        if args.only and name not in args.only:
            continue
        train_run(OUT / name, train, val, flags, args.threads)
        summary = json.loads((OUT / name / "summary.json").read_text())
        curve = [(r["step"], r["eval_accuracy"]) for r in map(json.loads, (OUT / name / "metrics.jsonl").open())
                 if "eval_accuracy" in r]
        merged(OUT.with_suffix(".json"), {name: {"flags": flags, "curve": curve, **{
            k: summary.get(k) for k in ("final_accuracy", "epsilon", "noise_multiplier", "peak_mem_mb",
                                        "time_per_step_s", "trainable_params")}}})


if __name__ == "__main__":
    main()
