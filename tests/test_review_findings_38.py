"""Review 38: privacy you can trust from Python: a practitioner's own loop over the public private optimizers.

The rule: a private optimizer's (epsilon, delta) is true for what the user actually did, or the misuse is refused
with one clear error before anything is released, never silently weaker privacy.

1. DPHybrid clips the top blocks' gradient per forward row, not per loss: a closure that returns one loss per
   drawn example but evaluates the examples one forward each (`torch.stack([model(**ex).loss ...])`, the natural way
   to avoid padding; or any layout whose batch dimension is not the examples) makes Opacus add every example's
   gradient into one row, clipped once: one example moves the released gradient by up to 2 fo_clip, priced as one.
2. `batch_size`, `dataset_size` and `steps` are plain attributes that `sample_batch()` and the step cap read, while
   the accountant keeps the planned values: `opt.batch_size = 200` (a batch-size ramp) draws q = 0.5 batches that
   `epsilon_spent` prices at q = 0.02 (1.78 reported, 5.0 spent by that one step); `opt.steps = 100` lifts the cap.
3. A second private optimizer over a model a first one already trained (a notebook cell run again, two optimizers
   on one model) starts at epsilon_spent 0: the model's earlier releases are forgotten.

Tiny random models only; each test fails on the code it was written against.
"""

from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune import SlimtuneError
from slimtune.models.loading import tiny_model, tiny_tokenizer


def tiny_lm(seed: int = 0):
    tok = tiny_tokenizer(["a b c d e f g it was great terrible"])
    model = tiny_model("tiny-llama", len(tok), tok.pad_token_id, tok.eos_token_id, seed=seed).eval()
    torch.manual_seed(seed)
    return slimtune.apply_peft(model, "lora", r=4)


def rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 15, (n, 8), generator=g)


def losses_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return nll.mean(dim=1)


def private_step(opt, model) -> None:
    """One documented step: draw, then one loss per drawn example (an empty draw: no losses)."""
    idx = opt.sample_batch()
    ids = rows(len(idx))
    opt.step((lambda: losses_of(model, ids)) if idx else (lambda: torch.zeros(0)))


def test_dphybrid_refuses_losses_whose_forward_rows_are_not_the_examples():
    """The closure returns exactly one loss per drawn example, but runs the model once per example: Opacus' hooks
    then accumulate every example's top gradient into grad_sample row 0 (shape [1, ...] for 10 losses), and
    KeyedDPOptimizer clips that one row to fo_clip: the sum of all examples is clipped once, so adding or removing one
    example moves the clipped sum by up to 2 fo_clip while the noise is sigma x fo_clip. The step goes through
    silently; it must be refused before the release (per_example_gradients_ready sees losses.numel() and the rows)."""
    model = tiny_lm()
    opt = slimtune.DPHybrid(model, epsilon=3.0, delta=1e-5, dataset_size=20, batch_size=10, steps=3, fo_layers=1)
    idx = opt.sample_batch()  # q = 0.5 over 20: fewer than 2 examples with probability ~2e-5
    assert len(idx) >= 2
    ids = rows(len(idx))

    def one_forward_per_example():
        return torch.cat([losses_of(model, ids[i:i + 1]) for i in range(len(idx))])

    with pytest.raises(SlimtuneError):
        opt.step(one_forward_per_example)


def _refused(action) -> bool:
    try:
        action()
    except (SlimtuneError, AttributeError):
        return True
    return False


@pytest.mark.parametrize("name,value", [("batch_size", 200), ("dataset_size", 16)])
def test_a_private_optimizer_never_samples_at_a_rate_its_accountant_did_not_price(name, value):
    """DPZero(dataset_size=400, batch_size=8) prices q = 0.02. Setting `opt.batch_size = 200` (or `dataset_size =
    16`) afterwards is accepted, and `_draw` builds its PoissonSampler from the attributes: the next draw holds ~200
    examples (q = 0.5) while epsilon_spent still reports the q = 0.02 price (1.78 after that step; the same sigma at
    q = 0.5 spends 5.0 in one step). Either the change is refused, or the draw stays at the accounted rate."""
    model = tiny_lm()
    opt = slimtune.DPZero(model, epsilon=2.0, delta=1e-5, dataset_size=400, batch_size=8, steps=5)
    if _refused(lambda: setattr(opt, name, value)):
        return
    idx = opt.sample_batch()
    # at the accounted rate (8 of 400) ~8 examples spread over 0..399; at q = 0.5 over 16, ~8 all below 16
    assert len(idx) < 60 and (not idx or max(idx) >= 16), (
        f"{len(idx)} examples drawn (max index {max(idx, default=None)}) after {name}={value}: priced as a Poisson "
        "sample of 8 out of 400")


def test_a_private_optimizers_step_cap_cannot_be_lifted_by_an_attribute():
    """'A step beyond `steps` is refused (it would spend more than the budget)': the cap reads `self.steps`, a plain
    attribute; `opt.steps = 100` lets a loop run on past the calibrated 3 steps and past epsilon=2 (2.06 after 7)."""
    model = tiny_lm()
    opt = slimtune.DPZero(model, epsilon=2.0, delta=1e-5, dataset_size=400, batch_size=8, steps=3)
    if _refused(lambda: setattr(opt, "steps", 100)):
        return
    for _ in range(3):
        private_step(opt, model)
    with pytest.raises(SlimtuneError, match="calibrated for 3 steps"):
        private_step(opt, model)
    assert opt.epsilon_spent <= 2.0


def test_a_second_private_optimizer_does_not_forget_what_the_model_already_released():
    """A notebook: the DPZero cell ran, the loop cell ran 3 steps; the DPZero cell runs again (same model, its weights
    now hold 3 private releases) and the loop too. The new optimizer reports epsilon_spent from 0: the model's
    (epsilon, delta) is under-reported. Either the second optimizer refuses parameters a private optimizer already
    updated (unless its state was loaded), or its epsilon covers those steps."""
    model = tiny_lm()
    first = slimtune.DPZero(model, epsilon=2.0, delta=1e-5, dataset_size=400, batch_size=8, steps=5)
    for _ in range(3):
        private_step(first, model)
    refuses_or_covers(model, first.accountant.epsilon(4))  # 3 steps of the first and 1 of the second


def refuses_or_covers(model, spent: float) -> None:
    """A new DPZero over `model`'s weights either refuses to step or reports at least what they spent."""
    try:
        second = slimtune.DPZero(model, epsilon=2.0, delta=1e-5, dataset_size=400, batch_size=8, steps=5)
        private_step(second, model)
    except SlimtuneError:
        return
    assert second.epsilon_spent >= spent * (1 - 1e-9), (
        f"epsilon_spent {second.epsilon_spent:.3g} for weights that took private steps worth {spent:.3g}")
