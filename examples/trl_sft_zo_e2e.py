"""Data-to-text generation (E2E NLG) with TRL's SFTTrainer, trained by MeZO instead of backprop.

TRL does the usual: prompt/completion pairs, completion-only loss, LoRA from `peft_config`, evaluation and saving.
The one change is the trainer class, `ZOSFTTrainer(ZOTrainerMixin, SFTTrainer)`, and `zo_args`: the step is
zeroth-order (forward passes only; lr and eps from slimtune's defaults table for LoRA unless given).

    python examples/trl_sft_zo_e2e.py                                   # SmolLM2-135M, bundled demo data
    python examples/trl_sft_zo_e2e.py --train e2e/train.csv --dev e2e/validation.csv --steps 2000

The bundled demo files are a few dozen synthetic rows in the E2E format (columns `mr`, `ref`); the real data set is
the E2E Challenge's (Novikova et al., 2017, CC BY-SA 4.0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

import slimtune
from slimtune.data.readers import read_rows
from slimtune.hf import ZOArguments, ZOTrainerMixin
from slimtune.models import load_model_and_tokenizer

DEMO = Path(slimtune.__file__).parent / "data" / "demo"
PROMPT = "Describe the restaurant in one sentence: {mr}\nDescription:"


class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer with a slimtune zeroth-order step."""


def pairs(path: str) -> datasets.Dataset:
    rows = [row for _, row in read_rows(path)[0]]
    return datasets.Dataset.from_list([{"prompt": PROMPT.format(mr=r["mr"]), "completion": " " + r["ref"]}
                                       for r in rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded), a local checkpoint, or tiny-llama")
    parser.add_argument("--train", default=str(DEMO / "e2e_demo_train.csv"))
    parser.add_argument("--dev", default=str(DEMO / "e2e_demo_dev.csv"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/trl-zo-e2e")
    args = parser.parse_args(argv)

    train, dev = pairs(args.train), pairs(args.dev)
    model, tokenizer = load_model_and_tokenizer(args.model, texts=list(train["prompt"]) + list(train["completion"]))
    trainer = ZOSFTTrainer(
        model=model,
        processing_class=tokenizer,
        args=SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, max_length=128,
                       eval_strategy="steps", eval_steps=max(args.steps // 4, 1), logging_steps=10,
                       save_strategy="no", report_to=[], use_cpu=True,
                       gradient_checkpointing=False),  # SFTConfig turns it on; a ZO step keeps no activations
        train_dataset=train,
        eval_dataset=dev,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        zo_args=ZOArguments(optimizer="mezo"),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(f"{args.out}/adapter")

    prompt = dev[0]["prompt"]
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    trainer.model.eval()
    with torch.no_grad():
        output = trainer.model.generate(**inputs, max_new_tokens=40, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"dev loss {before:.3f} -> {after:.3f}; adapter in {args.out}/adapter\n{prompt}{completion}")
    return {"before": before, "after": after, "completion": completion}


if __name__ == "__main__":
    main()
