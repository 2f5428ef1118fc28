"""slimtune.hf (issue 37): zeroth-order training inside transformers.Trainer and TRL's SFTTrainer — loss goes down,
the trajectory is slimtune's own MeZO loop, HF checkpoints resume exactly, private runs use Poisson batches and
release no training loss, and settings a ZO step cannot honour are refused."""

import copy

import pytest
import torch

datasets = pytest.importorskip("datasets")
from transformers import DataCollatorForLanguageModeling, TrainingArguments, get_scheduler  # noqa: E402

import slimtune  # noqa: E402
from slimtune import SlimtuneError  # noqa: E402
from slimtune.hf import ZOArguments, ZOTrainer, ZOTrainerMixin  # noqa: E402
from slimtune.models.loading import tiny_model, tiny_tokenizer  # noqa: E402

from conftest import DEMO  # noqa: E402

ROWS = [line.split("\t")[0] for line in (DEMO / "sst2_demo_train.tsv").read_text().splitlines()[1:]]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub, no telemetry
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def tokenizer():
    return tiny_tokenizer(ROWS)


def model_for(tok, peft: str | None = None):
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
    if peft:
        torch.manual_seed(0)
        model = slimtune.apply_peft(model, peft, r=4)
    return model


def lm_dataset(tok):
    return datasets.Dataset.from_dict({"text": ROWS}).map(lambda b: tok(b["text"]), batched=True,
                                                            remove_columns=["text"])


def held_out_dataset(tok):
    """Evaluation rows that are not training rows (private runs refuse shared rows)."""
    rows = [line.split("\t")[0] for line in (DEMO / "sst2_demo_dev.tsv").read_text().splitlines()[1:]]
    return datasets.Dataset.from_dict({"text": rows}).map(lambda b: tok(b["text"]), batched=True,
                                                          remove_columns=["text"])


def hf_args(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to=[], logging_steps=5,
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=7)
    return TrainingArguments(**{**base, **kwargs})


def trainer_for(tmp_path, model, tok, zo_args, cls=ZOTrainer, **kwargs):
    return cls(model=model, args=hf_args(tmp_path, **kwargs), train_dataset=lm_dataset(tok),
               eval_dataset=held_out_dataset(tok) if zo_args.private else lm_dataset(tok),  # fit on training rows
               data_collator=DataCollatorForLanguageModeling(tok, mlm=False), zo_args=zo_args)


def trainable(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_transformers_trainer_with_mezo_lowers_the_loss(tmp_path):
    tok = tokenizer()
    trainer = trainer_for(tmp_path, model_for(tok), tok, ZOArguments(optimizer="mezo", lr=3e-3, eps=1e-2),
                          max_steps=100)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.01
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert logged and all("projected_grad" in r and "grad_norm" not in r for r in logged)


def prompt_completion_rows():
    """The demo rows as TRL's prompt/completion pairs (first word, the rest)."""
    return datasets.Dataset.from_dict({"prompt": [r.split()[0] + " " for r in ROWS],
                                       "completion": [" ".join(r.split()[1:]) for r in ROWS]})


def test_trl_sft_trainer_with_zo_lowers_the_loss(tmp_path):
    trl = pytest.importorskip("trl")
    from peft import LoraConfig

    class ZOSFTTrainer(ZOTrainerMixin, trl.SFTTrainer):
        pass

    tok = tokenizer()
    data = prompt_completion_rows()
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=100, per_device_train_batch_size=8,
                           report_to=[], logging_steps=25, save_strategy="no", use_cpu=True, disable_tqdm=True,
                           max_length=64, gradient_checkpointing=False)  # (lead) SFTConfig's default is on: refused
    trainer = ZOSFTTrainer(model=model_for(tok), args=config, train_dataset=data, eval_dataset=data,
                           processing_class=tok, peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                           zo_args=ZOArguments(optimizer="mezo", lr=0.2, eps=1e-2))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.01
    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert train_logs and all("entropy" in r for r in train_logs)  # TRL's metrics filed as training metrics


class Recording(ZOTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", []) + [{k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


def test_zotrainer_trajectory_is_slimtunes_mezo_loop(tmp_path):
    """Same initial weights, seed and batches: ZOTrainer's weights after 8 steps equal those of a plain loop with
    slimtune.MeZO and transformers' linear schedule, bit for bit."""
    tok = tokenizer()
    trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, ZOArguments(optimizer="mezo", lr=5e-2, eps=1e-2),
                          cls=Recording, max_steps=8)
    trainer.train()

    model = model_for(tok, "lora").eval()
    opt = slimtune.MeZO(model, lr=5e-2, eps=1e-2, seed=7)
    schedule = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=8)
    for inputs in trainer.seen:
        opt.step(lambda: model(**inputs).loss)
        schedule.step()
    assert len(trainer.seen) == 8
    assert all(torch.equal(a, b) for a, b in zip(trainable(trainer.model), trainable(model)))


@pytest.mark.parametrize("zo_args", [ZOArguments(optimizer="mezo", lr=5e-2, eps=1e-2),
                                     ZOArguments(optimizer="lozo-m", lr=5e-2, eps=1e-2, nu=2)],
                         ids=["mezo", "lozo-m"])
def test_resume_from_an_hf_checkpoint_continues_exactly(tmp_path, zo_args):
    tok = tokenizer()
    full = trainer_for(tmp_path / "a", model_for(tok, "lora"), tok, zo_args, max_steps=6, save_strategy="steps",
                       save_steps=3)
    full.train()
    expected = trainable(full.model)
    state = torch.load(tmp_path / "a" / "out" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert state["slimtune"]["optimizer"]["step_count"] == 3

    resumed = trainer_for(tmp_path / "a", model_for(tok, "lora"), tok, zo_args, max_steps=6, save_strategy="steps",
                          save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    assert all(torch.equal(a, b) for a, b in zip(trainable(resumed.model), expected))


class Sizes(ZOTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs.get("input_ids")
        self.sizes = getattr(self, "sizes", []) + [0 if ids is None else len(ids)]
        return super().training_step(model, inputs, num_items_in_batch)


def test_private_training_uses_poisson_batches_and_releases_no_loss(tmp_path):
    tok = tokenizer()
    zo = ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2)
    trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, zo, cls=Sizes, max_steps=12, logging_steps=4)
    trainer.train()
    opt = trainer.zo_optimizer()
    assert opt.steps == 12 and opt.steps_taken == 12
    assert len(set(trainer.sizes)) > 2  # random batch sizes around 8 of 72
    logs = [r for r in trainer.state.log_history if "epsilon" in r]
    assert logs and all("loss" not in r and "train_loss" not in r for r in logs)
    timing = [k for r in trainer.state.log_history for k in r if k.startswith("train_") and k != "train_loss"]
    assert not timing, timing  # train_runtime, samples/s: measured on the private batches
    assert 0 < logs[-1]["epsilon"] <= 8.0 * 1.001
    with pytest.raises(SlimtuneError, match="cannot be resumed"):
        trainer.train(resume_from_checkpoint=str(tmp_path))


def test_private_training_handles_an_empty_poisson_batch(tmp_path):
    tok = tokenizer()
    zo = ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2)
    trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, zo, cls=Sizes, max_steps=20,
                          per_device_train_batch_size=1)
    trainer.train()
    assert 0 in trainer.sizes and trainer.zo_optimizer().steps_taken == 20


@pytest.mark.parametrize("optimizer", ["dpzero", "mezo"])
def test_a_private_progress_bar_shows_no_speed_or_time(tmp_path, capsys, optimizer):
    """transformers' tqdm bar (on by default) showed a private run's it/s, elapsed time and ETA: functions of the
    Poisson batches' sizes and rows, which `slimtune train` withholds. A private trainer's bar counts steps only."""
    tok = tokenizer()
    zo = ZOArguments(optimizer=optimizer, lr=1e-2, eps=1e-2,
                     **(dict(epsilon=8.0, delta=1e-3) if optimizer == "dpzero" else {}))
    trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, zo, max_steps=4, logging_steps=2,
                          disable_tqdm=False)
    capsys.readouterr()  # the datasets' own bars (map)
    trainer.train()
    bar = capsys.readouterr().err
    assert "4/4" in bar
    timing = [mark for mark in ("it/s", "s/it", "<") if mark in bar]
    if optimizer == "mezo":
        assert timing, bar  # a public run keeps transformers' bar
    else:
        assert not timing, bar


def test_per_example_losses_average_to_the_models_loss():
    tok = tokenizer()
    model = model_for(tok).eval()
    ids = torch.randint(3, len(tok), (3, 6))
    labels = ids.clone()
    labels[1, :2] = -100  # a masked prompt: that example's mean is over its own 3 scored tokens
    trainer = ZOTrainerMixin.__new__(ZOTrainer)
    trainer.compute_loss_context_manager = lambda: torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        losses = ZOTrainerMixin.per_example_losses(trainer, model, {"input_ids": ids, "labels": labels})
        singles = torch.stack([model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss for i in range(3)])
    assert losses.shape == (3,)
    assert torch.allclose(losses, singles, atol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: ZOArguments(optimizer="adamw"), "first-order optimizers are transformers' own"),
    (lambda: ZOArguments(optimizer="mezo", rank=4), "rank is not a setting of optimizer mezo"),
    (lambda: ZOArguments(optimizer="dpzero", n_perturbations=4), "n_perturbations is not a setting of optimizer dpzero"),
])
def test_zo_arguments_refuse_what_does_not_apply(make, message):
    with pytest.raises(SlimtuneError, match=message):
        make()


@pytest.mark.parametrize("zo_args, kwargs, message", [
    (ZOArguments(n_spsa=0), {}, "n_spsa 0: must be >= 1"),
    (ZOArguments(), dict(gradient_accumulation_steps=2), "gradient_accumulation_steps=2"),
    (ZOArguments(lr=1e-3), dict(learning_rate=1e-2), "two learning rates"),
    (ZOArguments(optimizer="dpzero", clipping="fixed", target_quantile=0.5), {},
     "target_quantile applies only to adaptive clipping"),
])
def test_trainer_refuses_settings_a_zo_step_cannot_honour(tmp_path, zo_args, kwargs, message):
    tok = tokenizer()
    with pytest.raises(SlimtuneError, match=message):
        trainer_for(tmp_path, model_for(tok, "lora"), tok, zo_args, max_steps=2, **kwargs)


def test_learning_rate_comes_from_training_arguments_when_set(tmp_path):
    tok = tokenizer()
    trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, ZOArguments(), max_steps=1, learning_rate=2e-3)
    trainer.train()
    assert trainer.zo_optimizer().settings["lr"] == 2e-3
    default = trainer_for(tmp_path / "d", model_for(tok, "lora"), tok, ZOArguments(), max_steps=1)
    default.train()
    assert default.zo_optimizer().settings["lr"] == slimtune.optim.defaults.defaults_for("mezo", "lora").lr


def test_a_failing_private_step_names_no_detail_of_its_batch(tmp_path):
    """An exception inside a private step (its text may hold rows or the realised batch size) reaches the user as a
    one-line error without its text, as `slimtune train` does."""
    tok = tokenizer()
    zo = ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2)
    trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, zo, max_steps=2, logging_steps=1)

    def leaky(model, inputs):
        raise RuntimeError(f"row 'SECRET' of a batch of {len(inputs['input_ids'])}")
    trainer.per_example_losses = leaky
    with pytest.raises(SlimtuneError, match="details are withheld") as err:
        trainer.train()
    assert "SECRET" not in str(err.value) and err.value.__cause__ is None
