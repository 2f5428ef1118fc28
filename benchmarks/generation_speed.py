"""Decoding speed on E2E NLG: greedy generation for the 67 distinct MRs of validation.csv, <= 64 new tokens.

Issue 12's target: the 67 inputs in under 60 s on 2 CPU cores. Times `slimtune.generation.generate_texts` (batched,
left-padded `transformers.generate`, stops at EOS), the function `slimtune eval` and training-time evaluation use,
for the base model and, when benchmarks/e2e_generation.py has trained it, the AdamW + LoRA adapter both as saved
(LoRA layers unmerged, as evaluation runs it) and merged into the weights (as `slimtune merge` exports it).
Each configuration: one warm-up batch, then `--repeats` timed passes over all 67 prompts; the fastest is reported
with the number of tokens generated. Run it with nothing else on the machine.
Writes benchmarks/results/generation_speed.json; README table: tables.py generation-speed.
Usage: python benchmarks/generation_speed.py [--threads 2] [--batch-size 16] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from e2e_generation import E2E, OUT as E2E_OUT, TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "generation_speed.json"
TARGET_S = 60.0
MAX_NEW_TOKENS = 64


def validation_prompts() -> list[str]:
    """The distinct MRs of validation.csv in file order, rendered with the E2E benchmark's template."""
    with (E2E / "validation.csv").open(newline="", encoding="utf-8") as f:
        mrs = list(dict.fromkeys(row["mr"] for row in csv.DictReader(f)))
    return [TEMPLATE.format(mr=mr) for mr in mrs]


def new_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def time_config(model, tokenizer, prompts: list[str], batch_size: int, repeats: int, device: str) -> dict:
    from slimtune.generation import DecodeSettings, generate_texts

    settings = DecodeSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size)
    generate_texts(model, tokenizer, prompts[:batch_size], settings, device)  # warm-up
    times, outputs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = generate_texts(model, tokenizer, prompts, settings, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tokens = new_tokens(tokenizer, outputs)
    return {"seconds": min(times), "all_seconds": times, "prompts": len(prompts), "batch_size": batch_size,
            "generated_tokens": tokens, "tokens_per_s": tokens / min(times), "under_target": min(times) < TARGET_S}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if not E2E.exists():
        raise SystemExit(f"needs E2E NLG at {E2E}")
    torch.set_num_threads(args.threads)
    from slimtune.models import load_model_and_tokenizer
    from slimtune.peft import load_peft, merge_peft

    prompts = validation_prompts()
    adapter = E2E_OUT / "adamw-lora" / "adapter"
    configs = {"base model (zero-shot)": None}
    if adapter.exists():
        configs.update({"adamw-lora, adapter as saved": "unmerged", "adamw-lora, merged": "merged"})
    rows = {}
    for name, mode in configs.items():
        model, tok = load_model_and_tokenizer("smollm2", device=args.device)
        if mode is not None:
            model = load_peft(model, str(adapter))
            if mode == "merged":
                model = merge_peft(model)
        rows[name] = time_config(model, tok, prompts, args.batch_size, args.repeats, args.device)
        print(name, json.dumps(rows[name]), flush=True)
    result = {"rows": rows, "target_s": TARGET_S, "max_new_tokens": MAX_NEW_TOKENS, "device": args.device,
              "threads": args.threads, "torch": torch.__version__}
    RESULT.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
