"""Selection runs on a split of SST-2 *train* with SmolLM2-135M: DPZero clipping (hand-set C vs adaptive) and
ZO + SVFit (relative parametrisation), against MeZO + LoRA with the same lr/eps.

Carves a validation split (500 examples, seed 0) from GLUE SST-2 train, trains on the rest, evaluates on the split
(never the dev set: this is for choosing the clipping rule). MeZO with the same lr/eps is the non-private reference.
Each run is its own `slimtune train` process; results land in benchmarks/results/dpzero_clipping/<name>/ and a
summary table in benchmarks/results/dpzero_clipping.json.
Usage: python benchmarks/dpzero_clipping.py [--steps 200] [--only NAME...] [--dev]   (--dev: report on full dev)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from launch import private_stats

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
OUT = ROOT / "benchmarks" / "results" / "dpzero_clipping"

ZO = ["--peft", "lora", "--lr", "2e-3", "--eps", "1e-2"]
PRIVATE = ["--optimizer", "dpzero", "--delta", "1e-5"]
RUNS = {
    "mezo-lora": ["--optimizer", "mezo", *ZO],
    "dpzero-fixed-c2-eps6": [*PRIVATE, *ZO, "--epsilon", "6", "--clipping", "fixed", "--clip", "2"],
    # clip at the tracked quantile itself (m = 1), the first design
    "dpzero-adaptive-q0.9-eps6": [*PRIVATE, *ZO, "--epsilon", "6", "--target-quantile", "0.9",
                                  "--clip-multiplier", "1"],
    "dpzero-adaptive-q0.9-clr1-eps6": [*PRIVATE, *ZO, "--epsilon", "6", "--target-quantile", "0.9", "--clip-lr", "1",
                                       "--clip-multiplier", "1"],
    "dpzero-adaptive-q0.98-c10-clr1-eps6": [*PRIVATE, *ZO, "--epsilon", "6", "--target-quantile", "0.98", "--clip",
                                            "10", "--clip-lr", "1", "--clip-multiplier", "1"],
    # the default since: clip at 2 x the tracked 0.9 quantile
    "dpzero-adaptive-eps2": [*PRIVATE, *ZO, "--epsilon", "2"],
    "dpzero-adaptive-q0.9-m2-eps6": [*PRIVATE, *ZO, "--epsilon", "6", "--target-quantile", "0.9", "--clip-multiplier",
                                     "2"],
    "dpzero-fixed-c10-eps6": [*PRIVATE, *ZO, "--epsilon", "6", "--clipping", "fixed", "--clip", "10"],
    "mezo-svfit-relative": ["--optimizer", "mezo", "--peft", "svfit", "--svfit-relative", "--lr", "2e-3", "--eps",
                            "1e-2"],
}


def carve_split(directory: Path, size: int = 500) -> tuple[Path, Path]:
    lines = (SST2 / "train.tsv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    random.Random(0).shuffle(rows)
    directory.mkdir(parents=True, exist_ok=True)
    train, val = directory / "train_rest.tsv", directory / "val.tsv"
    train.write_text("\n".join([header, *rows[size:]]) + "\n")
    val.write_text("\n".join([header, *rows[:size]]) + "\n")
    return train, val


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--dev", action="store_true", help="train on all of train, evaluate on the full dev set")
    args = ap.parse_args()
    if not SST2.exists():
        raise SystemExit(f"needs GLUE SST-2 at {SST2}")
    out = OUT / ("dev" if args.dev else "val")
    train, evaluation = ((SST2 / "train.tsv", SST2 / "dev.tsv") if args.dev else carve_split(out / "data"))
    results = {}
    for name in args.only or list(RUNS):
        run_dir = out / name
        if not (run_dir / "summary.json").exists():
            cmd = [sys.executable, "-m", "slimtune.cli", "train", "--data", str(train), "--eval-data", str(evaluation),
                   "--out", str(run_dir), "--model", "smollm2", "--steps", str(args.steps), "--batch-size", "16",
                   "--eval-every", str(args.steps // 5), "--seed", "0", "--quiet", *RUNS[name],
                   *private_stats(RUNS[name])]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        clips = [m["clip"] for m in metrics if "clip" in m]
        results[name] = {k: summary.get(k) for k in ("final_accuracy", "best_accuracy", "best_step", "epsilon",
                                                     "noise_multiplier", "quantile_noise", "time_per_step_s")}
        results[name]["clip_final"] = clips[-1] if clips else None
        results[name]["eval_curve"] = [(m["step"], m["eval_accuracy"]) for m in metrics if "eval_accuracy" in m]
    path = OUT / f"{'dev' if args.dev else 'val'}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**previous, **results}, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
