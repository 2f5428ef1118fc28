"""Run `slimtune train` for a benchmark: a finished run (summary.json) is left alone, an unfinished one resumes from
its checkpoint, and the process gets `threads` torch threads (runs side by side, one per core, do not oversubscribe).
Results files are merged on write, so such runs keep each other's rows.

A run trained with another prompt than its flags give today (SST-2's default prompt changed; `run_prompt`) is kept
and reported as it is, marked in the tables, unless SLIMTUNE_RERUN_STALE_PROMPT=1: then it is moved to
benchmarks/results/before-prompt-change/ (kept, never deleted) and trained again with today's prompt."""

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


def run_prompt(run_dir: Path) -> tuple[str, str] | None:
    """(template, label words) a run trained with, from its config.json (runs that recorded null: the prompt of
    their time, train/resume.PROMPT_FOR_NULL); None for a generation run or no config."""
    from slimtune.train.resume import read_stored
    stored = read_stored(run_dir) if (run_dir / "config.json").exists() else None
    if not stored or stored.get("template") is None or stored.get("task") == "generation":
        return None
    return stored["template"], stored.get("label_words")


def prompt_of_flags(flags: list[str]) -> tuple[str, str] | None:
    """(template, label words) a new run with `flags` trains with today."""
    from slimtune.data.tasks import builtin_prompt, canonical_label_words
    given = {f: flags[flags.index(f) + 1] for f in ("--task", "--template", "--label-words") if f in flags}
    task = given.get("--task", "sst2")
    if task == "generation":
        return None
    own = builtin_prompt(task) or (None, None)
    return given.get("--template", own[0]), canonical_label_words(task, given.get("--label-words", own[1]))


def same_prompt(a: dict, b: dict) -> bool:
    """Whether two results entries trained with the same prompt (entries without one predate the record: SST-2's
    earlier prompt). Runs of different prompts are never compared: SST-2's prompt alone moved zero-shot accuracy
    from 0.52 to 0.78."""
    return (a.get("prompt") and tuple(a["prompt"])) == (b.get("prompt") and tuple(b["prompt"]))


def stale_prompt(run_dir: Path, flags: list[str]) -> bool:
    """Whether the run in `run_dir` trained with another prompt than `flags` give today."""
    recorded = run_prompt(run_dir)
    return recorded is not None and recorded != prompt_of_flags(flags)


def archive_stale(run_dir: Path) -> Path:
    """Move a run of an older prompt to benchmarks/results/before-prompt-change/<path under results>/ (a free name)."""
    results = Path(__file__).resolve().parent / "results"
    target = results / "before-prompt-change" / run_dir.resolve().relative_to(results)
    while target.exists():
        target = target.with_name(target.name + "-again")
    target.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(target)
    print(f"moved {run_dir} (trained with an earlier prompt) to {target}", flush=True)
    return target


def train_run(run_dir: Path, data: Path, eval_data: Path, flags: list[str], threads: int,
              stop_when=None) -> None:
    """`slimtune train --data data --eval-data eval_data --out run_dir --quiet *flags` (+ --resume when a checkpoint
    is there); nothing if the run has finished. A private run gets --log-private-stats (`private_stats`). With
    SLIMTUNE_RERUN_STALE_PROMPT=1 a run of an earlier prompt is archived first (`archive_stale`) and trained again.
    `stop_when(run_dir)`, polled every few seconds while it runs: once true, the run gets one Ctrl-C (SIGINT: it
    stops after the step in hand and checkpoints, status "interrupted"), which is then not an error."""
    if os.environ.get("SLIMTUNE_RERUN_STALE_PROMPT") == "1" and stale_prompt(run_dir, flags):
        archive_stale(run_dir)
    if (run_dir / "summary.json").exists():
        return
    resume = ["--resume"] if (run_dir / "checkpoint").exists() else []
    cmd = [sys.executable, "-m", "slimtune.cli", "train", "--data", str(data), "--eval-data", str(eval_data),
           "--out", str(run_dir), "--quiet", *flags, *private_stats(flags), *resume]
    print("+", " ".join(cmd), flush=True)
    if stop_when is None:
        subprocess.run(cmd, check=True, env=thread_env(threads))
        return
    import signal
    import time
    proc, asked = subprocess.Popen(cmd, env=thread_env(threads)), False
    while proc.poll() is None:
        time.sleep(2)
        if not asked and stop_when(run_dir):
            proc.send_signal(signal.SIGINT)
            asked = True
    if proc.returncode and not (asked and stop_when(run_dir)):
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def merged(path: Path, entries: dict) -> dict:
    """Re-read the results file, add `entries`, write it: runs beside each other keep each other's rows (each process
    read the file when it started, possibly hours earlier)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(entries)
    path.write_text(json.dumps(results, indent=2))
    return results
