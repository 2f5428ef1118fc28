"""GGUF export of SmolLM2-135M-Instruct (+ a LoRA adapter when given): file size, time, and how closely the reloaded
file reproduces the model's logits, per output type. Writes benchmarks/results/gguf_export.json.
Usage: python benchmarks/gguf_export.py [--adapter runs/x/adapter]"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from slimtune.export import export_gguf
from slimtune.models import load_model_and_tokenizer
from slimtune.peft import load_peft, merge_peft

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter")
    args = ap.parse_args()
    model, tok = load_model_and_tokenizer("smollm2", tokenizer_dir=args.adapter)
    if args.adapter:
        model = merge_peft(load_peft(model, args.adapter))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("f32", "f16", "q8_0"):
            start = time.perf_counter()
            report = export_gguf(model, tok, Path(tmp) / f"smollm2-{quant}.gguf", quant)
            results[quant] = {**{k: v for k, v in report.items() if k != "path"},
                              "seconds": time.perf_counter() - start}
            print(quant, json.dumps(results[quant]), flush=True)
    out = {"model": "smollm2-135m-instruct", "adapter": args.adapter, "results": results}
    (ROOT / "benchmarks" / "results" / "gguf_export.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
