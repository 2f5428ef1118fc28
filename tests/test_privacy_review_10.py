"""Privacy review 10: the newest private surfaces (dphybrid, dphizoo, dplozo, dp-adamw, the private Hugging Face
ZOTrainer, data-parallel private runs), attacked by reading everything a private run writes, says or sends. Each
test fails on the code it was written against.

1. The private ZOTrainer's held-out check (hf.shares_rows) keys a row by every column but the label columns and the
   attention mask, so the training rows with one more column the model never sees (the `text` column kept by a
   `map(tokenize)` without `remove_columns`, an `idx` column) are "held out": evaluate() and the training loop's
   evaluations score the training rows without noise (transformers drops the unused column before the model).
2. A private step's error names the realised Poisson batch size: a closure (or a ZOTrainer `per_example_losses`
   override) returning [B, 1] gets "needs per-example losses ... (got shape (B, 1))", which passes through `withheld`
   (a SlimtuneError) into the user's terminal/logs. The realised size of a private batch is not released.
3. Data-parallel ranks are compared on rank 0's facts only (distributed.check_ranks_agree): when rank 0 has no
   --secret-key-file (it creates RUN/secret.key) and another rank is given one, the "key of --secret-key-file" fact
   exists on that rank only and is never compared; the ranks then draw different Poisson batches and noise, and an
   example can sit in two ranks' shards of one step (sensitivity 2C, accounted as C).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

from slimtune import SlimtuneError

sys.path.insert(0, str(Path(__file__).resolve().parent))


# -- 1. the held-out check of a private ZOTrainer ----------------------------------------------------------------------
def test_training_rows_with_an_extra_unused_column_are_recognised_as_training_rows():
    from slimtune.hf import shares_rows

    train = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}]
    assert shares_rows(train, [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "text": "a great movie"}])
    assert shares_rows(train, [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "idx": 0}])


def test_a_private_trainer_refuses_eval_data_that_is_its_training_data_tokenized_without_remove_columns(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling

    from slimtune.hf import ZOArguments, ZOTrainer
    from test_hf import ROWS, hf_args, lm_dataset, model_for, tokenizer

    tok = tokenizer()
    train = lm_dataset(tok)  # input_ids, attention_mask
    same_rows = datasets.Dataset.from_dict({"text": ROWS}).map(lambda b: tok(b["text"]), batched=True)  # + text
    zo = ZOArguments(optimizer="dphybrid", fo_layers=1, epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2)
    with pytest.raises(SlimtuneError, match="shares rows with train_dataset"):
        ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=2), train_dataset=train,
                  eval_dataset=same_rows, data_collator=DataCollatorForLanguageModeling(tok, mlm=False), zo_args=zo)


# -- 2. the realised batch size in a private step's error -------------------------------------------------------------
def test_a_private_steps_shape_error_does_not_name_the_realised_batch_size(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("datasets")
    from slimtune.hf import ZOArguments
    from test_hf import model_for, tokenizer, trainer_for

    tok = tokenizer()
    zo = ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2)
    trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, zo, max_steps=2, logging_steps=1)
    sizes, own = [], trainer.per_example_losses

    def column(model, inputs):  # one loss per example, as a column: a user's override's mistake
        losses = own(model, inputs)
        sizes.append(losses.numel())
        return losses[:, None]
    trainer.per_example_losses = column
    with pytest.raises(SlimtuneError, match="1-D") as err:
        trainer.train()
    assert sizes and f"({sizes[-1]}, 1)" not in str(err.value), str(err.value)


# -- 3. data-parallel ranks with different keys ----------------------------------------------------------------------
def test_a_rank_given_its_own_key_file_when_rank_0_has_none_is_refused(tmp_path, demo_paths, monkeypatch):
    from slimtune import distributed
    from slimtune.models.loading import tiny_model
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.privacy import PrivacySpec
    from slimtune.privacy.secret import create_key_file
    from slimtune.train import TrainConfig
    from slimtune.train.trainer import rank_facts

    create_key_file(tmp_path / "rank1.key")
    model = tiny_model("tiny-llama", 100, 0, 1, seed=0)
    base = dict(out_dir=str(tmp_path / "run"), train_data=demo_paths[0], model="tiny-llama", optimizer="dpzero",
                optim=OptimizerArgs(), peft=PeftSettings("lora", r=2), steps=4, batch_size=8, progress=False,
                privacy=PrivacySpec(target_epsilon=6.0, delta=1e-3))
    rank0 = rank_facts(TrainConfig(**base), model)  # RUN/secret.key, created by rank 0 after the check
    rank1 = rank_facts(TrainConfig(**base, secret_key_file=str(tmp_path / "rank1.key")), model)
    monkeypatch.setattr(distributed, "all_gather", lambda obj, world: [rank0, rank1])
    with pytest.raises(SlimtuneError, match="secret-key-file"):
        distributed.check_ranks_agree(rank0, distributed.World(0, 2))
