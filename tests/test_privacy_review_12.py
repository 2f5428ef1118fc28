"""Privacy review 12: the private Hugging Face trainer (slimtune.hf.ZOTrainer, TRL through ZOTrainerMixin) and the
torch-style private optimizers (slimtune/optimizers.py), attacked as someone who sees everything a private run logs,
writes or says. Each test fails on the code it was written against.

1. `ZOTrainer(..., optimizers=(slimtune.DPZero(...), None))` is used as given: the trainer's loader draws Poisson
   batches at per_device_train_batch_size / N, while the optimizer's accountant was planned for its own dataset_size,
   batch_size and steps; the logged epsilon is a fraction of what the run spends.
2. TRL's `SFTConfig(packing=True)` is not refused by a private ZOSFTTrainer: the dataset is packed before the trainer
   sees it, so Poisson sampling and clipping act on packed chunks of several examples ("wrapped": one example also
   spans two chunks and shifts every later one), accounted as if each chunk were one example. (bfd packing turns on
   the trainer's `padding_free`, not `args.padding_free`, and is only caught at the first batch of two packs.)
3. The losses a private step clips are not checked against the number of sampled examples: a `per_example_losses`
   override (the documented extension point) that returns per-token losses (1-D) is clipped token by token, so one
   example moves the release by up to T*C while the accountant assumes C.
4. In a private run the Trainer's `compute_loss_func` (and a subclass's `compute_loss`) is silently ignored: the
   step trains on `per_example_losses`' plain cross-entropy.
5. The rows of a private batch are read (`dataset[indices]`: a `set_transform` / `with_transform` tokenizer, a torch
   Dataset's __getitem__) outside `withheld`: the tokenizer's "sequence length ... (8 > 3)" of a row of the batch is
   logged during training.
6. A private checkpoint's rng_state.pth holds torch's CPU generator state after the collator's draws on the private
   batches (random masking / augmentation draws per example): it encodes the realised batch sizes.
7. `PrivateOptimizer.load_state_dict` restores the step count into an optimizer of other privacy settings (noise,
   dataset size, budget): `epsilon_spent` then re-prices the restored steps at the new noise and under-reports.
"""

import logging
import sys
from pathlib import Path

import pytest
import torch

from slimtune import SlimtuneError

sys.path.insert(0, str(Path(__file__).resolve().parent))

datasets = pytest.importorskip("datasets")
from transformers import DataCollatorForLanguageModeling  # noqa: E402

import slimtune  # noqa: E402
from slimtune.hf import ZOArguments, ZOTrainer, ZOTrainerMixin  # noqa: E402
from test_hf import ROWS, hf_args, lm_dataset, model_for, tokenizer  # noqa: E402

LONG_ROW = "Token indices sequence length is longer than the specified maximum"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def private(**kwargs):
    return ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2, **kwargs)


# -- 1. an optimizer passed with `optimizers=` ----------------------------------------------------------------------
def test_a_private_trainer_refuses_an_optimizer_planned_for_other_batches(tmp_path):
    tok = tokenizer()
    model = model_for(tok, "lora")
    mine = slimtune.DPZero(model, dataset_size=72, batch_size=1, steps=1000, epsilon=8.0, delta=1e-3, lr=1e-2,
                           eps=1e-2)  # accounted at q = 1/72; the trainer samples at 32/72
    with pytest.raises(SlimtuneError, match="optimizers"):
        trainer = ZOTrainer(model=model, args=hf_args(tmp_path, max_steps=2, per_device_train_batch_size=32),
                            train_dataset=lm_dataset(tok), zo_args=private(), optimizers=(mine, None),
                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        trainer.train()


# -- 2. TRL's dataset packing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["wrapped", "bfd"])
def test_a_private_sft_trainer_refuses_packing(tmp_path, strategy):
    trl = pytest.importorskip("trl")

    class ZOSFTTrainer(ZOTrainerMixin, trl.SFTTrainer):
        pass

    tok = tokenizer()
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                           save_strategy="no", use_cpu=True, disable_tqdm=True, max_length=16, packing=True,
                           packing_strategy=strategy, gradient_checkpointing=False)  # (lead) SFTConfig turns it on
    rows = datasets.Dataset.from_dict({"text": ROWS})
    with pytest.raises(SlimtuneError, match="packing"):
        ZOSFTTrainer(model=model_for(tok, "lora"), args=config, train_dataset=rows, processing_class=tok,
                     zo_args=private())


# -- 3. one clipped loss per sampled example ---------------------------------------------------------------------
def test_a_private_step_refuses_losses_that_are_not_one_per_example(tmp_path):
    class PerToken(ZOTrainer):
        def per_example_losses(self, model, inputs):  # a plausible override: per-token NLL, flattened (1-D)
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
            return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:],
                                                     ignore_index=-100, reduction="none").flatten()

    tok = tokenizer()
    model = model_for(tok, "lora")
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    trainer = PerToken(model=model, args=hf_args(tmp_path, max_steps=3),
                       train_dataset=lm_dataset(tok), data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                       zo_args=private())
    with pytest.raises(SlimtuneError, match="one loss per example"):
        trainer.train()
    after = [p.detach() for p in model.parameters() if p.requires_grad]  # the refused step left no theta + eps z
    assert max((a - b).abs().max().item() for a, b in zip(before, after)) < 1e-6


# -- 4. the trainer's own loss settings -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["compute_loss_func", "compute_loss"])
def test_a_private_trainer_refuses_a_loss_it_would_not_use(tmp_path, how):
    calls = []

    def weighted(outputs, labels, num_items_in_batch=None):
        calls.append(1)
        return outputs.logits.float().mean()

    class Custom(ZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls.append(1)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    tok = tokenizer()
    cls, extra = (ZOTrainer, {"compute_loss_func": weighted}) if how == "compute_loss_func" else (Custom, {})
    with pytest.raises(SlimtuneError, match=how):
        trainer = cls(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=2),
                      train_dataset=lm_dataset(tok), data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      zo_args=private(), **extra)
        trainer.train()
    assert not calls


# -- 5. reading the rows of a private batch ---------------------------------------------------------------------------
class Said(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_reading_a_private_batchs_rows_says_nothing(tmp_path):
    """A dataset that tokenizes on the fly (set_transform): transformers fetches the batch's rows in the DataLoader,
    before the collator that runs inside `withheld`."""
    tok = tokenizer()
    tok.model_max_length = 3  # every row is "too long" (a long document for a real model)
    train = datasets.Dataset.from_dict({"text": ROWS})
    train.set_transform(lambda batch: dict(tok(batch["text"])))
    trainer = ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=2, remove_unused_columns=False),
                        train_dataset=train, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                        zo_args=private())
    said = Said()
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(said)
    try:
        trainer.train()
    finally:
        for logger in loggers:
            logger.removeHandler(said)
    assert trainer.zo_optimizer().steps_taken == 2
    assert not [line for line in said.lines if LONG_ROW in line]


# -- 6. the generator state in a private checkpoint -------------------------------------------------------------------
def test_a_private_checkpoints_rng_state_does_not_count_the_batches_draws(tmp_path):
    tok = tokenizer()
    padding = DataCollatorForLanguageModeling(tok, mlm=False)

    def masking(rows):  # random masking / augmentation: one draw per example of the (private) batch
        batch = padding(rows)
        torch.rand(len(rows))
        return batch

    def saved_state(name, collator):
        args = hf_args(tmp_path / name, max_steps=3, save_strategy="steps", save_steps=3)
        ZOTrainer(model=model_for(tok, "lora"), args=args, train_dataset=lm_dataset(tok), data_collator=collator,
                  zo_args=private()).train()
        path = tmp_path / name / "out" / "checkpoint-3" / "rng_state.pth"
        return torch.load(path, weights_only=False)["cpu"] if path.exists() else None

    quiet, drawing = saved_state("quiet", padding), saved_state("drawing", masking)
    assert (quiet is None) == (drawing is None)
    assert quiet is None or torch.equal(quiet, drawing), "the saved generator state depends on the batch sizes"


# -- 7. restoring a private optimizer's state under other privacy settings -------------------------------------------
def spent_dpzero():
    """(model, a DPZero that took its 4 steps at epsilon 50 over 72 examples)."""
    tok = tokenizer()
    model = model_for(tok, "lora").eval()

    def losses(n):
        ids = torch.randint(3, len(tok), (n, 6), generator=torch.Generator().manual_seed(n))
        return lambda: model(input_ids=ids).logits.float().mean(dim=(1, 2))

    spent = slimtune.DPZero(model, dataset_size=72, batch_size=8, steps=4, epsilon=50.0, delta=1e-3, lr=1e-2,
                            eps=1e-2)
    for _ in range(4):
        spent.step(losses(len(spent.sample_batch())))
    return model, spent


def test_a_restored_private_optimizer_never_reports_less_than_was_spent():
    model, spent = spent_dpzero()
    assert spent.epsilon_spent > 40
    restored = slimtune.DPZero(model, dataset_size=72, batch_size=8, steps=8, epsilon=1.0, delta=1e-3, lr=1e-2,
                               eps=1e-2)
    try:
        restored.load_state_dict(spent.state_dict())
    except SlimtuneError:
        return  # refused: the steps cannot be re-priced at another noise
    assert restored.epsilon_spent >= spent.epsilon_spent * (1 - 1e-6), (restored.epsilon_spent, spent.epsilon_spent)


def test_the_private_loader_honours_the_trainers_dataloader_settings(tmp_path):
    """The private loader (Poisson batches) took num_workers and pin_memory from TrainingArguments but silently dropped
    dataloader_prefetch_factor and dataloader_persistent_workers."""
    tok = tokenizer()
    args = hf_args(tmp_path, max_steps=1, dataloader_num_workers=1, dataloader_prefetch_factor=3,
                   dataloader_persistent_workers=True)
    trainer = ZOTrainer(model=model_for(tok, "lora"), args=args, train_dataset=lm_dataset(tok),
                        data_collator=DataCollatorForLanguageModeling(tok, mlm=False), zo_args=private())
    trainer.state.max_steps = 1  # as train() sets it before building the optimizer
    trainer.create_optimizer()
    loader = trainer.get_train_dataloader()
    inner = getattr(loader, "base_dataloader", loader)
    assert (inner.prefetch_factor, inner.persistent_workers) == (3, True)
