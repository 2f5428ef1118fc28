"""Run `slimtune train` for a benchmark: a finished run (summary.json) is left alone, an unfinished one resumes from
its checkpoint, and the process gets `threads` torch threads (runs side by side, one per core, do not oversubscribe).
Results files are merged on write, so such runs keep each other's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def thread_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def private_stats(flags: list[str]) -> list[str]:
    """["--log-private-stats"] for a private run (its --optimizer is a DP one) that does not ask already: the benchmarks
    train on public data and report step times and peak memory, which a private run withholds by default."""
    from slimtune.optim.methods import PRIVATE
    optimizer = flags[flags.index("--optimizer") + 1] if "--optimizer" in flags else None
    return ["--log-private-stats"] if optimizer in PRIVATE and "--log-private-stats" not in flags else []


def train_run(run_dir: Path, data: Path, eval_data: Path, flags: list[str], threads: int) -> None:
    """`slimtune train --data data --eval-data eval_data --out run_dir --quiet *flags` (+ --resume when a checkpoint
    is there); nothing if the run has finished. A private run gets --log-private-stats (`private_stats`)."""
    if (run_dir / "summary.json").exists():
        return
    resume = ["--resume"] if (run_dir / "checkpoint").exists() else []
    cmd = [sys.executable, "-m", "slimtune.cli", "train", "--data", str(data), "--eval-data", str(eval_data),
           "--out", str(run_dir), "--quiet", *flags, *private_stats(flags), *resume]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=thread_env(threads))


def merged(path: Path, entries: dict) -> dict:
    """Re-read the results file, add `entries`, write it: runs beside each other keep each other's rows (each process
    read the file when it started, possibly hours earlier)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(entries)
    path.write_text(json.dumps(results, indent=2))
    return results
