"""Fit L = A / (X^alpha * D_f^beta) + E jointly over two PEFT methods and four data sizes (SST-2, SmolLM2, FO).

X = the method's trainable parameter count, D_f = number of fine-tuning examples (balanced k-shot subsets),
L = dev loss after a fixed number of steps. Writes benchmarks/results/scaling/ (runs, scaling_law.json, plot).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"
METHODS = {"lora": dict(r=8, lr=1e-3), "svfit": dict(r=8, lr=2e-2)}


def main() -> None:
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.report.scaling import fit_scaling_law, plot_scaling
    from slimtune.train import TrainConfig, prepare, train
    from slimtune.train.metrics import read_jsonl

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[16, 64, 256, 1024])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling"))
    args = ap.parse_args()
    out = Path(args.out)
    points = {m: [] for m in METHODS}
    for method, hp in METHODS.items():
        for size in args.sizes:
            run_dir = out / f"{method}-d{size}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = TrainConfig(out_dir=str(run_dir), train_data=str(DATA / "train.tsv"), eval_data=str(DATA / "dev.tsv"),
                              model=args.model, optimizer="adamw", optim=OptimizerArgs(lr=hp["lr"]),
                              peft=PeftSettings(method, r=hp["r"]), steps=args.steps, batch_size=16,
                              eval_every=args.steps, eval_max=200, k_shot=size // 2, progress=False)
            summary = train(prepare(cfg))
            loss = [r["eval_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("eval_loss") is not None][-1]
            points[method].append((summary["trainable_params"], size, loss))
            print(method, size, loss, flush=True)
    # One joint law over both methods: X (trainable parameters) differs between them, D_f within each.
    all_pts = [p for pts in points.values() for p in pts]
    xs, ds, ls = map(list, zip(*all_pts))
    fit = fit_scaling_law(xs, ds, ls)
    fits = {m: (fit, *map(list, zip(*pts))) for m, pts in points.items()}
    result = {"fit": fit.__dict__, "points": points}
    out.mkdir(parents=True, exist_ok=True)
    plot_scaling(fits, out / "scaling_law.png")
    (out / "scaling_law.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
