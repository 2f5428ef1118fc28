"""SST-2 or RTE with SmolLM2-135M on CPU at a small fixed budget: FO vs ZO vs DPZero x none / LoRA / PiSSA / SVFit.

Runs `slimtune train` once per configuration (each its own process, so peak memory is its own), then renders the
report. Needs ../shared/data/<task>. Usage: python benchmarks/glue_grid.py [--task rte] [--scale 0.5] [--only NAME...]
[--gpu]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from launch import private_stats

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

COMMON = ["--model", "smollm2", "--quiet", "--seed", "0"]
GRID = {
    "fo-lora": ["--optimizer", "adamw", "--peft", "lora", "--lr", "1e-3", "--steps", "150"],
    "fo-lora-lr3e-4": ["--optimizer", "adamw", "--peft", "lora", "--lr", "3e-4", "--steps", "150"],
    "fo-pissa": ["--optimizer", "adamw", "--peft", "pissa", "--lr", "1e-4", "--steps", "150"],
    "fo-svfit": ["--optimizer", "adamw", "--peft", "svfit", "--lr", "2e-2", "--steps", "150"],
    "fo-full": ["--optimizer", "adamw", "--peft", "none", "--lr", "1e-5", "--steps", "100"],
    "dp-adamw-lora-eps6": ["--optimizer", "dp-adamw", "--peft", "lora", "--lr", "1e-3", "--steps", "100",
                           "--epsilon", "6", "--delta", "1e-5", "--clip", "1"],
    "zo-svfit": ["--optimizer", "mezo", "--peft", "svfit", "--lr", "5e-2", "--eps", "1e-2", "--steps", "200"],
    "zo-pissa": ["--optimizer", "mezo", "--peft", "pissa", "--lr", "2e-4", "--eps", "1e-2", "--steps", "200"],
    "zo-lora": ["--optimizer", "mezo", "--peft", "lora", "--lr", "2e-3", "--eps", "1e-2", "--steps", "200"],
    "lozo-full": ["--optimizer", "lozo", "--peft", "none", "--lr", "1e-6", "--eps", "1e-3", "--steps", "200"],
    "dpzero-lora-eps6": ["--optimizer", "dpzero", "--peft", "lora", "--lr", "2e-3", "--eps", "1e-2", "--steps", "200",
                         "--epsilon", "6", "--delta", "1e-5", "--clip", "2"],
    "dpzero-lora-eps2": ["--optimizer", "dpzero", "--peft", "lora", "--lr", "2e-3", "--eps", "1e-2", "--steps", "200",
                         "--epsilon", "2", "--delta", "1e-5", "--clip", "2"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="sst2", choices=["sst2", "rte"])
    ap.add_argument("--out", help="default: benchmarks/results/<task>")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every run's steps (RTE prompts are longer)")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--gpu", action="store_true", help="GPU mode: batch 64, full dev set, 4x the steps")
    args = ap.parse_args()
    scale = (4 if args.gpu else 1) * args.scale
    args.out = args.out or str(ROOT / "benchmarks" / "results" / args.task)
    DATA = SHARED / args.task
    common = [*COMMON, "--task", args.task, "--batch-size", "64" if args.gpu else "16", "--eval-max", "0" if args.gpu else "200",
              "--device", "cuda" if args.gpu else "cpu"]
    if not DATA.exists():
        raise SystemExit(f"needs GLUE {args.task} at {DATA}")
    names = args.only or list(GRID)
    for name in names:
        grid = list(GRID[name])
        at = grid.index("--steps") + 1
        grid[at] = steps = str(int(int(grid[at]) * scale))
        cmd = [sys.executable, "-m", "slimtune.cli", "train", "--data", str(DATA / "train.tsv"), "--eval-data",
               str(DATA / "dev.tsv"), "--out", f"{args.out}/{name}", "--eval-every", str(int(steps) // 5), *common, *grid,
               *private_stats(grid)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    runs = [f"{args.out}/{n}" for n in GRID if (Path(args.out) / n / "summary.json").exists()]
    subprocess.run([sys.executable, "-m", "slimtune.cli", "report", *runs, "--out", f"{args.out}/report"], check=True)


if __name__ == "__main__":
    main()
