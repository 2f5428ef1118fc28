"""Loss-threshold membership inference: does a fine-tuned model give lower loss to its training examples?

Trains on a small SST-2 subset (members) and compares per-example losses on members vs held-out non-members.
AUC = P(loss(non-member) > loss(member)); 0.5 means the attacker learns nothing. Non-private training on few
examples drives AUC up; DP (DPZero, DP-AdamW) should keep it near 0.5.
Writes benchmarks/results/membership_inference.json. Needs ../shared/data/sst2.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"

RUNS = {
    "adamw-lora (non-private)": dict(optimizer="adamw", lr=1e-3),
    "mezo-lora (non-private)": dict(optimizer="mezo", lr=2e-3, eps=1e-2),
    "dpzero-lora eps=2": dict(optimizer="dpzero", lr=2e-3, eps=1e-2, epsilon=2.0),
    "dp-adamw-lora eps=2": dict(optimizer="dp-adamw", lr=1e-3, epsilon=2.0),
}


def auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """Mann-Whitney AUC of the attack that calls 'member' when the loss is low."""
    m, n = member_losses[:, None], nonmember_losses[None, :]
    return ((n > m).float().mean() + 0.5 * (n == m).float().mean()).item()


def split(n_members: int, seed: int, work: Path) -> tuple[Path, Path]:
    lines = DATA.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    rng = random.Random(seed)
    picked = rng.sample(rows, 2 * n_members)
    members, nonmembers = work / "members.tsv", work / "nonmembers.tsv"
    members.write_text("\n".join([header, *picked[:n_members]]) + "\n")
    nonmembers.write_text("\n".join([header, *picked[n_members:]]) + "\n")
    return members, nonmembers


def main() -> None:
    from slimtune.data import get_task, read_examples
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.privacy import PrivacySpec
    from slimtune.train import TrainConfig, prepare, train
    from slimtune.train.classification import per_example_eval_losses

    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "mia_runs"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "membership_inference.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    members, nonmembers = split(args.members, 0, work)
    task = get_task("sst2")
    results = {}
    for name, spec in RUNS.items():
        eps_target = spec.pop("epsilon", None)
        opt = spec.pop("optimizer")
        privacy = PrivacySpec(target_epsilon=eps_target, delta=1e-3, clip=1.0) if eps_target else None
        cfg = TrainConfig(out_dir=str(work / name.split()[0]), train_data=str(members), model=args.model,
                          optimizer=opt, optim=OptimizerArgs(**spec), peft=PeftSettings("lora", r=8),
                          privacy=privacy, steps=args.steps, batch_size=16, eval_every=0, progress=False)
        import shutil
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        run = prepare(cfg)
        summary = train(run)
        lm = per_example_eval_losses(run.model, run.tokenizer, run.train_examples, run.label_ids)
        ln = per_example_eval_losses(run.model, run.tokenizer, read_examples(str(nonmembers), task), run.label_ids)
        results[name] = {"auc": auc(lm, ln), "member_loss": lm.mean().item(), "nonmember_loss": ln.mean().item(),
                         "epsilon": summary["epsilon"], "steps": summary["steps"]}
        print(name, json.dumps(results[name]), flush=True)
    Path(args.out).write_text(json.dumps({"members": args.members, "steps": args.steps, "delta": 1e-3,
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
