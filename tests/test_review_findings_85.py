"""Review 85 (adversarial privacy review): canary rows in private runs against what leaves the process.

Each test runs the same private run twice, once with and once without a canary training row, and compares what a
user (or a log collector) sees; a difference is a per-example side channel outside the accounted releases.
"""

from __future__ import annotations

import io
import logging

import pytest
import torch

datasets = pytest.importorskip("datasets")
from transformers import DataCollatorForLanguageModeling, TrainingArguments  # noqa: E402

from slimtune import SlimtuneError  # noqa: E402
from slimtune.hf import ZOArguments, ZOTrainer  # noqa: E402
from slimtune.models.loading import tiny_model, tiny_tokenizer  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
TRAIN_ROWS = [" ".join(WORDS[i:i + 4]) for i in range(30)]  # 4 tokens each
EVAL_ROWS = ["e1 e2 e3", " ".join(f"v{i}" for i in range(20))]  # public; one of 20 tokens


def _private_trainer(tmp_path, train_rows, eval_rows, transform_kwargs=None, **args):
    """A private ZOTrainer whose datasets are tokenized when read (set_transform, a common pattern), the tokenizer
    claiming a model_max_length of 8 tokens (a real checkpoint's tokenizer has one: SmolLM2's is 8192)."""
    tok = tiny_tokenizer([r for r in train_rows if r] + eval_rows)
    tok.model_max_length = 8
    kwargs = transform_kwargs or {}

    def tokenize(batch):
        return tok(batch["text"], **kwargs)

    train, evaluation = tokenized_when_read(train_rows, tokenize), tokenized_when_read(eval_rows, tokenize)
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], logging_steps=1,
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=7, max_steps=2,
                remove_unused_columns=False)
    trainer = ZOTrainer(model=model, args=TrainingArguments(**{**base, **args}), train_dataset=train,
                        eval_dataset=evaluation, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                        zo_args=ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2))
    return trainer


def tokenized_when_read(rows, tokenize):
    """A datasets.Dataset of `rows` (a "text" column) tokenized when read (set_transform); None for no rows."""
    if not rows:
        return None
    dataset = datasets.Dataset.from_dict({"text": rows})
    dataset.set_transform(tokenize)
    return dataset


def _transformers_log(run) -> str:
    """What transformers' loggers print while `run()` runs (their own handler on stderr sees the same lines)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        run()
    finally:
        root.removeHandler(handler)
    return buffer.getvalue()


# -- 1. a warning silenced inside a private block is remembered, and its absence later says a row triggered it ------
def test_a_long_training_row_does_not_silence_the_public_evaluations_warning(tmp_path, hf_offline):
    """transformers' tokenizers say "Token indices sequence length is longer than the specified maximum ..." once per
    tokenizer (a flag in `deprecation_warnings`, set whether or not the line is printed). A private ZOTrainer reads
    training rows inside `silenced()` (its held-out check, in the constructor, reads every training row before the
    evaluation rows; the Poisson batches are collated inside `withheld`): a training row over the tokenizer's
    model_max_length sets the flag there, silently, and the public evaluation's own long row then prints nothing. Whether the warning appears at evaluation tells whether some
    training row is longer than model_max_length: a per-example signal on stderr, outside the releases."""
    seen = []
    for canary in (False, True):
        rows = list(TRAIN_ROWS)
        if canary:
            rows[3] = " ".join(WORDS[:20])  # the canary: one training row of 20 tokens
        log = _transformers_log(lambda: _private_trainer(tmp_path / str(canary), rows, EVAL_ROWS,
                                                         eval_strategy="steps", eval_steps=1).train())
        seen.append([line for line in log.splitlines() if "sequence length is longer" in line])
    assert seen[0], "the public evaluation's long row is warned about (the attack's baseline)"
    assert seen[1] == seen[0], ("whether transformers warns about the public evaluation row depends on a training "
                                f"row: without the canary {seen[0]}, with it {seen[1]}")


# -- 2. a row that becomes several rows is refused only at the secret step whose batch holds it ----------------------
class _FixedBatches:
    """Poisson batches as drawn from a key, made reproducible: steps 1 and 2's batches do not hold row 3, step 3's
    does (the loader collates one batch ahead of the steps)."""

    BATCHES = {0: [0, 1, 2, 4], 1: [5, 6, 7, 8], 2: [3, 9, 10, 11]}

    def __init__(self, n, batch_size, **kwargs):
        pass

    def indices(self, step):
        return list(self.BATCHES.get(step, [8, 9]))


def test_a_row_that_reads_as_several_rows_is_refused_before_any_step_not_at_the_step_that_drew_it(tmp_path,
                                                                                                   hf_offline,
                                                                                                   monkeypatch):
    """A tokenizing transform that splits long texts (return_overflowing_tokens) turns one long training row into
    several rows; the private trainer refuses a batch whose rows are not one per example, but only when a Poisson batch
    draws that row: the run trains (and releases) until the secret step whose batch holds the canary, then stops with
    an error. Whether, and at which step, the run fails says that the row exists and which secret batch held it. The
    check belongs before the first release (as the held-out check reads every row), or not at all."""
    import slimtune.data as data
    monkeypatch.setattr(data, "PoissonSampler", _FixedBatches)
    outcome = []
    for canary in (False, True):
        rows = list(TRAIN_ROWS)
        if canary:
            rows[3] = " ".join(WORDS[:20])  # 20 tokens: three rows of at most 8
        trainer = _private_trainer(tmp_path / str(canary), rows, [], transform_kwargs=dict(
            truncation=True, max_length=8, return_overflowing_tokens=True), max_steps=3)
        transform = trainer.train_dataset._format_kwargs["transform"]

        def without_mapping(batch, transform=transform):
            out = transform(batch)
            out.pop("overflow_to_sample_mapping", None)
            return out
        trainer.train_dataset.set_transform(without_mapping)
        outcome.append(trained_or_refused(trainer))
    assert_refused_before_any_step(outcome)


def test_a_training_row_the_collator_cannot_read_is_refused_before_any_step_not_at_the_step_that_drew_it(
        tmp_path, hf_offline, monkeypatch):
    """`slimtune train` reads and checks every training row before its first step; a private ZOTrainer reads a row
    only when a Poisson batch draws it (EmptyAware, inside `withheld`). A row its tokenizing transform cannot read (a
    null text) makes the run release steps until the secret step whose batch holds it, then fail with "reading or
    collating a private training batch failed": the failure and its step are a function of the canary row and of the
    secret sampling."""
    import slimtune.data as data
    monkeypatch.setattr(data, "PoissonSampler", _FixedBatches)
    outcome = []
    for canary in (False, True):
        rows = list(TRAIN_ROWS)
        if canary:
            rows[3] = None  # the canary: a row the tokenizer cannot read
        trainer = _private_trainer(tmp_path / str(canary), rows, [], max_steps=3)
        outcome.append(trained_or_refused(trainer))
    assert_refused_before_any_step(outcome)


def trained_or_refused(trainer) -> tuple[str, int]:
    """("completed" or "refused", the steps released) of a private trainer's train()."""
    try:
        trainer.train()
        return "completed", trainer.state.global_step
    except SlimtuneError:
        return "refused", trainer.state.global_step


def assert_refused_before_any_step(outcome: list) -> None:
    """Without the canary the 3-step run completes; with it, it completes too or is refused before any release (not
    at the secret step whose Poisson batch drew the canary)."""
    assert outcome[0] == ("completed", 3)
    assert outcome[1] in (("completed", 3), ("refused", 0)), (
        f"with the canary row the private run {outcome[1][0]} after {outcome[1][1]} released step(s): the step the "
        "failure comes at is the secret step whose Poisson batch drew the canary")


# -- 4. the same remembered warning in `slimtune train`: a resumed run's first evaluation ----------------------------
def _local_model_and_data(tmp_path, canary: bool):
    """A checkpoint directory of the tiny model whose tokenizer claims model_max_length 20 (as a real checkpoint's
    claims its own), short training rows (one of 30 words with the canary) and evaluation rows, one of them long."""
    from slimtune.models.loading import tiny_model, tiny_tokenizer
    train_rows = [f"a{i} b{i} c{i}" for i in range(24)]
    if canary:
        train_rows[5] = " ".join(f"z{i}" for i in range(30))
    eval_rows = [f"d{i} e{i}" for i in range(7)] + [" ".join(f"y{i}" for i in range(30))]
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", eval_rows)):
        (tmp_path / name).write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(rows)))
    tok = tiny_tokenizer(train_rows + eval_rows + ["Review: Sentiment: negative positive"])
    tok.model_max_length = 20
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")


def test_a_resumed_private_runs_evaluation_warning_does_not_depend_on_the_rows_it_trained_on(tmp_path, monkeypatch):
    """`slimtune train --resume` of a private run: the resumed process has no step-0 evaluation, so its first
    tokenization of the evaluation rows comes after private steps. A training row longer than the tokenizer's
    model_max_length, tokenized inside `withheld` (silenced), sets the tokenizer's once-only flag; the evaluation's
    long (public) row is then not warned about. With the canary the resumed run's stderr lacks the warning it has
    without: a per-example signal (with Poisson batches: whether the canary was drawn before that evaluation)."""
    import slimtune.train.trainer as trainer_module
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.privacy import PrivacySpec
    from slimtune.train import TrainConfig, prepare, train

    original = trainer_module._checkpoint
    seen = []
    for canary in (False, True):
        root = tmp_path / str(canary)
        _local_model_and_data(root, canary)

        def config(root=root):
            return TrainConfig(out_dir=str(root / "run"), train_data=str(root / "train.tsv"),
                               eval_data=str(root / "dev.tsv"), model=str(root / "model"), optimizer="dpzero",
                               optim=OptimizerArgs(lr=1e-2, eps=1e-2), peft=PeftSettings("lora", r=2), steps=4,
                               batch_size=24, eval_every=2, checkpoint_every=2, progress=False,
                               lr_scheduler="constant", save="last", max_length=64,
                               privacy=PrivacySpec(delta=1e-3, noise_multiplier=1.0))  # batch = N: every row drawn

        def stop_after_step_2(run, step, *args, **kwargs):
            original(run, step, *args, **kwargs)
            if step == 2:
                raise KeyboardInterrupt  # the process is stopped after step 2's checkpoint

        monkeypatch.setattr(trainer_module, "_checkpoint", stop_after_step_2)
        with pytest.raises(KeyboardInterrupt):
            train(prepare(config()))
        monkeypatch.setattr(trainer_module, "_checkpoint", original)
        log = _transformers_log(lambda: train(prepare(config(), resume=True)))
        seen.append([line for line in log.splitlines() if "sequence length is longer" in line])
    assert seen[0], "the resumed run's evaluation warns about its long public row (the attack's baseline)"
    assert seen[1] == seen[0], ("a resumed private run's evaluation warning depends on a training row: without the "
                                f"canary {seen[0]}, with it {seen[1]}")
