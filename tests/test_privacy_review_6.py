"""Privacy review 6: the newer private paths (dphybrid, dphizoo, DP-SGD, the Hugging Face trainer, federated local DP)
attacked as someone who sees everything a private run prints, writes or sends. Each test failed before its fix.

1. A private step said things through `logging`: `withheld` dropped `warnings` only, so the tokenizer's
   "Token indices sequence length is longer than ... (36 > 5)" (a training row's length, printed during the step
   whose Poisson batch held it) reached stderr from `slimtune train`, private federated clients and the trainer.
2. The Hugging Face trainer collated each private Poisson batch outside `withheld` (transformers fetches the next
   batch before `training_step`): a collator's warnings, log lines and exception texts (rows, lengths) got out.
3. A private federated client's failures outside its local steps (its own data file: a bad label, a line number)
   went to the server as Flower's error reason, with the row's value, and into the server's log.
4. The trainer checked that it evaluates held-out rows only at construction and for a dataset passed to evaluate():
   an eval_dataset assigned later (the training loop's evaluations) or predict() scored training rows un-noised.
"""

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from slimtune import SlimtuneError
from slimtune.privacy.withhold import withheld

from conftest import DEMO

LONG_ROW = "Token indices sequence length is longer than the specified maximum"


class Said(logging.Handler):
    """Every record the library loggers emit (transformers' own handler writes to whatever stderr it was made with,
    which pytest's capture may not see)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def said():
    handler = Said()
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def test_nothing_is_logged_inside_a_private_step(said):
    """withheld silences every library logger, not only Python warnings (and restores logging after)."""
    library = logging.getLogger("transformers.tokenization_utils_base")
    with withheld("a private step failed"):
        library.warning("row 'SECRET' has 36 tokens")
        with withheld("a nested block"):  # a federated client's round holds its steps' block
            pass
        logging.getLogger().error("row 'SECRET' again")  # still inside the outer block
    assert "SECRET" not in said.text
    library.warning("after the step: shown")
    assert "after the step: shown" in said.text


def test_a_private_generation_run_prints_no_training_rows_token_count(tmp_path, capfd, said):
    """The first encode of a long training row happens inside a private step (nothing is tokenized at load time in a
    private run); transformers then logs the row's token count, once, at the step whose batch held it."""
    from slimtune.optim import OptimizerArgs
    from slimtune.peft import PeftSettings
    from slimtune.privacy import PrivacySpec
    from slimtune.train import TrainConfig, prepare, train
    from slimtune.train.objectives import GenerationSettings

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=str(DEMO / "e2e_demo_train.csv"),
                      eval_data=str(DEMO / "e2e_demo_dev.csv"), model="tiny-llama", task="generation",
                      optimizer="dpzero", optim=OptimizerArgs(), peft=PeftSettings("lora", r=2), steps=2,
                      batch_size=8, eval_every=0, checkpoint_every=2, progress=True,
                      privacy=PrivacySpec(target_epsilon=4.0, delta=1e-3),
                      generation=GenerationSettings("mr", "ref", eval_generate=False))
    run = prepare(cfg)
    run.tokenizer.model_max_length = 5  # every row is "too long" (SmolLM2: 8,192 tokens, a long document)
    capfd.readouterr()
    train(run)
    out, err = capfd.readouterr()
    assert "step 2/2" in out
    assert LONG_ROW not in out + err + said.text


# -- the Hugging Face trainer -------------------------------------------------------------------------------------
def _hf_trainer(tmp_path, collator):
    datasets = pytest.importorskip("datasets")
    from transformers import TrainingArguments

    import slimtune
    from slimtune.hf import ZOArguments, ZOTrainer
    from slimtune.models.loading import tiny_model, tiny_tokenizer

    rows = [line.split("\t")[0] for line in (DEMO / "sst2_demo_train.tsv").read_text().splitlines()[1:]]
    held_out = [line.split("\t")[0] for line in (DEMO / "sst2_demo_dev.tsv").read_text().splitlines()[1:]]
    tok = tiny_tokenizer(rows + held_out)
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
    torch.manual_seed(0)
    model = slimtune.apply_peft(model, "lora", r=4)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=7,
                             max_steps=2, remove_unused_columns=False)
    return ZOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": rows}),
                     eval_dataset=datasets.Dataset.from_dict({"text": held_out}), data_collator=collator(tok),
                     zo_args=ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2))


def tokenizing(tok, max_length: int | None = None):
    """A collator that tokenizes rows on the fly (without truncation), labels = the tokens."""
    if max_length:
        tok.model_max_length = max_length

    def collate(rows):
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    return collate


def test_a_private_trainer_collates_its_batches_without_saying_anything(tmp_path, capfd, said):
    """A collator that tokenizes on the fly (no truncation) made the tokenizer log a training row's length."""
    trainer = _hf_trainer(tmp_path, lambda tok: tokenizing(tok, max_length=3))
    capfd.readouterr()
    trainer.train()
    assert trainer.zo_optimizer().steps_taken == 2
    out, err = capfd.readouterr()
    assert LONG_ROW not in out + err + said.text


def test_a_private_trainer_withholds_a_collators_error_text(tmp_path):
    def failing(tok):
        def collate(rows):
            raise ValueError(f"cannot collate {rows[0]['text']!r} ({len(rows)} rows)")
        return collate

    trainer = _hf_trainer(tmp_path, failing)
    with pytest.raises(SlimtuneError, match="details are withheld") as err:
        trainer.train()
    assert "cannot collate" not in str(err.value) and err.value.__cause__ is None


@pytest.mark.parametrize("how", ["attribute", "predict"])
def test_a_private_trainer_never_scores_its_training_rows(tmp_path, how):
    """The held-out check ran at construction and on a dataset passed to evaluate(); an eval_dataset set afterwards
    (what the training loop's evaluations then use) or predict() on training rows scored them without noise."""
    trainer = _hf_trainer(tmp_path, tokenizing)
    with pytest.raises(SlimtuneError, match="shares rows with train_dataset"):
        if how == "attribute":
            trainer.eval_dataset = trainer.train_dataset.select(range(5))
            trainer.evaluate()
        else:
            trainer.predict(trainer.train_dataset.select(range(5)))


# -- federated local DP ---------------------------------------------------------------------------------------------
def test_a_private_clients_bad_row_is_not_sent_to_the_server(demo_paths, tmp_path, capsys):
    """The client's exception text is the Flower error reason the server receives and logs; a node's bad row (its
    line) stays on the node, which prints where it is on its own stderr, without the row's value (a private run's
    data errors quote no row)."""
    from test_federated import make_cfg
    from test_federated_local_dp import payload_for
    from slimtune.federated.client_app import local_train

    lines = Path(demo_paths[0]).read_text().splitlines()
    bad = lines[5].split("\t")
    bad[-1] = "SECRETLABEL"
    own = tmp_path / "node.tsv"
    own.write_text("\n".join(lines[:5] + ["\t".join(bad)] + lines[6:20]) + "\n")
    cfg = make_cfg(demo_paths, bits=8, local_optimizer="dpzero", local_dp_noise=1.0, batch_size=4)
    payload = payload_for(cfg)
    with pytest.raises(SlimtuneError) as err:
        local_train(replace(cfg, data=str(own)), 3, payload, 1, own_data=True)
    sent = str(err.value)
    assert "SECRETLABEL" not in sent and "node.tsv:6" not in sent and err.value.__cause__ is None
    assert "withheld" in sent
    shown = capsys.readouterr().err  # the node's operator sees where to fix it, and no row's value (review 59: a
    assert "node.tsv:6" in shown and "SECRETLABEL" not in shown, shown  # private run's errors quote no row)
    public = replace(make_cfg(demo_paths, bits=8), data=str(own))  # a non-private client is not covered: says it
    with pytest.raises(SlimtuneError, match="SECRETLABEL"):
        local_train(public, 3, payload_for(public), 1, own_data=True)
