"""Check the memory model's predictions against the peaks measured by benchmarks/zo_step.py (target: within 15%).

Reads benchmarks/results/zo_step.json, measures the process baseline (interpreter + libraries, CPU RSS), writes
benchmarks/results/memory_model.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ("import torch, transformers, peft, slimtune.train; from slimtune.train.metrics import process_memory_mb;"
            "print(process_memory_mb('VmHWM'))")  # the child's own peak (ru_maxrss keeps an exec parent's)
OPTIMIZER = {"inference": "inference", "inference_lora": "inference", "adamw_full": "adamw", "mezo_full": "mezo",
             "lozo_full": "lozo", "mezo_lora": "mezo", "lozo_lora": "lozo"}


def main() -> None:
    from slimtune.data import get_task, read_examples
    from slimtune.models import load_model_and_tokenizer
    from slimtune.report.memory_model import ModelShape, predict_peak_mb
    from slimtune.train.classification import encode

    measured = json.loads((ROOT / "benchmarks/results/zo_step.json").read_text())["results"]
    runtime = float(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                   check=True).stdout.strip())
    model, tok = load_model_and_tokenizer("smollm2")
    shape = ModelShape.from_model(model)
    batch = next(iter(measured.values()))["batch_size"]
    examples = read_examples(str(ROOT / "slimtune/data/demo/sst2_demo_train.tsv"), get_task("sst2"))[:batch]
    seq_len = encode(tok, examples).input_ids.shape[1]
    rows = {}
    for name, opt in OPTIMIZER.items():
        if name not in measured:
            continue
        pred = predict_peak_mb(shape, opt, measured[name]["trainable_params"] or 0, batch, seq_len, runtime)
        rows[name] = {"predicted_mb": pred["peak_mb"], "measured_mb": measured[name]["peak_mem_mb"],
                      "ratio": pred["peak_mb"] / measured[name]["peak_mem_mb"], "parts_mb": pred["parts_mb"]}
        print(f"{name:16s} predicted {pred['peak_mb']:7.0f} MB  measured {measured[name]['peak_mem_mb']:7.0f} MB  "
              f"ratio {rows[name]['ratio']:.3f}")
    within = all(abs(r["ratio"] - 1) <= 0.15 for r in rows.values())
    out = {"runtime_baseline_mb": runtime, "seq_len": seq_len, "batch": batch, "rows": rows, "all_within_15pct": within}
    (ROOT / "benchmarks/results/memory_model.json").write_text(json.dumps(out, indent=2))
    print("all within 15%:", within)


if __name__ == "__main__":
    main()
