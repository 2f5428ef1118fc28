"""Review of the Python API and the Hugging Face integration as a transformers/peft user drives them (review 2):
TrainingArguments options a ZO step cannot honour must be refused with one line naming the option (not silently
ignored, not a traceback), and a hand-written torch loop gets one-line errors and faithful state round-trips."""

import re
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
from transformers import DataCollatorForLanguageModeling, TrainingArguments  # noqa: E402

import slimtune  # noqa: E402
from slimtune import SlimtuneError  # noqa: E402
from slimtune.hf import ZOArguments, ZOTrainer  # noqa: E402

from test_hf import hf_args, lm_dataset, model_for, tokenizer, trainable, trainer_for  # noqa: E402
from test_python_api import batch, mean_loss, tiny_lm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEZO = dict(optimizer="mezo", lr=5e-2, eps=1e-2)
PRIVATE = dict(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


# -- TrainingArguments a ZO step silently ignored ------------------------------------------------------------------
@pytest.mark.parametrize("zo, kwargs, option", [
    # the optimizer is zo_args'; transformers' own optimizer choice was dropped without a word
    (MEZO, dict(optim="adafactor"), "optim"),
    # NEFTune adds embedding noise only when the model is in training mode; the ZO step runs it in eval()
    (MEZO, dict(neftune_noise_alpha=5.0), "neftune_noise_alpha"),
    # a private step's loss is per_example_losses (plain cross-entropy): the smoothing is not applied
    (PRIVATE, dict(label_smoothing_factor=0.1), "label_smoothing_factor"),
], ids=["optim", "neftune", "private-label-smoothing"])
def test_training_arguments_a_zo_step_ignores_are_refused_by_name(tmp_path, zo, kwargs, option):
    tok = tokenizer()
    with pytest.raises(SlimtuneError, match=option):
        trainer_for(tmp_path, model_for(tok, "lora"), tok, ZOArguments(**zo), max_steps=2, **kwargs)


def test_optimizer_cls_and_kwargs_is_refused_not_replaced_silently(tmp_path):
    tok = tokenizer()
    model = model_for(tok, "lora")
    with pytest.raises(SlimtuneError, match="optimizer_cls_and_kwargs"):
        trainer = ZOTrainer(model=model, args=hf_args(tmp_path, max_steps=1), train_dataset=lm_dataset(tok),
                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                            optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}), zo_args=ZOArguments(**MEZO))
        trainer.train()  # today: trains with MeZO, SGD never mentioned


def test_hybrid_with_gradient_checkpointing_does_not_backprop_through_the_low_blocks(tmp_path):
    """gradient_checkpointing=True makes transformers call enable_input_require_grads, and its checkpointing only
    runs in training mode (the ZO step is in eval()): the hybrid's backward then runs through every block below the
    top (more memory and compute, the opposite of what was asked). Refuse it, or keep the backward on top."""
    tok = tokenizer()
    model = model_for(tok, "lora")
    lowest = model.get_base_model().model.layers[0]  # tiny-llama has 2 blocks; fo_layers=1 trains only the top one
    calls = []
    lowest.register_full_backward_hook(lambda *args: calls.append(1))
    try:
        trainer = trainer_for(tmp_path, model, tok, ZOArguments(optimizer="hybrid", fo_layers=1, lr=1e-2), max_steps=2,
                              gradient_checkpointing=True)
    except SlimtuneError as exc:
        assert "gradient_checkpointing" in str(exc)
        return
    trainer.train()
    assert calls == [], f"backward ran through the lowest (ZO) block {len(calls)} times"


class GPUStyleFP16(ZOTrainer):
    """accelerate builds a GradScaler for fp16 on CUDA (on CPU it builds none): give the CPU trainer the same."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fp16:
            self.accelerator.scaler = torch.amp.GradScaler("cpu")


def test_fp16_with_a_loss_scaler_is_refused_or_trains(tmp_path):
    """fp16=True on a GPU: the scaler's step asserts that scaler.scale(loss) ran (a backward), which a ZO step never
    does: 'AssertionError: Attempted step but _scale is None' at the first step."""
    tok = tokenizer()
    try:
        trainer = trainer_for(tmp_path, model_for(tok, "lora"), tok, ZOArguments(**MEZO), cls=GPUStyleFP16, max_steps=2,
                              fp16=True)
    except SlimtuneError as exc:
        assert "fp16" in str(exc)
        return
    trainer.train()
    assert trainer.zo_optimizer().steps_taken == 2


def test_a_user_peft_model_that_is_not_lora_does_not_get_loras_defaults_silently(tmp_path):
    """peft_kind calls every peft model `lora`: an IA3 (or prompt-tuning, LoKr) model silently trains at LoRA's
    tuned lr/eps and is recorded as LoRA. Without lr/eps given, say that the table has no row for it."""
    from peft import IA3Config, get_peft_model

    tok = tokenizer()
    model = get_peft_model(model_for(tok), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(SlimtuneError, match="IA3"):
        slimtune.MeZO(model.eval())


# -- errors in Python terms ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda tmp, tok: trainer_for(tmp, model_for(tok, "lora"), tok, ZOArguments(optimizer="lozo", momentum=0.9),
                                 max_steps=1),
    lambda tmp, tok: slimtune.DPZero(model_for(tok, "lora"), dataset_size=100, batch_size=4, clipping="fixed",
                                     clip_lr=0.1),
], ids=["ZOArguments-momentum", "DPZero-clip_lr"])
def test_applicability_errors_name_python_arguments_not_cli_flags(tmp_path, make):
    """Today: 'momentum applies only to --optimizer lozo-m, sgd or dp-sgd (here: --optimizer lozo)': flags, and two
    optimizers ZOArguments cannot take."""
    with pytest.raises(SlimtuneError) as err:
        make(tmp_path, tokenizer())
    assert "--" not in str(err.value), str(err.value)


# -- the optimizers in a hand-written torch loop -------------------------------------------------------------------
def test_add_param_group_is_refused_not_ignored():
    """torch users add parameters with add_param_group; the slimtune step never touches them (today: accepted)."""
    opt = slimtune.MeZO(tiny_lm("lora"), lr=1e-2)
    with pytest.raises(SlimtuneError, match="add_param_group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.1})


def test_load_state_dict_into_an_optimizer_with_another_seed_continues_or_refuses():
    """The state holds the step counter but not the seed the directions come from: restored into an optimizer built
    with another seed (the default 0), the run silently continues on another trajectory."""
    a = tiny_lm("lora")
    opt = slimtune.MeZO(a, lr=1e-2, seed=5)
    for step in range(2):
        opt.step(mean_loss(a, batch(step)))
    state, weights = opt.state_dict(), trainable(a)
    for step in range(2, 4):
        opt.step(mean_loss(a, batch(step)))
    expected = trainable(a)

    b = tiny_lm("lora")
    with torch.no_grad():
        for p, w in zip([p for p in b.parameters() if p.requires_grad], weights):
            p.copy_(w)
    restored = slimtune.MeZO(b, lr=1e-2)
    try:
        restored.load_state_dict(state)
    except SlimtuneError as exc:
        assert "seed" in str(exc)
        return
    for step in range(2, 4):
        restored.step(mean_loss(b, batch(step)))
    assert all(torch.equal(x, y) for x, y in zip(trainable(b), expected))


@pytest.mark.parametrize("make", [lambda m: slimtune.HiZOO(m, lr=1e-2),
                                  lambda m: slimtune.LOZO(m, lr=1e-2, momentum=0.9)], ids=["hizoo", "lozo-m"])
def test_load_state_dict_of_other_shapes_is_a_one_line_error(make):
    """A state saved for LoRA r=4, loaded into the same optimizer over r=8: a raw RuntimeError from a tensor view."""
    a = tiny_lm("lora")
    opt = make(a)
    opt.step(mean_loss(a, batch(0)))
    b = slimtune.apply_peft(tiny_lm(None), "lora", r=8)
    other = make(b)
    with pytest.raises(SlimtuneError, match="load_state_dict"):
        other.load_state_dict(opt.state_dict())
        other.step(mean_loss(b, batch(1)))


def test_a_torch_style_closure_that_calls_backward_is_a_one_line_error():
    """The usual torch closure (zero_grad, loss.backward(), return loss) fails inside inference mode with 'element 0
    of tensors does not require grad', which says nothing about what to change."""
    model = tiny_lm("lora")
    opt = slimtune.MeZO(model, lr=1e-2)
    ids = batch()

    def closure():
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss
    with pytest.raises(SlimtuneError, match="backward"):
        opt.step(closure)


# -- the docs' own snippet -----------------------------------------------------------------------------------------
def test_the_hf_guides_training_arguments_work_with_the_hf_extra(tmp_path):
    """docs/how-to/hugging-face.md passes report_to=["tensorboard"]; `pip install "slimtune[hf]"` (trl, accelerate)
    has no tensorboard, so the snippet fails: 'TensorBoardCallback requires tensorboard to be installed'."""
    text = (ROOT / "docs" / "how-to" / "hugging-face.md").read_text()
    snippet = text.split("## transformers.Trainer", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    reporters = re.search(r"report_to=(\[[^\]]*\]|\"[^\"]*\")", snippet)
    report_to = eval(reporters.group(1)) if reporters else "none"
    tok = tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to=report_to, use_cpu=True,
                             disable_tqdm=True)
    ZOTrainer(model=model_for(tok, "lora"), args=args, train_dataset=lm_dataset(tok),
              data_collator=DataCollatorForLanguageModeling(tok, mlm=False), zo_args=ZOArguments(optimizer="mezo"))
