"""Review 86 (adversarial): a completed private run's key retirement (3cc1637), the said-once guard and the private
ZOTrainer's row check (dae409c). Each test failed on the code it was written against."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import cli, one_line_error  # noqa: E402

from test_privacy_key_retirement import data_file as _data  # noqa: E402
from test_privacy_key_retirement import failing_second_step  # noqa: E402
from test_privacy_key_retirement import train as _train  # noqa: E402
from test_review_findings_85 import (assert_refused_before_any_step, tokenized_when_read,  # noqa: E402
                                     trained_or_refused)


# -- 1. key retirement: a RUN/secret.key that is a symbolic link ----------------------------------------------------
def test_a_run_key_that_is_a_symbolic_link_does_not_end_a_completed_run_in_an_internal_error(tmp_path):
    """A new private run accepts a RUN/secret.key already there (CLAIM_FILES), read through a symbolic link (the user
    keeps the key on another volume and links it in; a resume reads a linked key the same way). retire_key_file opens
    it with O_NOFOLLOW: ELOOP, an OSError that is not FileNotFoundError, escapes after status.json already says
    `completed` and `"key": "retired"`. The user sees `error: internal error (OSError: [Errno 40] Too many levels of
    symbolic links ...)`, exit 1, and the run directory still holds secret.key (the link, which reads as the key)
    while its status.json says the key was retired, i.e. that the directory may be shared whole."""
    from slimtune.privacy.secret import create_key_file
    vault = tmp_path / "vault"
    vault.mkdir()
    create_key_file(vault / "run.key")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(vault / "run.key", run / "secret.key")
    res = _train(run, _data(tmp_path))
    if res.exit_code == 2:  # refused before any work, in one line: acceptable
        one_line_error(res)
        return
    assert res.exit_code == 0, res.output[-800:]
    status = json.loads((run / "status.json").read_text())
    holds_key = (run / "secret.key").exists() or (run / "secret.key").is_symlink()
    assert not (status.get("key") == "retired" and holds_key), (
        f"status.json says the key was retired, but {run / 'secret.key'} is still there")


# -- 2. key retirement: a --secret-key-file of another run ----------------------------------------------------------
def test_a_completed_run_does_not_retire_a_key_file_another_run_was_given(tmp_path, monkeypatch):
    """The docs (threat-model.md): "a --secret-key-file you gave is yours and is never touched". Run A keeps its own
    key in A/secret.key; run B is given that file with --secret-key-file (one key file for several runs is supported:
    each run's nonce keeps its noise its own) so that B can be extended later. When A completes it retires
    A/secret.key, and B, never told, can no longer be resumed: its --secret-key-file was touched (destroyed)."""
    from slimtune.train import trainer
    data = _data(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    real_step = failing_second_step(monkeypatch)
    assert _train(a, data, steps=3).exit_code != 0  # A stopped part-way: its key is there
    monkeypatch.setattr(trainer, "_train_step", real_step)
    key = a / "secret.key"
    assert key.is_file()
    res = _train(b, data, "--secret-key-file", key, "--noise-multiplier", "1")
    if res.exit_code == 2:  # (lead) refused before any work: another run's own key file is not taken as B's
        line = one_line_error(res)
        assert "--secret-key-file" in line and "copy" in line, line
        assert key.is_file()
        return
    assert res.exit_code == 0, res.output[-800:]
    assert cli("train", "--resume", "--out", a, "--quiet").exit_code == 0  # A completes
    res = cli("train", "--resume", "--out", b, "--steps", "3", "--quiet", "--secret-key-file", key)
    assert res.exit_code == 0, ("run B's --secret-key-file was retired by run A's completion: "
                                + res.output[-600:])


# -- 3. the Python API's dry run of a resume skips the resume's checks ------------------------------------------------
def test_the_python_apis_dry_run_resume_of_a_completed_private_run_is_refused_as_the_clis(tmp_path):
    """`slimtune train --resume --dry-run` of a completed private run whose key was retired is one line ("... retired
    its key ..."); `slimtune.train(out=..., resume=True, dry_run=True)` (documented: "resolves and checks them")
    returns the resolved configuration as if the resume could run (it skips check_resume and check_output_dir), and
    the real resume is then refused."""
    import slimtune
    from slimtune import SlimtuneError
    run = tmp_path / "run"
    assert _train(run, _data(tmp_path)).exit_code == 0
    line = one_line_error(cli("train", "--resume", "--dry-run", "--out", run, "--steps", "4", "--quiet"))
    assert "retired" in line
    with pytest.raises(SlimtuneError, match="retired"):
        slimtune.train(out=str(run), resume=True, steps=4, dry_run=True)


# -- 4./5. the private ZOTrainer's row check -------------------------------------------------------------------------
datasets = pytest.importorskip("datasets")

WORDS = [f"w{i}" for i in range(40)]
TRAIN_ROWS = [" ".join(WORDS[i:i + 4]) for i in range(30)]
EVAL_ROWS = [" ".join(WORDS[i:i + 6]) for i in range(8)]


class _FixedBatches:
    """Poisson batches made reproducible: steps 1 and 2's batches do not hold row 3, step 3's does."""

    BATCHES = {0: [0, 1, 2, 4], 1: [5, 6, 7, 8], 2: [3, 9, 10, 11]}

    def __init__(self, n, batch_size, **kwargs):
        pass

    def indices(self, step):
        return list(self.BATCHES.get(step, [8, 9]))


def _trainer(tmp_path, rows, tok, model, collator, eval_rows=None, **args):
    from transformers import TrainingArguments

    from slimtune.hf import ZOArguments, ZOTrainer

    def tokenize(batch):
        return tok(batch["text"])

    train, evaluation = tokenized_when_read(rows, tokenize), tokenized_when_read(eval_rows, tokenize)
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], logging_steps=1,
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=7, max_steps=3, remove_unused_columns=False)
    return ZOTrainer(model=model, args=TrainingArguments(**{**base, **args}), train_dataset=train,
                     eval_dataset=evaluation, data_collator=collator,
                     zo_args=ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2))


def test_a_training_row_the_model_cannot_embed_is_refused_before_any_step_not_at_the_step_that_drew_it(
        tmp_path, hf_offline, monkeypatch):
    """_check_private_rows reads and collates every row before the first step, but runs no row through the model. A
    tokenizer with a token added and the model not resized (a common slip: `tok.add_tokens([...])` without
    `model.resize_token_embeddings`) gives the rows holding that token ids past the embedding: they collate, and fail
    only in the forward of the secret step whose Poisson batch drew them ("a private training step failed at step
    3", after 2 released steps). Whether and when the run fails is a function of the canary row and the secret
    batches: exactly what the check was added to prevent."""
    import slimtune.data as data
    from transformers import DataCollatorForLanguageModeling

    from slimtune import SlimtuneError
    from slimtune.models.loading import tiny_model, tiny_tokenizer
    monkeypatch.setattr(data, "PoissonSampler", _FixedBatches)
    outcome = []
    for canary in (False, True):
        rows = list(TRAIN_ROWS)
        tok = tiny_tokenizer(rows)
        vocab = len(tok)
        tok.add_tokens(["newword"])  # the model below is not resized
        if canary:
            rows[3] = "w1 newword w2 w3"
        model = tiny_model("tiny-llama", vocab, tok.pad_token_id, tok.eos_token_id, seed=0)
        trainer = _trainer(tmp_path / str(canary), rows, tok, model, DataCollatorForLanguageModeling(tok, mlm=False))
        outcome.append(trained_or_refused(trainer))
    assert_refused_before_any_step(outcome)


def test_a_random_collator_in_the_private_row_check_does_not_carry_a_training_row_into_public_evaluation(
        tmp_path, hf_offline):
    """A random collator (DataCollatorForLanguageModeling with masking, or any augmentation) draws from torch's
    process-global generator. _check_private_rows collates every training row inside a private block (and the
    Poisson batches are collated there too) and nothing puts the generator back: how far it moved depends on the
    training rows (a longer row pads its chunk wider: more mask draws). The evaluation that follows (eval_on_start:
    a public model on public rows, before any release) then masks its public rows differently, so its eval_loss,
    printed and logged, differs with and without the canary row."""
    from transformers import DataCollatorForLanguageModeling

    from slimtune.models.loading import tiny_model, tiny_tokenizer
    losses = []
    for canary in (False, True):
        rows = list(TRAIN_ROWS)
        if canary:
            rows[3] = " ".join(WORDS[:20])  # the canary: one long training row (its words are all in the vocabulary)
        tok = tiny_tokenizer(TRAIN_ROWS + EVAL_ROWS)  # the same tokenizer and model in both runs
        tok.mask_token = "<unk>"
        model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
        trainer = _trainer(tmp_path / str(canary), rows, tok, model,
                           DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.5), EVAL_ROWS,
                           max_steps=1, eval_strategy="steps", eval_steps=100, eval_on_start=True)
        trainer.train()
        losses.append([h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h][0])
    assert losses[0] == losses[1], (f"the public evaluation at step 0 (no release yet) reports eval_loss {losses[0]} "
                                    f"without the canary training row and {losses[1]} with it")
