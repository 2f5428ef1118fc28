"""Privacy review 9: the newer private optimizers (dphybrid, dphizoo, DP-SGD / DP-AdamW through Opacus), their
accounting, the Hugging Face trainer path and federated clients, attacked as someone who sees every release and
knows the public settings. Each test fails on the code it was written against.

1. `--optimizer dp-sgd / dp-adamw --mechanism laplace` is accepted: the accountant calibrates and reports a Laplace
   mechanism while Opacus adds Gaussian noise of std sigma * C to a vector of L2 sensitivity C (dphybrid and dphizoo
   refuse Laplace, DP-SGD does not). On the demo data, --epsilon 2 gives sigma 0.71, whose Gaussian epsilon is 6.1.
2. The Opacus releases (DP-SGD, dphybrid's top gradient) of a bfloat16 parameter (`--dtype bf16` with --peft none,
   svfit or adapter) are computed in bfloat16: the noise is rounded to bf16 and then added in bf16 (Mironov's
   floating-point attack: tiny outputs that are impossible when the example is in the batch), and the per-example
   clip is computed from bf16 norms, so one example moves the clipped sum by more than C.
3. A private ZOTrainer clips "per example" per row of the collated batch: with a collator that packs the Poisson
   batch into one row (DataCollatorWithFlattening, TRL's padding_free), the whole batch is one clipped value, so
   one example moves each release by up to 2C, not the C the accountant assumes.
"""

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtune import SlimtuneError
from slimtune.optim import OptimizerArgs, build_optimizer
from slimtune.peft import PeftSettings
from slimtune.privacy import PrivacySpec
from slimtune.privacy.accountant import PrivacyAccountant
from slimtune.privacy.secret import KeyedNoise, RunKey

from conftest import DEMO


# -- 1. DP-SGD with Laplace: Gaussian noise accounted as Laplace --------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["dp-sgd", "dp-adamw"])
def test_dp_sgd_with_laplace_is_refused_on_the_command_line(tmp_path, demo_paths, optimizer):
    """Opacus adds Gaussian noise (privacy/dpsgd.py keyed_dp_optimizer: noise.normal), whatever --mechanism says."""
    from slimtune.settings.train import TrainSettings
    train_path, dev_path = demo_paths
    with pytest.raises(SlimtuneError, match="laplace"):
        TrainSettings.build(dict(data=train_path, eval_data=dev_path, out=str(tmp_path / "x"), model="tiny-llama",
                                 optimizer=optimizer, mechanism="laplace", epsilon=2.0, delta=1e-3))


@pytest.mark.parametrize("optimizer", ["dp-sgd", "dp-adamw"])
def test_dp_sgd_never_reports_less_than_the_gaussian_noise_it_adds_spends(tmp_path, demo_paths, optimizer):
    """From Python (TrainConfig): either refused, or the reported epsilon covers the Gaussian mechanism that runs."""
    from dataclasses import replace
    from slimtune.train import TrainConfig, prepare
    train_path, dev_path = demo_paths
    spec = PrivacySpec(target_epsilon=2.0, delta=1e-3, mechanism="laplace", clipping="fixed")
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), train_data=train_path, eval_data=dev_path, model="tiny-llama",
                      optimizer=optimizer, optim=OptimizerArgs(), peft=PeftSettings("lora", r=2), steps=20,
                      batch_size=8, eval_every=0, progress=False, privacy=spec)
    try:
        run = prepare(cfg)
    except SlimtuneError as err:
        assert "laplace" in str(err).lower()
        return
    noise = run.accountant.noise  # the sigma Opacus uses: std sigma * C on every coordinate (Gaussian)
    n = len(run.train_examples)
    actual = PrivacyAccountant(replace(spec, mechanism="gaussian"), n, 8, noise).epsilon(20)
    reported = run.accountant.epsilon(20)
    assert reported >= actual * (1 - 1e-6), (reported, actual)


# -- 2. bf16 Opacus releases ------------------------------------------------------------------------------------------
def _bf16_dp_sgd(sigma: float, clip: float):
    """DP-SGD on a one-layer bf16 model (4,096 trainable bf16 values). Review 14 made backprop refuse 16-bit trainable
    weights (`--dtype bf16 --peft none` with dp-sgd is refused at build), so the layer is cast to bf16 after the
    build: the release path is still checked on bf16 tensors, as a defence in depth."""
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    spec = PrivacySpec(noise_multiplier=sigma, clip=clip, clipping="fixed")
    noise = KeyedNoise(RunKey(b"r" * 32), run=9)
    opt = build_optimizer("dp-sgd", model, OptimizerArgs(lr=0.0), private=(spec, sigma, 1, noise))
    model.to(torch.bfloat16)  # in place: the optimizer's parameters are these
    (p,) = [q for q in model.parameters() if q.requires_grad]
    assert p.dtype == torch.bfloat16
    return opt, p


def _release(opt, p, grad_sample: torch.Tensor) -> torch.Tensor:
    """One step's released gradient for the given per-example gradients (one row per example in the batch)."""
    opt.torch_optimizer.zero_grad(set_to_none=True)
    p.grad_sample = grad_sample
    opt.torch_optimizer.step()
    opt.keyed_noise.end_step()
    return p.grad.detach().double().flatten()


def test_a_bf16_release_does_not_rule_out_tiny_outputs_when_the_example_is_present():
    """Neighbouring batches: D0 = {} and D1 = {one example whose clipped gradient is 2^-6 on each coordinate}.
    Released: o = x + N(0, (sigma C)^2) per coordinate, rounded to bf16 only afterwards (post-processing). Today the
    noise is rounded to bf16 first and added in bf16, so under D1 every |o| below 2^-13 is a multiple of 2^-14:
    an output 0 < |o| < 2^-14 proves the example absent (infinite privacy loss), and it occurs under D0 (about 1e-4
    per coordinate per step). Both batches must be able to produce such outputs."""
    sigma, clip, steps = 0.25, 2.0, 50  # noise std 0.5; the example's norm 2^-6 * 64 = 1 <= C: not clipped
    tiny = 2.0 ** -14

    def events(present: bool) -> int:
        opt, p = _bf16_dp_sgd(sigma, clip)
        shape = (1 if present else 0, *p.shape)
        count = 0
        for _ in range(steps):
            o = _release(opt, p, torch.full(shape, 2.0 ** -6, dtype=torch.bfloat16)).abs()
            count += int(((o > 0) & (o < tiny)).sum())
        return count

    absent, present = events(False), events(True)
    assert absent > 0  # the attacker's test fires on D0...
    assert present > 0, f"{absent} outputs in (0, 2^-14) without the example, none possible with it"


def test_one_bf16_example_moves_the_clipped_sum_by_at_most_c():
    """Sensitivity of the clipped sum the noise is added to: Opacus' clip factor C / (||g|| + 1e-6) is computed from
    a bf16 norm (8-bit mantissa) and applied in bf16, so a clipped bf16 example can have norm above C."""
    clip = 1.0
    opt, p = _bf16_dp_sgd(0.0, clip)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for scale in (0.7, 1.3, 3.0, 7.0, 15.0, 40.0, 100.0, 333.0, 1000.0):
        for _ in range(6):
            g = (torch.randn((1, *p.shape), generator=gen) * scale / 64).to(torch.bfloat16)
            _release(opt, p, g)
            worst = max(worst, p.summed_grad.double().norm().item())
    assert worst <= clip * (1 + 1e-6), f"one example's clipped contribution has norm {worst:.6f} > C = {clip}"


# -- 3. the Hugging Face trainer: one clipped value per row, not per example ----------------------------------------
class PackingCollator:
    """A packing collator slimtune cannot recognise by its type: refused at the first batch it packs."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening
        self.inner = DataCollatorWithFlattening()

    def __call__(self, examples):
        return self.inner(examples)


@pytest.mark.parametrize("packing", ["flattening", "custom"])
def test_a_private_trainer_clips_each_example_not_each_collated_row(tmp_path, monkeypatch, packing):
    """Poisson batches of several examples, packed by DataCollatorWithFlattening into one row: per_example_losses
    returns one loss for the whole batch, DPZero clips it once and Opacus clips the batch's gradient once, so one
    example can move the clipped sums by 2C (2S) while the accountant assumes C. The trainer must refuse the batch
    (or the run) when the losses it clips are not one per sampled example."""
    pytest.importorskip("datasets")
    from transformers import DataCollatorWithFlattening, TrainingArguments

    import slimtune.hf as hf
    from slimtune.hf import ZOArguments, ZOTrainer
    from test_hf import held_out_dataset, lm_dataset, model_for, tokenizer  # the suite's tiny LM and data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = tokenizer()
    model, ds, ev = model_for(tok, "lora"), lm_dataset(tok), held_out_dataset(tok)
    sampled, clipped = [], []
    original = hf.PoissonBatches.__iter__

    def recording(self):
        for batch in original(self):
            sampled.append(len(batch))
            yield batch

    monkeypatch.setattr(hf.PoissonBatches, "__iter__", recording)

    class Recording(ZOTrainer):
        def per_example_losses(self, model, inputs):
            losses = super().per_example_losses(model, inputs)
            clipped.append(losses.numel())
            return losses

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=7, max_steps=3)
    collator = DataCollatorWithFlattening() if packing == "flattening" else PackingCollator()
    try:  # a known packing collator is refused when the trainer is built, before any batch
        trainer = Recording(model=model, args=args, train_dataset=ds, eval_dataset=ev, data_collator=collator,
                            zo_args=ZOArguments(optimizer="dphybrid", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2,
                                                fo_layers=1))
        trainer.train()
    except SlimtuneError as exc:  # refused: fine, when it names the cause and no batch size
        assert "collator" in str(exc) and not any(ch.isdigit() for ch in str(exc)), exc
        return
    steps = [(s, c) for s, c in zip(sampled, clipped) if s > 0]
    assert steps and all(s == c for s, c in steps), f"(examples sampled, values clipped) per step: {steps}"
