"""Review 77: the Python API and the Hugging Face integration used carelessly or adversarially: values the CLI refuses,
checks deferred or naming what the caller never wrote, a documented argument that cannot be used, and the privacy
accounting functions answering for nonsense input."""

import pytest
import torch

import slimtune
from slimtune import SlimtuneError
from slimtune.models.loading import tiny_model, tiny_tokenizer

from conftest import DEMO, hf_args

ROWS = [line.split("\t")[0] for line in (DEMO / "sst2_demo_train.tsv").read_text().splitlines()[1:]]
DEV = [line.split("\t")[0] for line in (DEMO / "sst2_demo_dev.tsv").read_text().splitlines()[1:]]


def tiny(peft: str | None = "lora"):
    tok = tiny_tokenizer(ROWS)
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
    if peft:
        torch.manual_seed(0)
        model = slimtune.apply_peft(model, peft, r=4)
    return model, tok


def zo_trainer(tmp_path, zo_args, **kwargs):
    datasets = pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling

    from slimtune.hf import ZOTrainer
    model, tok = tiny()

    def ds(rows):
        return datasets.Dataset.from_dict({"text": rows}).map(lambda b: tok(b["text"]), batched=True,
                                                              remove_columns=["text"])
    return ZOTrainer(model=model, args=hf_args(tmp_path, **kwargs), train_dataset=ds(ROWS), eval_dataset=ds(DEV),
                     data_collator=DataCollatorForLanguageModeling(tok, mlm=False), zo_args=zo_args)


# -- 1. slimtune.privacy.epsilon / noise_multiplier (docs/reference/python.md, "Privacy accounting") ------------------

EPSILON_BASE = dict(noise_multiplier=1.0, dataset_size=100, batch_size=16, steps=20, delta=1e-5)


@pytest.mark.parametrize("name,value", [
    ("noise_multiplier", float("nan")),   # today: 0.0 -- "no privacy loss" for a NaN sigma
    ("quantile_noise", float("nan")),     # today: 0.0
    ("steps", float("nan")),              # today: 0.0
    ("steps", -5),                        # today: 0.0
    ("noise_multiplier", -1.0),           # today: 6.23 (the sign squared away)
    ("quantile_noise", -1.0),             # today: 12.06
    ("batch_size", 1000),                 # today: 30.1 for a "sampling rate" of 10 (DPZero refuses B > N)
    ("batch_size", 0),                    # today: 0.0
    ("dataset_size", 0),                  # today: ZeroDivisionError
    ("batch_size", -16),                  # today: dp_accounting's ValueError
    ("steps", 2.5),                       # today: dp_accounting's TypeError
    ("noise_multiplier", "1"),            # today: TypeError deep in the accountant
])
def test_privacy_epsilon_refuses_nonsense_instead_of_answering(name, value):
    """`slimtune.privacy.epsilon` is the documented way to price a budget before training; an input no run can have
    (NaN, a negative sigma, B > N, no examples) must be a one-line SlimtuneError naming the argument. Today a NaN
    noise multiplier (or NaN steps, NaN quantile_noise, negative steps) reports epsilon 0.0 -- perfect privacy --
    and the others answer a number or fail with a library's traceback."""
    with pytest.raises(SlimtuneError, match=name):
        slimtune.privacy.epsilon(**{**EPSILON_BASE, name: value})


NOISE_BASE = dict(epsilon=2.0, dataset_size=100, batch_size=16, steps=20, delta=1e-5)


@pytest.mark.parametrize("name,value", [
    ("epsilon", float("nan")),      # today: returns nan
    ("batch_size", 1000),           # today: 9.61
    ("batch_size", 0),              # today: ZeroDivisionError
    ("dataset_size", 0),            # today: ZeroDivisionError
    ("steps", 0),                   # today: 0.0227
    ("steps", -3),                  # today: 0.0227
])
def test_privacy_noise_multiplier_refuses_nonsense_instead_of_answering(name, value):
    with pytest.raises(SlimtuneError, match=name):
        slimtune.privacy.noise_multiplier(**{**NOISE_BASE, name: value})


def test_privacy_epsilon_errors_name_python_arguments_not_cli_flags():
    """`releases=0` is refused as "--n-spsa must be >= 1": a flag the caller of slimtune.privacy.epsilon never used
    (its argument is `releases`)."""
    with pytest.raises(SlimtuneError) as err:
        slimtune.privacy.epsilon(**{**EPSILON_BASE, "releases": 0})
    assert "--" not in str(err.value) and "releases" in str(err.value), str(err.value)


# -- 2. apply_peft's documented lora_dropout -------------------------------------------------------------------------

def test_apply_peft_lora_dropout_is_usable():
    """`slimtune.apply_peft(model, "lora", lora_dropout=0.1)` documents `lora_dropout: LoRA/PiSSA dropout.`, but any
    value other than 0 is refused with "lora_dropout applies only to ... optimizer adamw, sgd, ... (here: peft lora,
    optimizer mezo)": apply_peft takes no optimizer, so the caller (who may train with torch's AdamW) can neither
    change it nor use the argument at all."""
    model, _ = tiny(None)
    peft_model = slimtune.apply_peft(model, "lora", r=4, lora_dropout=0.1)
    drops = [m.p for m in peft_model.modules() if isinstance(m, torch.nn.Dropout)]
    assert 0.1 in drops


# -- 3. ZOArguments / ZOTrainer: what the CLI refuses ------------------------------------------------------------------

def test_zo_warmup_of_at_least_max_steps_is_refused(tmp_path, hf_offline):
    """`slimtune train --warmup-steps 10 --steps 2` is refused ("must be below --steps"); `ZOArguments(warmup_steps=10)`
    with `max_steps=2` trains the whole run inside the warm-up (learning rate 0, then 1e-4 of 1e-3) without a word."""
    from slimtune.hf import ZOArguments
    trainer = zo_trainer(tmp_path, ZOArguments(optimizer="mezo", lr=1e-3, eps=1e-2, warmup_steps=10), max_steps=2)
    with pytest.raises(SlimtuneError, match="warmup_steps"):
        trainer.train()


@pytest.mark.parametrize("kwargs,zo,named", [
    (dict(learning_rate=-1.0), {}, "learning_rate"),
    (dict(learning_rate=0.0), {}, "learning_rate"),
    (dict(learning_rate=1e9), {}, "learning_rate"),
    (dict(weight_decay=float("nan")), {}, "weight_decay"),
    (dict(weight_decay=-1.0), {}, "weight_decay"),
    ({}, dict(optimizer="fzoo", n_perturbations=1), "n_perturbations"),
])
def test_zo_trainer_refuses_bad_values_when_built_naming_what_the_user_set(tmp_path, hf_offline, kwargs, zo, named):
    """The trainer's checks "run when the trainer is built" (docs/how-to/hugging-face.md); a learning rate of -1, 0 or
    1e9 and a NaN or negative weight decay in TrainingArguments (all refused by the CLI), and FZOO's
    n_perturbations=1 (left out of the constructor's check_keywords), pass the constructor today and are refused only
    inside train(), as `slimtune.MeZO: lr -1: must be > 0` -- naming a class and keyword the user never wrote
    instead of TrainingArguments.learning_rate."""
    from slimtune.hf import ZOArguments
    with pytest.raises(SlimtuneError) as err:
        zo_trainer(tmp_path, ZOArguments(**zo), **kwargs)
    assert named in str(err.value), str(err.value)


def test_zo_arguments_of_a_wrong_type_are_a_one_line_error():
    """`ZOArguments(optimizer=["mezo"])` fails with `TypeError: unhashable type: 'list'` from `__post_init__`."""
    from slimtune.hf import ZOArguments
    with pytest.raises(SlimtuneError, match="optimizer"):
        ZOArguments(optimizer=["mezo"])


# -- 4. a private ZOTrainer's own loader drops loader settings ---------------------------------------------------------

@pytest.mark.parametrize("setting,value", [("dataloader_multiprocessing_context", "spawn"),
                                           ("dataloader_in_order", False)])
def test_private_loader_honours_or_refuses_the_trainers_loader_settings(tmp_path, hf_offline, setting, value):
    """A private ZOTrainer builds its own Poisson DataLoader (get_train_dataloader) with num_workers, pin_memory,
    prefetch_factor and persistent_workers from TrainingArguments, but not `dataloader_multiprocessing_context` or
    `dataloader_in_order`, which transformers' loader passes: they are silently ignored ("no flag silently
    ignored"). Either the loader uses them or the trainer refuses them by name."""
    from slimtune.hf import ZOArguments
    try:
        trainer = zo_trainer(tmp_path, ZOArguments(optimizer="dpzero", lr=1e-3, eps=1e-2),
                             dataloader_num_workers=1, **{setting: value})
        loader = trainer.get_train_dataloader()
    except SlimtuneError as exc:
        assert setting in str(exc)
        return
    base = getattr(loader, "base_dataloader", loader)
    if setting == "dataloader_multiprocessing_context":
        ctx = base.multiprocessing_context
        assert ctx is not None and ctx.get_start_method() == "spawn", ctx
    else:
        assert getattr(base, "in_order", True) is False


# -- 5. the private optimizers' accounting errors speak the CLI's flags ------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(epsilon=1.0, noise_multiplier=0.01), dict(delta=0.5)])
def test_dpzero_budget_errors_name_its_keywords_not_cli_flags(kwargs):
    """`slimtune.DPZero(..., epsilon=1, noise_multiplier=0.01)` is refused with "noise multiplier 0.01 spends ...
    or omit --noise-multiplier to calibrate", and `delta=0.5` with "delta=0.5 >= 1/N": neither names slimtune.DPZero,
    and the first names a command-line flag (other DPZero errors start with `slimtune.DPZero:` and speak keywords,
    settings/python.in_python_terms)."""
    model, _ = tiny()
    with pytest.raises(SlimtuneError) as err:
        slimtune.DPZero(model, dataset_size=72, batch_size=4, steps=2, **kwargs)
    message = str(err.value)
    assert message.startswith("slimtune.DPZero") and "--" not in message, message
