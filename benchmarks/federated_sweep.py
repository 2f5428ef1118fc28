"""The recorded sweep behind FedLPP's server-optimizer and local-training settings (issue 14, item 1).

Issue 14's setting at a sweep budget: the first 2,000 SST-2 training rows over 8 clients by Dirichlet(0.5) over
labels, 4 sampled per round, batch 16, LoRA r=8, a 4-bit broadcast, 10 rounds (the reported runs use 30). Each
candidate changes the server optimizer, its learning rate / momentum, server-side iterate averaging, or the clients'
local steps and learning rate. Selection never sees SST-2 dev: every candidate is scored on the next 200 *training*
rows (2,000..2,199, held by no client), and the winner is the best mean server accuracy over the last 3 rounds (the
last round alone rewards a lucky point of an oscillating trajectory). One seed.

Results: benchmarks/results/federated_sweep.json, runs under benchmarks/results/federated_sweep/; README table:
`python benchmarks/readme_tables.py federated-sweep`. A finished candidate is kept (delete its directory to re-run it).
Usage: python benchmarks/federated_sweep.py [--only NAME...] [--threads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from federated_table import DATA, ROOT
from launch import merged

OUT = ROOT / "benchmarks" / "results" / "federated_sweep"
TRAIN_ROWS, SELECT_ROWS, LAST = 2000, 200, 3
BASE = {"server_optimizer": "fedavgm", "server_lr": None, "server_momentum": 0.9, "server_average": 0.0,
        "local_steps": 3, "lr": 1e-3}
# name -> what differs from BASE (the 30-round run of federated_attacks.py)
CANDIDATES = {
    "fedavgm-m0.9": {},
    "fedavgm-m0.5": {"server_momentum": 0.5},
    "fedadam-slr1e-3": {"server_optimizer": "fedadam", "server_lr": 1e-3},
    "fedadam-slr3e-3": {"server_optimizer": "fedadam", "server_lr": 3e-3},
    "fedadam-slr1e-2": {"server_optimizer": "fedadam", "server_lr": 1e-2},
    "fedadam-slr3e-3-avg0.8": {"server_optimizer": "fedadam", "server_lr": 3e-3, "server_average": 0.8},
    "fedadam-slr3e-3-local5": {"server_optimizer": "fedadam", "server_lr": 3e-3, "local_steps": 5},
    "fedadam-slr3e-3-lr2e-3": {"server_optimizer": "fedadam", "server_lr": 3e-3, "lr": 2e-3},
}


def rows(start: int, n: int, work: Path, name: str) -> Path:
    """SST-2 training rows start..start+n-1 as a TSV with the header."""
    lines = (DATA / "train.tsv").read_text().splitlines()
    path = work / f"{name}.tsv"
    path.write_text("\n".join([lines[0], *lines[1 + start:1 + start + n]]) + "\n")
    return path


def score(round_metrics: list[dict], last: int = LAST) -> dict:
    """Selection scores of one run from its per-round server accuracies (round 0 is the start, not a result)."""
    acc = [m["server_accuracy"] for m in round_metrics if m.get("round", 0) > 0 and "server_accuracy" in m]
    if not acc:
        return {"accuracy": [], "final": None, "mean_last": None}
    tail = acc[-last:]
    return {"accuracy": acc, "final": acc[-1], "mean_last": sum(tail) / len(tail)}


def choose(results: dict) -> str | None:
    """The candidate with the best mean of the last rounds (ties: the earlier-listed, i.e. simpler, one)."""
    done = [(name, r["mean_last"]) for name, r in results.items() if r.get("mean_last") is not None]
    if not done:
        return None
    order = list(CANDIDATES)
    return max(done, key=lambda nr: (nr[1], -order.index(nr[0]) if nr[0] in order else 0))[0]


def main() -> None:
    from slimtune.federated import FederatedConfig, simulate

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=list(CANDIDATES))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--model", default="smollm2", help="tiny-llama: a smoke run of the script in seconds")
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"needs GLUE SST-2 at {DATA}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = rows(0, TRAIN_ROWS, args.out, f"train_{TRAIN_ROWS}")
    select = rows(TRAIN_ROWS, SELECT_ROWS, args.out, "select")
    path = args.out.with_suffix(".json")
    for name, change in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        s = {**BASE, **change}
        run_dir = args.out / name
        if not (run_dir / "summary.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = FederatedConfig(data=str(data), eval_data=str(select), model=args.model, eval_max=0, num_clients=8,
                                  clients_per_round=4, rounds=args.rounds, bits=4, batch_size=16, lora_r=8,
                                  dirichlet_alpha=0.5, out_dir=str(run_dir), round_timeout=7200, **s)
            simulate(cfg, cpus_per_client=float(os.cpu_count() or 1))  # one client at a time
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        scored = score(metrics)  # rounds as run (a kept run may predate a different --rounds)
        results = merged(path, {name: {"settings": s, "rounds": len(scored["accuracy"]), **scored}})
        print(name, {k: results[name][k] for k in ("final", "mean_last")}, flush=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results = {k: v for k, v in results.items() if k != "chosen"}
    merged(path, {"chosen": choose(results)})


if __name__ == "__main__":
    main()
