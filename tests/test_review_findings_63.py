"""Review 63: the Python API and the Hugging Face trainer used as a transformers/peft/TRL practitioner would.

A private ZOTrainer replaces the model's own loss by `per_example_losses`, which only reproduces a causal LM's
shifted cross-entropy and a single-label classifier's cross-entropy: other models transformers' Trainer trains with
their own loss are silently trained on another objective (an encoder-decoder's labels shifted a second time, a
multi-label classifier's multi-hot targets read as a softmax distribution) or fail mid-run with the withheld
message instead of a refusal before any work (a regression head). And a private run's `train()` returns
`TrainOutput.training_loss == 0.0`, a made-up value that reads as a perfect fit.
"""

import math

import pytest
import torch

datasets = pytest.importorskip("datasets")
from transformers import (DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, LlamaConfig,  # noqa: E402
                          LlamaForSequenceClassification, T5Config, T5ForConditionalGeneration,
                          default_data_collator)

from slimtune import SlimtuneError  # noqa: E402
from slimtune.hf import ZOArguments, ZOTrainer  # noqa: E402
from slimtune.models.loading import tiny_model, tiny_tokenizer  # noqa: E402

from conftest import DEMO, hf_args  # noqa: E402

ROWS = [line.split("\t")[0] for line in (DEMO / "sst2_demo_train.tsv").read_text().splitlines()[1:]]
DEV = [line.split("\t")[0] for line in (DEMO / "sst2_demo_dev.tsv").read_text().splitlines()[1:]]
PRIVATE = dict(optimizer="dpzero", epsilon=2.0, lr=1e-3, eps=1e-2)


pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(ROWS)


def classifier(tok, problem_type: str, num_labels: int):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         num_labels=num_labels, problem_type=problem_type)
    return LlamaForSequenceClassification(config)


def classification_rows(tok, labels):
    enc = tok(ROWS[:32], padding="max_length", max_length=24, truncation=True)
    return datasets.Dataset.from_dict({**enc, "labels": labels})


def test_private_multi_label_classifier_is_not_silently_trained_on_softmax_cross_entropy(tmp_path, tok):
    """problem_type="multi_label_classification": the model's own loss (what Trainer and a non-private ZOTrainer
    optimise) is BCE-with-logits over its labels; per_example_losses hands the multi-hot float labels to
    F.cross_entropy, which reads them as class probabilities: a softmax objective the user never chose, without a
    word. Either refuse the model before any work, or clip the model's own per-example loss."""
    model = classifier(tok, "multi_label_classification", 3)
    data = classification_rows(tok, [[float((i + j) % 2) for j in range(3)] for i in range(32)])
    try:
        trainer = ZOTrainer(model=model, args=hf_args(tmp_path), train_dataset=data,
                            data_collator=default_data_collator, zo_args=ZOArguments(**PRIVATE))
    except SlimtuneError:
        return  # refused clearly, before any work
    batch = default_data_collator([data[i] for i in range(4)])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        own = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="none").mean(1)
        private = trainer.per_example_losses(model, batch)
    assert torch.allclose(private, own, atol=1e-5), (private, own)


def test_private_encoder_decoder_loss_is_the_models_own_not_shifted_twice(tmp_path, tok):
    """A T5/BART with DataCollatorForSeq2Seq(model=...) (decoder_input_ids are the labels shifted right, as every
    seq2seq tutorial sets up): logits at decoder position t predict labels[t]. per_example_losses shifts them again
    (logits[:, :-1] vs labels[:, 1:]), so a private run trains the model to predict the token after next, silently.
    Either refuse encoder-decoder models before any work, or compare logits with labels unshifted."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                      pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    model = T5ForConditionalGeneration(config)
    enc = tok(ROWS[:32], truncation=True, max_length=16)
    data = datasets.Dataset.from_dict({**enc, "labels": tok(ROWS[32:64], truncation=True, max_length=8)["input_ids"]})
    collator = DataCollatorForSeq2Seq(tok, model=model)
    try:
        trainer = ZOTrainer(model=model, args=hf_args(tmp_path), train_dataset=data, data_collator=collator,
                            zo_args=ZOArguments(**PRIVATE))
    except SlimtuneError:
        return  # refused clearly, before any work
    batch = collator([data[i] for i in range(4)])
    model.eval()  # a fresh T5 is in training mode: dropout would make two forwards differ (ZO steps run in eval mode)
    with torch.no_grad():
        logits = model(**batch).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100,
                                                reduction="none")
        mask = batch["labels"] != -100
        own = (nll * mask).sum(1) / mask.sum(1)
        private = trainer.per_example_losses(model, batch)
    assert torch.allclose(private, own, atol=1e-4), (private, own)


def test_private_regression_head_is_refused_before_any_step_or_trains(tmp_path, tok):
    """problem_type="regression" (STS-B style, num_labels=1): per_example_losses calls cross_entropy on one logit
    and a float target, which fails inside the first private step; the user gets "a private training step failed at
    step 1; its details are withheld" after the run started, for a property of the model's public config. Refuse it
    by name before any work (or clip the model's own per-example MSE)."""
    model = classifier(tok, "regression", 1)
    data = classification_rows(tok, [float(i % 5) for i in range(32)])
    try:
        trainer = ZOTrainer(model=model, args=hf_args(tmp_path), train_dataset=data,
                            data_collator=default_data_collator, zo_args=ZOArguments(**PRIVATE))
        trainer.train()
    except SlimtuneError as exc:
        assert "withheld" not in str(exc) and ("regression" in str(exc) or "problem_type" in str(exc)), str(exc)
        return
    assert trainer.state.global_step == 2  # it trained: then its loss must have been a per-example regression loss


def test_private_train_output_does_not_report_a_made_up_training_loss(tmp_path, tok):
    """`trainer.train()` returns TrainOutput(global_step, training_loss, metrics). In a private run every step's
    loss is NaN (not released) and transformers' logging_nan_inf_filter (on by default) replaces each NaN by the
    running average of the previous ones, 0: `training_loss` comes back as 0.0, a number that reads as a perfect fit
    (a notebook prints it, a sweep logs it). It should say "not released" (NaN or None), as the logs do by leaving
    the loss out."""
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
    train = datasets.Dataset.from_dict({"text": ROWS}).map(lambda b: tok(b["text"]), batched=True,
                                                           remove_columns=["text"])
    trainer = ZOTrainer(model=model, args=hf_args(tmp_path), train_dataset=train,
                        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                        zo_args=ZOArguments(**PRIVATE))
    out = trainer.train()
    assert out.training_loss is None or math.isnan(out.training_loss), out.training_loss
