"""Sentiment classification (SST-2) with transformers' Trainer and MeZO instead of backprop.

Each example is SST-2's prompt `Review: <sentence>\nSentiment:` followed by its label word (` negative` /
` positive`: `slimtune.data.get_task("sst2")`); the loss is
the causal LM's cross-entropy on that one word (every other position is labelled -100). Accuracy compares the two
label words' logits at the end of the prompt. Everything is Hugging Face's except the trainer class:
`ZOTrainer(..., zo_args=ZOArguments(optimizer="mezo"))` trains with forward passes only (lr and eps from slimtune's
defaults table for LoRA).

    python examples/hf_trainer_mezo_sst2.py                       # SmolLM2-135M (embedded), bundled demo data
    python examples/hf_trainer_mezo_sst2.py --train train.tsv --dev dev.tsv --steps 2000 --model path/to/model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import numpy as np
from transformers import DataCollatorForSeq2Seq, TrainingArguments

import slimtune
from slimtune.data import get_task, read_examples
from slimtune.hf import ZOArguments, ZOTrainer
from slimtune.models import load_model_and_tokenizer

DEMO = Path(slimtune.__file__).parent / "data" / "demo"


def to_dataset(examples, tokenizer, words: list[int]) -> datasets.Dataset:
    """input_ids = prompt + label word; labels = -100 everywhere but the label word."""
    rows = []
    for e in examples:
        prompt = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + [words[e.label]], "labels": [-100] * len(prompt) + [words[e.label]]})
    return datasets.Dataset.from_list(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded), a local checkpoint, or tiny-llama")
    parser.add_argument("--train", default=str(DEMO / "sst2_demo_train.tsv"))
    parser.add_argument("--dev", default=str(DEMO / "sst2_demo_dev.tsv"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/hf-mezo-sst2")
    args = parser.parse_args(argv)

    task = get_task("sst2")
    train, dev = read_examples(args.train, task), read_examples(args.dev, task)
    model, tokenizer = load_model_and_tokenizer(args.model, texts=[e.prompt for e in train])
    model = slimtune.apply_peft(model, "lora", r=8)
    words = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in task.label_words]

    def label_word_logits(logits, labels):  # keep only the two label words' logits where the word is predicted
        position = (labels != -100).int().argmax(dim=1) - 1
        return logits[range(len(labels)), position][:, words]

    def accuracy(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        gold = np.array([words.index(row[row != -100][0]) for row in labels])
        return {"accuracy": float((logits.argmax(-1) == gold).mean())}

    trainer = ZOTrainer(
        model=model,
        args=TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=16,
                               eval_strategy="steps", eval_steps=max(args.steps // 4, 1), logging_steps=10,
                               save_strategy="no", report_to=[], use_cpu=True),
        train_dataset=to_dataset(train, tokenizer, words),
        eval_dataset=to_dataset(dev, tokenizer, words),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        preprocess_logits_for_metrics=label_word_logits,
        compute_metrics=accuracy,
        zo_args=ZOArguments(optimizer="mezo"),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(f"{args.out}/adapter")
    print(f"dev accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}; adapter in {args.out}/adapter")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
