"""Review 90: slimtune from Python and Hugging Face, as a transformers / TRL user drives it (ZOTrainer with
TrainingArguments and SFTConfig, the documented TRL mixin, a user's own peft model, `slimtune.train(**keywords)`).

Each test fails on the code it was written against; the docstring says what a user sees and what is expected."""

import warnings

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")

import slimtune  # noqa: E402
from slimtune import SlimtuneError  # noqa: E402
from slimtune.hf import ZOArguments, ZOTrainerMixin  # noqa: E402

from conftest import DEMO  # noqa: E402
from test_hf import ROWS, model_for, tokenizer, trainer_for  # noqa: E402

TRAIN = str(DEMO / "sst2_demo_train.tsv")


@pytest.fixture(autouse=True)
def offline(hf_offline):
    return hf_offline


# -- 1. hybrid: the logged grad_norm is the norm after clipping, not transformers' norm ---------------------------------

def test_zotrainer_hybrid_logs_the_gradient_norm_transformers_would_log(tmp_path):
    """LOW (wrong value logged). transformers logs `grad_norm` as the norm of the gradient *before* clipping (what
    `clip_grad_norm_` returns). ZOTrainer keeps `grad_norm` for the hybrids, but their AdamW step has already clipped the
    top blocks' gradient to `max_grad_norm` inside the ZO step, and transformers then measures the clipped gradient
    left in `.grad`: with the default max_grad_norm=1.0 a full-model hybrid run logs grad_norm 0.99999 at every step
    whose real norm is above 1 (here 1.098), so the log can never show an exploding gradient. Same seed and batch
    with a clip that does not bite (1e6) logs the true norm of the same first step."""
    tok = tokenizer()
    logged = {}
    for clip in (1.0, 1e6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trainer_for(tmp_path / str(clip), model_for(tok), tok,
                                  ZOArguments(optimizer="hybrid", fo_layers=1, lr=1e-3, eps=1e-3), max_steps=1,
                                  logging_steps=1, max_grad_norm=clip)
            trainer.train()
        logged[clip] = next(r["grad_norm"] for r in trainer.state.log_history if "loss" in r)
    true_norm = logged[1e6]
    assert true_norm > 1.0  # the first step's gradient is above the clip: the case that matters
    assert logged[1.0] == pytest.approx(true_norm, rel=1e-4), logged


# -- 2. a peft model's lora_dropout: refused by `slimtune train`, silently dropped by ZOTrainer -------------------------

def test_zotrainer_refuses_a_lora_dropout_its_steps_do_not_apply(tmp_path):
    """LOW (setting silently ignored). `slimtune train --optimizer mezo --lora-dropout 0.1` is refused in one line
    (a zeroth-order step runs the model in eval(), so dropout is off). The same LoRA dropout set where a transformers
    user sets it, `LoraConfig(lora_dropout=0.1)` (TRL's `peft_config`, or `slimtune.apply_peft(..., lora_dropout=0.1)`)
    is accepted by ZOTrainer and silently never applied. Expected: a one-line SlimtuneError naming lora_dropout, as
    the CLI (the hybrids' backprop step runs in eval() too)."""
    from peft import LoraConfig, get_peft_model

    tok = tokenizer()
    model = get_peft_model(model_for(tok), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(SlimtuneError, match="lora_dropout"):
        trainer = trainer_for(tmp_path, model, tok, ZOArguments(optimizer="mezo", lr=1e-2, eps=1e-2), max_steps=1)
        trainer.train()


# -- 3. the documented TRL mixin: SFTConfig's own default turns gradient checkpointing on, unrefused --------------------

def test_zo_sft_trainer_with_sftconfigs_defaults_does_not_backprop_through_the_low_blocks(tmp_path):
    """MEDIUM (setting refused by name slips through; the hybrid does the opposite of what it is for). ZOTrainer refuses
    gradient_checkpointing=True (NOT_HONOURED: with a hybrid, transformers' enable_input_require_grads makes the
    backward run through every block below the top), but it compares each setting with the default of the args'
    own class, and TRL's SFTConfig defaults to gradient_checkpointing=True. With the guide's
    `class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer)` and an SFTConfig that does not mention it, a hybrid run with
    fo_layers=1 backpropagates through the lowest (zeroth-order) block at every step. Expected: refused in one line
    naming gradient_checkpointing, or trained with the backward kept on top (as for transformers' Trainer)."""
    trl = pytest.importorskip("trl")
    from peft import LoraConfig

    class ZOSFTTrainer(ZOTrainerMixin, trl.SFTTrainer):
        pass

    from test_hf import prompt_completion_rows
    tok = tokenizer()
    data = prompt_completion_rows()
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=8, report_to=[],
                           save_strategy="no", use_cpu=True, disable_tqdm=True, max_length=64)
    calls = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = ZOSFTTrainer(model=model_for(tok), args=config, train_dataset=data, processing_class=tok,
                                   peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                                   zo_args=ZOArguments(optimizer="hybrid", fo_layers=1, lr=1e-2))
            lowest = trainer.model.get_base_model().model.layers[0]  # tiny-llama: 2 blocks, fo_layers=1 trains the top
            lowest.register_full_backward_hook(lambda *args: calls.append(1))
            trainer.train()
    except SlimtuneError as exc:
        assert "gradient_checkpointing" in str(exc)
        return
    assert calls == [], f"backward ran through the lowest (ZO) block {len(calls)} times"


# -- 4. ZOArguments' own error lists a setting ZOArguments does not take -----------------------------------------------

@pytest.mark.parametrize("optimizer, wrong", [("mezo", dict(rank=4)), ("hybrid", dict(n_spsa=2))])
def test_zo_arguments_error_lists_only_settings_zo_arguments_takes(optimizer, wrong):
    """LOW (message). `ZOArguments(optimizer="mezo", rank=4)` answers "rank is not a setting of optimizer mezo (its
    settings: eps, lr, n_spsa, perturbation, seed, weight_decay)"; following it, `ZOArguments(weight_decay=0.01)` is a
    TypeError from the dataclass (weight_decay is TrainingArguments.weight_decay, not a ZOArguments field). The list
    should name only what ZOArguments takes."""
    from dataclasses import fields

    with pytest.raises(SlimtuneError) as err:
        ZOArguments(optimizer=optimizer, **wrong)
    listed = str(err.value).rsplit("(its settings: ", 1)[1].rstrip(")").split(", ")
    assert set(listed) <= {f.name for f in fields(ZOArguments)}, listed


# -- 5. slimtune.train: Python values the rest of the Python API takes --------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(steps=np.int64(3)), dict(lr=np.float32(1e-3)), dict(lr=torch.tensor(1e-3)),
                                    dict(batch_size=np.int32(4)), dict(seed=np.int64(3)),
                                    dict(target_modules=("q_proj", "v_proj"))],
                         ids=["np-int64-steps", "np-float32-lr", "torch-lr", "np-int32-batch", "np-seed", "tuple"])
def test_python_train_takes_the_numbers_and_lists_the_other_python_apis_take(tmp_path, kwargs):
    """LOW (Python values refused). `slimtune.MeZO(lr=np.float32(1e-3))`, `ZOArguments(lr=np.float32(...))`,
    `slimtune.privacy.epsilon(steps=np.int64(...))` and `slimtune.apply_peft(target_modules=("q_proj", "v_proj"))` all
    take numpy / torch scalars and tuples (settings/python.py `python_number`), but `slimtune.train` refuses them:
    "--steps: expected an integer, got np.int64(3)", "--lr: expected a number, got np.float32(0.001)" (a value a sweep
    or a config library hands over), in the flag's terms."""
    resolved = slimtune.train(data=TRAIN, model="tiny-llama", out=str(tmp_path / "run"), dry_run=True, **kwargs)
    assert isinstance(resolved, dict)


@pytest.mark.parametrize("name", ["epsilon", "noise_multiplier", "fo_layers", "fo_lr", "hessian_smooth"])
def test_python_train_none_means_the_same_for_every_optimizer(tmp_path, name):
    """LOW (inconsistent Python keyword). `slimtune.train(optimizer="dpzero", epsilon=None)` takes None as "left out"
    (the default budget, 6), as `lr=None`, `eps=None` and `steps=None` are everywhere, but the same `epsilon=None` on a
    mezo run is refused as if a budget had been given: "--epsilon applies only to --optimizer dp-adamw, ... (this run:
    --optimizer mezo); remove it or change the run" (likewise fo_layers=None, noise_multiplier=None, ...): a wrapper
    that passes its own optional keywords through cannot call it. None must mean one thing: left out (or refused for
    every optimizer)."""
    applies = {"epsilon": "dpzero", "noise_multiplier": "dpzero", "fo_layers": "hybrid", "fo_lr": "hybrid",
               "hessian_smooth": "hizoo"}[name]

    def outcome(optimizer):
        try:
            slimtune.train(data=TRAIN, model="tiny-llama", optimizer=optimizer, out=str(tmp_path / "run"),
                           dry_run=True, **{name: None})
            return "accepted"
        except SlimtuneError as exc:
            return f"refused: {exc}"
    there, here = outcome(applies), outcome("mezo")
    assert here.split(":")[0] == there.split(":")[0], (there, here)


# -- 6. a private ZOTrainer built before its training data is set -------------------------------------------------------

def test_a_private_zotrainer_may_get_its_train_dataset_after_construction(tmp_path):
    """LOW (wrong refusal, misleading message). transformers' Trainer takes train_dataset=None (set it later, or only
    evaluate), and ZOTrainer re-runs its checks at train() precisely because "datasets ... may be set on the trainer
    in between" — a public ZOTrainer built without a dataset trains once `trainer.train_dataset` is set. A private one
    is refused at construction with "private training samples Poisson batches from a dataset of known size; an
    iterable dataset cannot be sampled", though no iterable dataset was given. Expected: it trains once the dataset is
    set (the checks at train() see it), or a message that says train_dataset is missing."""
    from transformers import DataCollatorForLanguageModeling

    from conftest import hf_args
    from slimtune.hf import ZOTrainer

    tok = tokenizer()
    from test_hf import lm_dataset
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=2),
                                data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                                zo_args=ZOArguments(optimizer="dpzero", epsilon=4.0, lr=1e-2, eps=1e-2))
            trainer.train_dataset = lm_dataset(tok)
            trainer.train()
    except SlimtuneError as exc:
        assert "iterable" not in str(exc) and "train_dataset" in str(exc), str(exc)
        return
    assert trainer.zo_optimizer().steps_taken == 2
