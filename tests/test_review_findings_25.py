"""Review 25: the Python API's keyword settings and the Hugging Face integration (slimtune.hf).

1. The trainer's checks run only in the constructor: a TrainingArguments field changed on `trainer.args` afterwards
   (a common notebook habit) is never checked. A private run then logs the token counts of its secret Poisson
   batches (include_num_input_tokens_seen), and gradient accumulation runs one ZO step per micro-batch.
2. resume_from_checkpoint checks only seed, eps and perturbation: a resumed ZOTrainer with another LOZO rank,
   n_spsa or sparsity continues silently on another trajectory (`slimtune train --resume` refuses it).
3. A private trainer's batch size that the Poisson sampler cannot honour: larger than the dataset (the CLI refuses
   it) or 0 (ZeroDivisionError traceback from PoissonBatches).
4. ZOArguments(optimizer="lozo-m", momentum=0.0) silently trains plain LOZO (the CLI turns the same 0 into 0.9).
5. A private trainer silently ignores the loader settings its Poisson batches replace (data_seed,
   dataloader_drop_last, train_sampling_strategy), and every ZO trainer ignores max_grad_norm outside the hybrids.
"""

import pytest
import torch

datasets = pytest.importorskip("datasets")

import slimtune  # noqa: E402
from slimtune import SlimtuneError  # noqa: E402
from slimtune.hf import ZOArguments  # noqa: E402

from test_hf import lm_dataset, model_for, offline, tokenizer, trainer_for  # noqa: E402,F401


def private_args(**kwargs):
    return ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2, **kwargs)


# -- 1. settings changed on trainer.args after construction are never checked ----------------------------------------
def test_a_private_trainer_never_logs_token_counts_switched_on_after_construction(tmp_path):
    """include_num_input_tokens_seen is refused at construction (it counts the private batches' tokens), but
    `trainer.args.include_num_input_tokens_seen = "all"` set afterwards goes through: log_history, trainer_state.json
    and every report_to integration then carry 72, 189, 270, ... tokens of the secret batches."""
    tok = tokenizer()
    trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, private_args(), max_steps=3, logging_steps=1)
    trainer.args.include_num_input_tokens_seen = "all"
    try:
        trainer.train()
    except SlimtuneError:
        return  # refused at train(): fine
    counts = [r["num_input_tokens_seen"] for r in trainer.state.log_history if r.get("num_input_tokens_seen")]
    assert not counts, f"token counts of private Poisson batches were logged: {counts}"


def test_gradient_accumulation_set_after_construction_is_refused(tmp_path):
    """gradient_accumulation_steps > 1 is refused at construction; set on trainer.args afterwards, each micro-batch
    takes a full ZO step (8 ZO steps for 4 trainer steps, the schedule advancing every second one)."""
    tok = tokenizer()
    trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, ZOArguments(optimizer="mezo", lr=1e-2, eps=1e-2),
                          max_steps=2)
    trainer.args.gradient_accumulation_steps = 2
    with pytest.raises(SlimtuneError, match="gradient_accumulation_steps"):
        trainer.train()


# -- 2. resume with other ZO settings continues on another trajectory -------------------------------------------------
@pytest.mark.parametrize("first, second", [
    (dict(optimizer="lozo", rank=2, nu=10), dict(optimizer="lozo", rank=3, nu=10)),
    (dict(optimizer="mezo"), dict(optimizer="mezo", n_spsa=2)),
    (dict(optimizer="sparse-mezo", sparsity=0.5), dict(optimizer="sparse-mezo", sparsity=0.9)),
], ids=["lozo-rank", "n_spsa", "sparsity"])
def test_resume_from_an_hf_checkpoint_refuses_other_zo_settings(tmp_path, first, second):
    """optimizer.pt's run identity holds seed, eps and perturbation only; the LOZO rank (its saved V factors have
    the old rank), n_spsa or sparsity may change silently, so the run is neither exact nor refused."""
    tok = tokenizer()
    common = dict(lr=5e-2, eps=1e-2)
    run = trainer_for(tmp_path / "a", model_for(tok, "lora"), tok, ZOArguments(**first, **common), max_steps=4,
                      save_strategy="steps", save_steps=2)
    run.train()
    resumed = trainer_for(tmp_path / "b", model_for(tok, "lora"), tok, ZOArguments(**second, **common), max_steps=4)
    with pytest.raises(SlimtuneError):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))


# -- 3. private batch sizes the sampler cannot honour -----------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [100, 0], ids=["larger-than-the-data", "zero"])
def test_a_private_trainer_refuses_a_batch_size_its_sampler_cannot_honour(tmp_path, batch_size):
    """72 training rows: batch 100 trains (every step takes all 72, the release is divided by 100; `slimtune train`
    refuses `--batch-size` larger than the data); batch 0 dies with ZeroDivisionError in PoissonBatches."""
    tok = tokenizer()
    with pytest.raises(SlimtuneError, match="batch"):
        trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, private_args(), max_steps=2,
                              per_device_train_batch_size=batch_size)
        trainer.train()


def test_a_private_optimizer_refuses_a_batch_larger_than_its_dataset():
    tok = tokenizer()
    with pytest.raises(SlimtuneError, match="batch"):
        slimtune.DPZero(model_for(tok, "lora"), dataset_size=72, batch_size=100, steps=10)


# -- 4. lozo-m with momentum 0 ------------------------------------------------------------------------------------------
def test_lozo_m_with_momentum_zero_is_refused_not_run_as_plain_lozo(tmp_path):
    tok = tokenizer()
    with pytest.raises(SlimtuneError, match="momentum"):
        trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok,
                              ZOArguments(optimizer="lozo-m", momentum=0.0, lr=1e-2, eps=1e-2), max_steps=1)
        trainer.train()
        assert trainer.zo_optimizer().impl.name == "lozo-m"  # what was asked for (it is "lozo")


# -- 5. settings the ZO / private path ignores ----------------------------------------------------------------------
@pytest.mark.parametrize("setting", [dict(data_seed=3), dict(dataloader_drop_last=True),
                                     dict(train_sampling_strategy="sequential")],
                         ids=lambda s: next(iter(s)))
def test_a_private_trainer_refuses_loader_settings_its_poisson_batches_ignore(tmp_path, setting):
    tok = tokenizer()
    with pytest.raises(SlimtuneError, match=next(iter(setting))):
        trainer_for(tmp_path, model_for(tok, "lora"), tok, private_args(), max_steps=1, **setting)


@pytest.mark.parametrize("zo_args", [ZOArguments(optimizer="mezo", lr=1e-2, eps=1e-2), private_args()],
                         ids=["mezo", "dpzero"])
def test_max_grad_norm_is_refused_where_a_zo_step_cannot_clip(tmp_path, zo_args):
    """fp16, adam_beta1, ... are refused by name when a ZO step cannot honour them; max_grad_norm=0.3 is accepted and
    ignored (with dpzero it reads like the per-example clip, which is ZOArguments.clip)."""
    tok = tokenizer()
    with pytest.raises(SlimtuneError, match="max_grad_norm"):
        trainer_for(tmp_path, model_for(tok, "lora"), tok, zo_args, max_steps=1, max_grad_norm=0.3)


# -- the fixes' edges (the lead's) ---------------------------------------------------------------------------------------
def test_the_cli_refuses_lozo_m_with_momentum_zero_given_as_a_flag(tmp_path):
    """`--optimizer lozo-m --momentum 0` became momentum 0.9 (build_optimizer's default), silently."""
    from test_bad_input_table import TINY, TRAIN, cli
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "lozo-m", "--momentum", "0", "--out", tmp_path / "r",
              "--dry-run")
    assert res.exit_code == 2 and "--momentum 0" in res.output and "Traceback" not in res.output, res.output
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "lozo-m", "--out", tmp_path / "r", "--dry-run")
    assert res.exit_code == 0, res.output  # left out: LOZO-M's 0.9


def test_a_private_trainer_checks_its_batch_size_again_at_train(tmp_path):
    """The batch size is checked where the sampler is built too: an auto_find_batch_size halving (refused) or a
    batch size set on the trainer between construction and train() cannot reach the Poisson batches unchecked."""
    tok = tokenizer()
    trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, private_args(), max_steps=2)
    trainer._train_batch_size = 1000
    with pytest.raises(SlimtuneError, match="per_device_train_batch_size"):
        trainer.train()
    with pytest.raises(SlimtuneError, match="auto_find_batch_size"):
        trainer_for(tmp_path / "b", model_for(tok, "lora"), tok, private_args(), max_steps=2,
                    auto_find_batch_size=True)


def test_zo_arguments_refuse_a_setting_that_does_not_apply_even_at_its_default_value(tmp_path):
    """ZOArguments says what was given (None: left out): clip_lr=0.2 with fixed clipping was accepted because 0.2 is
    the default, while `slimtune train --clipping fixed --clip-lr 0.2` refuses it."""
    tok = tokenizer()
    with pytest.raises(SlimtuneError, match="clip_lr"):
        trainer_for(tmp_path, model_for(tok, "lora"), tok, private_args(clipping="fixed", clip_lr=0.2), max_steps=1)
