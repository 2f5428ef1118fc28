"""Review 52: slimtune from Python and from Hugging Face, as a careless user and as a privacy attacker.

1. A private ZOTrainer's held-out check (`_check_held_out`, `_row_key`) keys a tokenized row by its input_ids as they
   are, pad tokens included. An eval set tokenized with `padding="max_length"` (the usual way to tokenize an eval set)
   that holds copies of training rows passes the check, and `evaluate()` then returns each copied training row's loss
   un-noised (per_device_eval_batch_size=1: one row's loss; identical to the unpadded row's, since the collator labels
   pads -100 and the attention mask hides them).
2. `TrainingArguments(debug="underflow_overflow")` is not refused for private runs: transformers' DebugUnderflowOverflow
   hooks every module and, on an inf/nan, `print()`s (stdout, which `withheld` does not silence) the abs min/max of the
   last forwards' activations and inputs of the *private batch* (the Embedding's input[0] abs max is the batch's
   largest token id) and its batch number, before the step's error is withheld.
3. `TrainingArguments(learning_rate=5e-5)` (the value of every HF tutorial) is silently replaced by the defaults
   table's 1e-3 (20x): a value equal to transformers' default counts as "not set", and nothing says which lr was used.
4. The hybrids' CLI default warms up over 0.75% of the steps (defaults.HYBRID_WARMUP: 3 steps of 400); a ZOTrainer
   with `optimizer="hybrid"` gets transformers' warmup_steps=0 while its lr and eps come from the same table, and the
   docs say the defaults are slimtune's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import pytest
import torch

datasets = pytest.importorskip("datasets")
from transformers import DataCollatorForLanguageModeling  # noqa: E402

from slimtune import SlimtuneError  # noqa: E402
from slimtune.hf import ZOArguments, ZOTrainer  # noqa: E402

from test_hf import ROWS, held_out_dataset, hf_args, lm_dataset, model_for, tokenizer  # noqa: E402
from conftest import DEMO  # noqa: E402


def _private_trainer(tmp_path, tok, model=None, eval_dataset=None, **kwargs):
    return ZOTrainer(model=model if model is not None else model_for(tok, "lora"),
                     args=hf_args(tmp_path, **{"max_steps": 4, "per_device_eval_batch_size": 1, **kwargs}),
                     train_dataset=lm_dataset(tok),
                     eval_dataset=eval_dataset if eval_dataset is not None else held_out_dataset(tok),
                     data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                     zo_args=ZOArguments(optimizer="dpzero", epsilon=6))


def test_private_eval_refuses_padded_copies_of_training_rows(tmp_path):
    tok = tokenizer()
    padded = datasets.Dataset.from_dict({"text": ROWS[:4]}).map(
        lambda b: tok(b["text"], padding="max_length", max_length=64), batched=True, remove_columns=["text"])
    trainer = _private_trainer(tmp_path, tok)
    # the same training row, padded, has exactly the loss of the row itself (pads are labelled -100 and masked)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    model = trainer.model.eval()
    with torch.no_grad():
        plain = model(**collator([dict(tok(ROWS[0]))])).loss
        copy = model(**collator([dict(padded[0])]))
    assert torch.equal(plain, copy.loss)
    with pytest.raises(SlimtuneError, match="shares rows"):
        trainer.evaluate(eval_dataset=padded)
    with pytest.raises(SlimtuneError, match="shares rows"):
        _private_trainer(tmp_path, tok, eval_dataset=padded)


def test_private_trainer_prints_no_activation_of_a_private_batch_under_debug_underflow_overflow(tmp_path):
    tok = tokenizer()
    model = model_for(tok, "lora")
    with torch.no_grad():  # an overflowing weight: the first forward of a step trips the detector
        model.get_input_embeddings().weight[7] = float("inf")
    stdout = io.StringIO()
    try:
        trainer = _private_trainer(tmp_path, tok, model=model, debug="underflow_overflow")
    except SlimtuneError:
        return  # refused by name, as NOT_HONOURED refuses the other settings that would release a batch
    with contextlib.redirect_stdout(stdout):
        try:
            trainer.train()
        except SlimtuneError:
            pass  # the step's error is withheld; what was printed before it is not
    printed = stdout.getvalue()
    assert "input[0]" not in printed and "Detected inf/nan" not in printed, printed[:400]


def test_learning_rate_equal_to_transformers_default_is_not_silently_replaced(tmp_path, caplog):
    tok = tokenizer()
    stdout, stderr = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        warnings.simplefilter("always")
        try:
            trainer = ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=1, learning_rate=5e-5),
                                train_dataset=lm_dataset(tok), data_collator=DataCollatorForLanguageModeling(tok,
                                                                                                         mlm=False),
                                zo_args=ZOArguments(optimizer="mezo"))
            trainer.create_optimizer()
        except SlimtuneError:
            return  # refused as ambiguous: fine
    lr = trainer.zo_optimizer().param_groups[0]["lr"]
    said = " ".join([str(w.message) for w in caught] + [caplog.text, stdout.getvalue(), stderr.getvalue()])
    assert lr == 5e-5 or "learning_rate" in said, f"lr {lr} used instead of the given 5e-5, silently"


def test_zotrainer_hybrid_warms_up_as_the_cli_default(tmp_path):
    import slimtune

    cli = slimtune.train(data=str(DEMO / "sst2_demo_train.tsv"), model="tiny-llama", optimizer="hybrid", peft="lora",
                         steps=400, out=str(tmp_path / "cli"), dry_run=True)
    assert cli["warmup_steps"] > 0  # the CLI's table default for the hybrid
    tok = tokenizer()
    trainer = ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=400),
                        train_dataset=lm_dataset(tok), data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                        zo_args=ZOArguments(optimizer="hybrid"))
    trainer.create_optimizer_and_scheduler(num_training_steps=400)
    peak = trainer.zo_optimizer().param_groups[0]["initial_lr"]
    first = trainer.lr_scheduler.get_last_lr()[0]
    assert first < peak, (f"ZOTrainer hybrid starts at the peak lr {peak} (warmup_steps=0), the CLI warms up over "
                          f"{cli['warmup_steps']} steps")


def test_a_print_inside_a_private_step_goes_nowhere(capsys):
    """The class of finding 2: anything a library prints inside a private step (withheld) is discarded, stdout and
    stderr alike, and printing works again after it."""
    import sys

    from slimtune.privacy.withhold import withheld

    with withheld("a private training step failed at step 1"):
        print("row 17: a secret sentence")
        sys.stderr.write("the batch's largest token id: 4242\n")
    print("after the step")
    out = capsys.readouterr()
    assert "secret" not in out.out + out.err and "4242" not in out.out + out.err, out
    assert "after the step" in out.out
