"""E2E NLG (data-to-text generation) with SmolLM2-135M: zero-shot, AdamW + LoRA, MeZO + LoRA, DPZero + LoRA (epsilon 6).

Data: ../shared/data/e2e (train.csv 4,116 pairs / 480 MRs; validation.csv 556 pairs / 67 MRs; see its README).
Training-time evaluation (loss, which picks the saved adapter) uses 40 MRs held out of *train* (split by MR, seed 0),
so nothing about validation.csv is used to choose a model; each saved adapter is then scored once on all of
validation.csv with `slimtune eval --task generation`: multi-reference BLEU (sacrebleu), ROUGE-L, loss, greedy
decoding, 64 new tokens. Hyper-parameters: the per-method defaults (no lr/eps flags); steps: backprop 300, ZO 2,000.
Finished runs are skipped and unfinished ones resume, so the script can be stopped and restarted.
Results: benchmarks/results/e2e/<name>/ and benchmarks/results/e2e.json; README table: tables.py e2e.
Usage: python benchmarks/e2e_generation.py [--only NAME...] [--threads N] [--gpu]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from launch import thread_env, train_run

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e"
OUT = ROOT / "benchmarks" / "results" / "e2e"
TEMPLATE = "Describe the restaurant in one sentence: {mr}\nDescription:"
TASK = ["--task", "generation", "--input-column", "mr", "--target-column", "ref", "--template", TEMPLATE,
        "--max-new-tokens", "64", "--model", "smollm2"]
RUNS = {
    "zero-shot": None,
    "adamw-lora": ["--optimizer", "adamw", "--peft", "lora", "--steps", "300"],
    "mezo-lora": ["--optimizer", "mezo", "--peft", "lora", "--steps", "2000"],
    "dpzero-lora-eps6": ["--optimizer", "dpzero", "--peft", "lora", "--steps", "2000", "--epsilon", "6"],
}


def split_by_mr(held_out: int = 40) -> tuple[Path, Path]:
    """train.csv minus `held_out` MRs, and those MRs' rows (the selection split)."""
    with (E2E / "train.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    mrs = sorted({r["mr"] for r in rows})
    random.Random(0).shuffle(mrs)
    chosen = set(mrs[:held_out])
    OUT.mkdir(parents=True, exist_ok=True)
    paths = OUT / "train_rest.csv", OUT / "select.csv"
    for path, keep in zip(paths, (lambda r: r["mr"] not in chosen, lambda r: r["mr"] in chosen)):
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["mr", "ref"])
            w.writeheader()
            w.writerows(r for r in rows if keep(r))
    return paths


def train(name: str, flags: list[str], train_csv: Path, select_csv: Path, threads: int, device: str) -> dict:
    run_dir = OUT / name
    steps = int(flags[flags.index("--steps") + 1])
    train_run(run_dir, train_csv, select_csv, ["--eval-every", str(steps // 6), "--no-eval-generate",
                                               "--checkpoint-every", "50", "--device", device, *TASK, *flags], threads)
    return json.loads((run_dir / "summary.json").read_text())


def score(name: str, adapter: Path | None, threads: int, device: str) -> dict:
    """One `slimtune eval` of the saved model on all of validation.csv (predictions kept beside it)."""
    preds = OUT / f"{name}.predictions.jsonl"
    preds.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "slimtune.cli", "eval", "--data", str(E2E / "validation.csv"), "--predictions",
           str(preds), "--batch-size", "16", "--device", device, *TASK]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, env=thread_env(threads), capture_output=True, text=True).stdout
    return {**json.loads(out[out.index("{"):]), "eval_time_s": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    if not E2E.exists():
        raise SystemExit(f"needs E2E NLG at {E2E}")
    device = "cuda" if args.gpu else "cpu"
    train_csv, select_csv = split_by_mr()
    path = OUT.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    for name, flags in RUNS.items():
        if args.only and name not in args.only:
            continue
        if name in results and results[name].get("validation"):
            continue
        row = {}
        if flags is not None:
            s = train(name, flags, train_csv, select_csv, args.threads, device)
            row = {k: s.get(k) for k in ("method", "peft", "trainable_params", "steps", "best_step", "best_eval_loss",
                                         "epsilon", "peak_mem_mb", "time_per_step_s", "saved_adapter")}
            row["train_time_s"] = (s.get("time_per_step_s") or 0) * s["steps"]
        row["validation"] = score(name, None if flags is None else OUT / name / "adapter", args.threads, device)
        results[name] = row
        path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
