"""Differentially private fine-tuning (DPZero) in a plain PyTorch loop, on SST-2.

The whole recipe: LoRA on the model, `slimtune.DPZero` calibrated to (epsilon, delta) for the run's steps, and a
loop that asks the optimizer for each step's Poisson batch and returns one loss per example from the closure (each
example's difference is clipped before the noise is added). The loss is the cross-entropy over the two label words
at the end of SST-2's prompt `Review: <sentence>\nSentiment:`.

    python examples/dpzero_torch_loop.py                               # SmolLM2-135M, bundled demo data, epsilon 6
    python examples/dpzero_torch_loop.py --train train.tsv --dev dev.tsv --epsilon 2 --steps 2000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import slimtune
from slimtune.data import get_task, read_examples
from slimtune.models import load_model_and_tokenizer
from slimtune.peft import save_peft
from slimtune.train.classification import encode, evaluate, label_token_ids, per_example_losses

DEMO = Path(slimtune.__file__).parent / "data" / "demo"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded), a local checkpoint, or tiny-llama")
    parser.add_argument("--train", default=str(DEMO / "sst2_demo_train.tsv"))
    parser.add_argument("--dev", default=str(DEMO / "sst2_demo_dev.tsv"))
    parser.add_argument("--epsilon", type=float, default=6.0)
    parser.add_argument("--delta", type=float, default=None, help="default: 1 / (10 N)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="expected Poisson batch size")
    parser.add_argument("--out", default="runs/dpzero-loop")
    args = parser.parse_args(argv)

    task = get_task("sst2")
    train, dev = read_examples(args.train, task), read_examples(args.dev, task)
    model, tokenizer = load_model_and_tokenizer(args.model)  # tiny test models: a tokenizer not fitted to the data
    model = slimtune.apply_peft(model, "lora", r=8).eval()  # eval(): no dropout, every forward the same function
    words = label_token_ids(tokenizer, task)

    optimizer = slimtune.DPZero(model, epsilon=args.epsilon, delta=args.delta or 1 / (10 * len(train)),
                                dataset_size=len(train), batch_size=args.batch_size, steps=args.steps)
    print(f"noise multiplier {optimizer.noise_multiplier:.3f} for epsilon {args.epsilon} over {args.steps} steps")
    before = evaluate(model, tokenizer, dev, words)["accuracy"]
    for step in range(args.steps):
        batch = encode(tokenizer, [train[i] for i in optimizer.sample_batch()])  # may be empty: a Poisson draw
        out = optimizer.step(lambda: per_example_losses(model, batch, words))  # one loss per example
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: released projected gradient {out.info['projected_grad']:+.3f}, "
                  f"epsilon {optimizer.epsilon_spent:.2f}")
    after = evaluate(model, tokenizer, dev, words)["accuracy"]
    save_peft(model, f"{args.out}/adapter")
    print(f"dev accuracy {before:.3f} -> {after:.3f} at epsilon {optimizer.epsilon_spent:.2f}, "
          f"delta {optimizer.delta:.1e}; adapter in {args.out}/adapter")
    return {"before": before, "after": after, "epsilon": optimizer.epsilon_spent}


if __name__ == "__main__":
    main()
