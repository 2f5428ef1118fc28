"""How much does FedLPP's broadcast hide of a trained LoRA? Accuracy of theta and of what a client receives,
Q(theta) (block-wise NF quantization, optionally with the fixed secret dither), per bit width and dither amplitude.

theta: a trained SmolLM2 + LoRA adapter directory (default: the AdamW + LoRA run of benchmarks/defaults.py, 0.859 on
full SST-2 dev); scored on the first --dev-size SST-2 dev rows. Static: no training from Q(theta) (that is
federated_attacks.py). Results: benchmarks/results/broadcast_accuracy.json.
Usage: python benchmarks/broadcast_accuracy.py [--adapter DIR] [--bits 1 2 4] [--dither 0 1 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
OUT = ROOT / "benchmarks" / "results" / "broadcast_accuracy.json"


def main() -> None:
    from safetensors.torch import load_file

    from slimtune.federated.config import FederatedConfig
    from slimtune.federated.model import build_model, load_lora_state, lora_state
    from slimtune.federated.wire import decode_state, encode_state
    from slimtune.federated.strategy import secret_dither

    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, default=ROOT / "benchmarks" / "results" / "defaults" / "adamw-lora" / "adapter")
    ap.add_argument("--bits", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--dither", type=float, nargs="*", default=[0.0, 1.0, 2.0])
    ap.add_argument("--dev-size", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not DEV.exists():
        raise SystemExit(f"needs GLUE SST-2 at {DEV}")
    adapter_cfg = json.loads((args.adapter / "adapter_config.json").read_text())
    cfg = FederatedConfig(data=str(DEV), eval_data=str(DEV), model="smollm2", lora_r=int(adapter_cfg["r"]),
                          eval_max=args.dev_size)
    model, _, _, evals, objective = build_model(cfg)
    saved = load_file(str(args.adapter / "adapter_model.safetensors"))
    theta = {name: saved[name.replace(".default.", ".")].float() for name in lora_state(model)}
    shapes = {k: tuple(v.shape) for k, v in theta.items()}

    def score(state) -> float:
        load_lora_state(model, state)
        return objective.evaluate(model, evals, "cpu")["accuracy"]

    results = {"adapter": str(args.adapter.relative_to(ROOT)) if args.adapter.is_relative_to(ROOT) else str(args.adapter),
               "dev_size": len(evals), "theta": score(theta), "received": {}}
    for bits in args.bits:
        for dither in args.dither:
            cfg.bits, cfg.dither = bits, dither
            arrays, nbytes = encode_state(theta, bits, cfg.block_size, secret_dither(shapes, cfg))
            received = decode_state(arrays, shapes, bits, cfg.block_size)
            err = sum((received[k] - theta[k]).pow(2).sum() for k in theta) / sum(t.pow(2).sum() for t in theta.values())
            results["received"][f"{bits}bit-dither{dither:g}"] = {
                "bits": bits, "dither": dither, "accuracy": score(received), "relative_error": float(err.sqrt()),
                "payload_bytes": nbytes}
            print(bits, dither, results["received"][f"{bits}bit-dither{dither:g}"], flush=True)
    OUT.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
