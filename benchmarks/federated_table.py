"""FedLPP on SST-2 (non-IID, 4 clients, SmolLM2 + LoRA): bits {2, 4, 8, fp32} vs centralized training.

Per bit width: server accuracy (theta), client-visible accuracy (Q(theta) alone), bytes per round per client.
Writes benchmarks/results/federated/<name>/ runs and benchmarks/results/federated.json. Needs ../shared/data/sst2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from launch import prompt_of_flags

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"


def subset(n: int, work: Path, split: str = "train") -> Path:
    """The first n rows of a split (the same pool for federated and centralized runs)."""
    lines = (DATA / f"{split}.tsv").read_text().splitlines()
    path = work / f"{split}_{n}.tsv"
    path.write_text("\n".join(lines[:n + 1]) + "\n")
    return path


def run_suffix(server_optimizer: str, aggregation: str, server_average: float) -> str:
    """'-fedadam', '-fedadam-ffa', '-avg0.8' ...: what differs from plain FedAvg/FedIT with no averaging."""
    out = f"-{server_optimizer}" if server_optimizer != "fedavg" else ""
    out += "-ffa" if aggregation == "ffa" else ""
    return out + (f"-avg{server_average:g}" if server_average else "")


def main() -> None:
    from slimtune.federated import FederatedConfig, simulate
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.train import TrainConfig, prepare, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="*", default=[2, 4, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--dev-size", type=int, default=200)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--server-optimizer", default="fedavg", help="fedavg, fedavgm, fedadam, fedyogi")
    ap.add_argument("--server-lr", type=float)
    ap.add_argument("--aggregation", default="fedavg", choices=["fedavg", "ffa"], help="FedIT (fedavg) or FFA-LoRA")
    ap.add_argument("--server-average", type=float, default=0.0, help="EMA decay of the server's model (0: off)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-centralized", action="store_true", help="skip the centralized reference run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "federated"))
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, dev = subset(args.train_size, out), subset(args.dev_size, out, "dev")
    results, prompt = {}, list(prompt_of_flags([]))  # SST-2's built-in prompt (the tables mark older rows)
    for bits in args.bits:
        name = f"fedlpp-{'fp32' if bits == 32 else f'{bits}bit'}"
        name += run_suffix(args.server_optimizer, args.aggregation, args.server_average)
        shutil.rmtree(out / name, ignore_errors=True)
        cfg = FederatedConfig(data=str(data), eval_data=str(dev), model=args.model, eval_max=0,
                              num_clients=args.clients, rounds=args.rounds, bits=bits, local_steps=args.local_steps,
                              lr=1e-3, batch_size=16, lora_r=8, dirichlet_alpha=0.5, out_dir=str(out / name),
                              server_optimizer=args.server_optimizer, server_lr=args.server_lr,
                              aggregation=args.aggregation, server_average=args.server_average,
                              round_timeout=7200)  # a shared CPU must not turn slow rounds into lost ones
        # one client at a time
        results[name] = {**simulate(cfg, cpus_per_client=float(os.cpu_count() or 1)), "prompt": prompt}
        print(name, json.dumps({k: results[name][k] for k in ("final_accuracy", "client_visible_accuracy",
                                                               "bytes_down_per_client_per_round")}), flush=True)
    path = out.parent / "federated.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    if args.no_centralized:
        path.write_text(json.dumps({**previous, **results}, indent=2))
        return
    # centralized: same data, same number of total local steps, one party
    steps = args.rounds * args.local_steps * args.clients
    shutil.rmtree(out / "centralized", ignore_errors=True)
    cfg = TrainConfig(out_dir=str(out / "centralized"), train_data=str(data), eval_data=str(dev),
                      model=args.model, optimizer="adamw", optim=OptimizerArgs(lr=1e-3),
                      peft=PeftSettings("lora", r=8, alpha=16), steps=steps, batch_size=16, eval_every=steps,
                      eval_max=0, progress=False, lr_scheduler="constant", warmup_steps=0)
    results["centralized"] = {**train(prepare(cfg)), "prompt": prompt}
    path.write_text(json.dumps({**previous, **results}, indent=2))


if __name__ == "__main__":
    main()
