"""E2E NLG (data-to-text generation) with SmolLM2-135M: zero-shot, AdamW + LoRA, MeZO + LoRA, DPZero + LoRA (epsilon 6).

Data: ../shared/data/e2e (train.csv 4,116 pairs / 480 MRs; validation.csv 556 pairs / 67 MRs; see its README).
Training-time evaluation (loss, which picks the saved adapter) uses 40 MRs held out of *train* (split by MR, seed 0),
so nothing about validation.csv is used to choose a model; each saved adapter is then scored once on all of
validation.csv with `slimtune eval --task generation`: multi-reference BLEU (sacrebleu), ROUGE-L, loss, greedy
decoding, 64 new tokens. Hyper-parameters: the per-method defaults (no lr/eps flags); steps: backprop 300, ZO 2,000.
Finished runs are skipped and unfinished ones resume, so the script can be stopped and restarted.
Results: benchmarks/results/e2e/<name>/ and benchmarks/results/e2e.json; README table: tables.py e2e.
The "inference" entry is the floor the issue's memory target refers to: peak memory (and time) of a process that
only runs two forward passes of the loss on training batches (SmolLM2 + an untrained LoRA, no gradient), plus the
worst-case batch (15 longest rows + the shortest prompt): a 2,000-step run's peak is set by the largest batch it draws.
Usage: python benchmarks/e2e_generation.py [--only NAME... | inference] [--threads N] [--gpu]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from launch import merged, thread_env, train_run

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
    # issue 36: the hybrid (AdamW on the top 2 blocks' LoRA, MeZO below) at its defaults, the ZO step budget
    "hybrid-lora": ["--optimizer", "hybrid", "--peft", "lora", "--steps", "2000"],
}


def split_by_mr(held_out: int = 40) -> tuple[Path, Path]:
    """train.csv minus `held_out` MRs, and those MRs' rows (the selection split); files already holding
    exactly this are not rewritten (a run beside this one may be reading them)."""
    with (E2E / "train.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    mrs = sorted({r["mr"] for r in rows})
    random.Random(0).shuffle(mrs)
    chosen = set(mrs[:held_out])
    OUT.mkdir(parents=True, exist_ok=True)
    paths = OUT / "train_rest.csv", OUT / "select.csv"
    for path, keep in zip(paths, (lambda r: r["mr"] not in chosen, lambda r: r["mr"] in chosen)):
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=["mr", "ref"])
        w.writeheader()
        w.writerows(r for r in rows if keep(r))
        if not path.exists() or path.open(encoding="utf-8", newline="").read() != text.getvalue():
            with path.open("w", encoding="utf-8", newline="") as f:
                f.write(text.getvalue())
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


INFERENCE_BATCHES = 20


def verdicts(results: dict) -> dict:
    """Issue 12's targets per row, from whatever has run (None: its reference has not run): AdamW + LoRA BLEU >= 60;
    MeZO + LoRA BLEU >= 0.75 x AdamW's and peak memory <= 1.2 x the inference floor; DPZero (eps 6) BLEU >= 0.9 x
    MeZO's."""
    bleu = lambda name: (results.get(name) or {}).get("validation", {}).get("bleu")
    out = {}
    if bleu("adamw-lora") is not None:
        out["adamw-lora"] = {"target": "BLEU >= 60", "met": bleu("adamw-lora") >= 60}
    if bleu("mezo-lora") is not None:
        floor = (results.get("inference") or {}).get("peak_mem_mb")
        ratio = results["mezo-lora"]["peak_mem_mb"] / floor if floor else None
        ref = bleu("adamw-lora")
        out["mezo-lora"] = {"target": ">= 0.75 x AdamW BLEU, peak <= 1.2 x inference", "memory_ratio": ratio,
                            "met": None if ref is None or ratio is None
                            else bleu("mezo-lora") >= 0.75 * ref and ratio <= 1.2}
    if bleu("dpzero-lora-eps6") is not None:
        ref = bleu("mezo-lora")
        out["dpzero-lora-eps6"] = {"target": ">= 0.9 x MeZO BLEU",
                                   "met": None if ref is None else bleu("dpzero-lora-eps6") >= 0.9 * ref}
    return out


def inference_worker(train_csv: Path, device: str) -> None:
    """Print the floor a ZO step on E2E is compared with: peak memory and time of two forward passes (the loss, no
    gradient) of SmolLM2 + an untrained LoRA r=8 on batches of 16 training rows drawn as training draws them, then
    on the worst-case batch (the peak reported)."""
    import torch

    from slimtune.generation.objective import token_ids
    from slimtune.peft.registry import PeftSettings, apply_peft
    from slimtune.train.metrics import peak_memory_mb
    from slimtune.train.objectives import GenerationSettings, load_model_and_data, make_objective

    objective = make_objective("generation", template=TEMPLATE, generation=GenerationSettings("mr", "ref"))
    model, _, examples, _ = load_model_and_data(objective, "smollm2", str(train_csv), None, seed=0, device=device)
    model = apply_peft(model, PeftSettings(method="lora")).eval()
    rng, times = random.Random(0), []
    with torch.inference_mode():
        for _ in range(INFERENCE_BATCHES):
            batch = objective.encode(rng.sample(examples, 16), objective.max_length).to(device)
            start = time.perf_counter()
            for _ in range(2):
                objective.losses(model, batch)
            times.append(time.perf_counter() - start)
        typical_peak = peak_memory_mb(device)
        # A ZO run draws thousands of batches, so its peak is set by the largest one it meets; the floor has to be
        # inference on that worst case too. Activations grow with the padded width, logits with width minus the
        # shortest prompt: the 15 longest rows plus the row with the shortest prompt bound every batch of 16.
        lengths = [token_ids(objective.tokenizer, ex, objective.max_length)[:2] for ex in examples]
        by_total = sorted(range(len(examples)), key=lambda i: len(lengths[i][0]) + len(lengths[i][1]))
        shortest_prompt = min(range(len(examples)), key=lambda i: len(lengths[i][0]))
        worst = [examples[i] for i in by_total[-15:]] + [examples[shortest_prompt]]
        objective.losses(model, objective.encode(worst, objective.max_length).to(device))
    print(json.dumps({"peak_mem_mb": peak_memory_mb(device), "typical_batches_peak_mem_mb": typical_peak,
                      "two_forwards_s": sum(times) / len(times), "batches": INFERENCE_BATCHES, "batch_size": 16,
                      "worst_case_batch": "15 longest rows + the shortest prompt"}))


def inference_floor(train_csv: Path, threads: int, device: str) -> dict:
    """inference_worker in a fresh process, so that its peak memory is its own."""
    cmd = [sys.executable, __file__, "--inference-worker", str(train_csv), "--device", device]
    out = subprocess.run(cmd, check=True, env=thread_env(threads), capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--inference-worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    if args.inference_worker:
        return inference_worker(args.inference_worker, args.device)
    if not E2E.exists():
        raise SystemExit(f"needs E2E NLG at {E2E}")
    device = "cuda" if args.gpu else "cpu"
    train_csv, select_csv = split_by_mr()
    path = OUT.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    if (args.only and "inference" in args.only) or (not args.only and "inference" not in results):
        results = merged(path, {"inference": inference_floor(train_csv, args.threads, device)})
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
        results = merged(path, {name: row})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
