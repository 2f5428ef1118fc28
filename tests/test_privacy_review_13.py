"""Privacy review 13: the Python API's private optimizers in a hand-written loop (PrivateOptimizer.sample_batch / step /
load_state_dict / epsilon_spent), the released scalar's floating-point form, and data-parallel ranks reading the run's
key file from their own --out."""

import json

import pytest
import torch

import slimtune
from slimtune import SlimtuneError
from test_python_api import batch, per_example, tiny_lm, trainable


def losses_of(model, idx):
    """The closure of a sampled batch (a 1-D tensor, one loss per example; empty for an empty Poisson batch)."""
    return per_example(model, batch(len(idx), n=len(idx))) if idx else (lambda: torch.zeros(0))


# -- 1. rolling a private optimizer back with load_state_dict ----------------------------------------------------------
def test_rolling_a_private_optimizer_back_does_not_forget_what_it_released():
    """A torch loop keeps `start = opt.state_dict()` and, after a bad stretch, rolls back with
    `opt.load_state_dict(start)` (the usual recipe). The object has already released its steps (each
    `out.info["projected_grad"]`, the weights), but load_state_dict resets step_count: epsilon_spent drops from 3.0 to 0.0,
    the `steps` check lets the whole budget be spent again (4 releases under a budget of 2 report epsilon 3.0), and
    sample_batch() hands out the same secret batch again (its draw is keyed by step_count), measured along the same z
    (the seed is mixed with step_count) with fresh noise: two noisy copies of one clipped sum, one of them unaccounted.
    Expected: refused (the key was used: build a new optimizer), or every release stays counted."""
    model = tiny_lm("lora")
    dp = slimtune.DPZero(model, epsilon=3.0, delta=1e-5, dataset_size=40, batch_size=8, steps=2, lr=1e-2, eps=1e-2)
    start = dp.state_dict()
    for _ in range(2):
        dp.step(losses_of(model, dp.sample_batch()))
    spent = dp.epsilon_spent
    assert spent > 2.5
    try:
        dp.load_state_dict(start)
    except SlimtuneError:
        return  # refused: this optimizer's key has released 2 steps already
    assert dp.epsilon_spent >= spent * (1 - 1e-9), (dp.epsilon_spent, spent)
    with pytest.raises(SlimtuneError):  # a third release is over the budget of 2 steps
        dp.step(losses_of(model, dp.sample_batch()))


# -- 2. a step on a batch sample_batch did not draw ----------------------------------------------------------------
def per_token(model, ids):
    """The usual slip: cross_entropy(reduction="none") flattened, one loss per token instead of per example."""
    def closure():
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").flatten()
    return closure


def moved(before, model) -> float:
    """The largest change of a trainable value since `before`: a refused step may leave a few ulp of restore error
    (theta + eps z - eps z in float32), never a perturbation (eps = 1e-2) or an update."""
    return max((a - b).abs().max().item() for a, b in zip(before, trainable(model)))


@pytest.mark.parametrize("how", ["without sample_batch", "another batch", "per-token losses"])
def test_a_private_step_takes_only_the_batch_sample_batch_drew(how):
    """The accountant prices each step as a Poisson sample of rate batch_size / dataset_size with one clipped term per
    example (sensitivity C). step() accepted any 1-D tensor: a DataLoader's fixed batch of 30 (no sample_batch()
    call: the torch habit, `for batch in loader: opt.step(...)`), a batch other than the one drawn, or per-token
    losses (7 clipped terms per example: sensitivity 7C). Each trained, returned a projected_grad and reported the
    Poisson epsilon. The optimizer knows the size of the batch it drew for this step (privately, in memory): a loss
    count that is not that size, or a step with no draw, is refused before anything is released (without naming the
    size), and the weights are where they were."""
    model = tiny_lm("lora")
    dp = slimtune.DPZero(model, epsilon=3.0, delta=1e-5, dataset_size=40, batch_size=16, steps=3, lr=1e-2, eps=1e-2)
    if how == "without sample_batch":
        closure = per_example(model, batch(0, n=30))
    else:
        idx = dp.sample_batch()
        assert idx  # P(empty) = 0.6 ** 40
        closure = (per_example(model, batch(1, n=len(idx) + 3)) if how == "another batch"
                   else per_token(model, batch(1, n=len(idx))))
    before = trainable(model)
    with pytest.raises(SlimtuneError) as refused:
        dp.step(closure)
    assert "sample_batch" in str(refused.value)
    assert not any(ch.isdigit() for ch in str(refused.value).split(":", 1)[-1]), str(refused.value)
    assert dp.steps_taken == 0
    assert moved(before, model) < 1e-6, "the step left a perturbation or an update behind"
    idx = dp.sample_batch()  # the same step can then be taken on its own batch
    out = dp.step(losses_of(model, idx))
    assert dp.steps_taken == 1 and out.info["projected_grad"] is not None


def test_a_private_step_needs_a_draw_for_each_step():
    """One sample_batch() per step: the draw of step 0 does not cover step 1 (its batch is another Poisson sample)."""
    model = tiny_lm("lora")
    dp = slimtune.DPZero(model, epsilon=3.0, delta=1e-5, dataset_size=40, batch_size=16, steps=3, lr=1e-2, eps=1e-2)
    idx = dp.sample_batch()
    dp.step(losses_of(model, idx))
    with pytest.raises(SlimtuneError, match="sample_batch"):
        dp.step(losses_of(model, idx))
    assert dp.steps_taken == 1


@pytest.mark.parametrize("method, extra, failing", [
    ("MeZO", {}, 2), ("MeZO", {"n_spsa": 2}, 3), ("LOZO", {}, 2), ("FZOO", {}, 3), ("HiZOO", {}, 3),
    ("SparseMeZO", {}, 2), ("Hybrid", {"fo_layers": 1}, 1), ("Hybrid", {"fo_layers": 1}, 2), ("DPZero", {}, 2),
    ("DPZero", {"n_spsa": 2}, 3), ("DPHiZOO", {}, 3), ("DPHybrid", {"fo_layers": 1}, 2)])
def test_a_closure_that_raises_mid_step_leaves_the_weights_where_they_were(method, extra, failing):
    """A step evaluates the closure at theta + eps z, then theta - eps z; when the closure raised on a later call (an
    out-of-memory on one batch, a KeyboardInterrupt, a check of the caller's) the exception propagated with the
    weights still perturbed: a model saved or evaluated after it was theta + eps z (or - eps z), and a retried step
    perturbed from there. The step puts theta back before the exception leaves it, and its state (step count, the
    adaptive clip a first estimate moved, the hybrid's top gradients) is as before, so the step can be taken again."""
    model = tiny_lm("lora")
    cls = getattr(slimtune, method)
    private = dict(epsilon=3.0, delta=1e-5, dataset_size=40, batch_size=16, steps=3) if cls.private else {}
    opt = cls(model, lr=1e-2, eps=1e-2, **extra, **private)
    idx = opt.sample_batch() if cls.private else list(range(4))
    good = losses_of(model, idx)
    calls = []

    def fails_once():
        calls.append(1)
        if len(calls) == failing:
            raise KeyboardInterrupt
        return good()

    before, state = trainable(model), opt.state_dict()["slimtune"]["optimizer"]
    with pytest.raises(KeyboardInterrupt):
        opt.step(fails_once)
    assert moved(before, model) < 1e-6, "the exception left theta perturbed"
    after = opt.state_dict()["slimtune"]["optimizer"]
    assert opt.steps_taken == 0
    assert after.get("estimator") == state.get("estimator")
    assert all(p.grad is None for p in model.parameters()), "the failed step left gradients behind"
    opt.step(good)
    assert opt.steps_taken == 1


# -- 3. Laplace noise in floating point (Mironov, CCS 2012) ----------------------------------------------------------
def test_laplace_releases_of_neighbouring_batches_differ_by_exactly_the_clipped_contribution(monkeypatch):
    """DPZero's Laplace noise is the textbook floating-point sampler, -b sign(u) log1p(-2|u|) with u a 53-bit double,
    added to the clipped sum in float64 and released at full precision (`out.info["projected_grad"]`, and the CLI's
    metrics.jsonl). The values it can take are sparse in the doubles, so the set of possible releases depends on the
    sum: Mironov's attack. Measured: releases of an empty batch (sum 0) against the neighbour holding one example
    clipped to C = 1 (sum 1), b = 1, expected batch 8: 242 of 300 releases of the empty batch cannot be produced by
    the neighbour under any u (checked exactly, by bisection over the 53-bit u): one release tells the two apart with
    probability ~0.8, so the mechanism is not (epsilon, delta)-DP for any delta < 0.8.

    The property a sound implementation has (rounding the clipped terms to a power-of-two grid and adding noise drawn
    on that grid, exact arithmetic; or any other exact-shift construction): with the same secret draws, the neighbour's
    release is the empty batch's shifted by exactly C / expected batch size, so both have the same set of possible
    outputs, shifted. Today fl(1 + n) - n != 1 for most draws n."""
    from slimtune.privacy import secret

    monkeypatch.setattr(secret.RunKey, "fresh", classmethod(lambda cls: cls(bytes(range(32)))))
    monkeypatch.setattr(secret, "fresh_nonce", lambda: 12345)  # both optimizers draw the same noise, step by step

    def build():
        return slimtune.DPZero(tiny_lm("lora"), mechanism="laplace", clipping="fixed", clip=1.0, noise_multiplier=1.0,
                               delta=1e-3, dataset_size=64, batch_size=8, steps=60, lr=1e-6, eps=1e-2)

    empty, neighbour = build(), build()
    calls = []

    def one_large_example():  # (l+ - l-) / (2 eps) = 1000: clipped to C = 1
        calls.append(1)
        return torch.tensor([10.0 if len(calls) % 2 else 0.0])

    off = 0
    for _ in range(60):  # the batches compared are given, not sampled: their draws are set as sample_batch() would
        empty._drawn[empty.steps_taken], neighbour._drawn[neighbour.steps_taken] = 0, 1
        y0 = empty.step(lambda: torch.zeros(0)).info["projected_grad"]
        y1 = neighbour.step(one_large_example).info["projected_grad"]
        off += (y1 - y0) * 8 != 1.0
    assert off == 0, f"{off} of 60 releases are not the neighbour's shifted by C / B (floating-point noise)"


# -- 4. the Python API's budget check ------------------------------------------------------------------------------
def test_a_python_optimizer_never_spends_more_than_the_epsilon_it_was_given():
    """DPZero(epsilon=2, noise_multiplier=sigma) is accepted when sigma spends up to 0.1% over the target
    (accountant.plan's 1.001 tolerance), and the Python API's only stop is the step count: epsilon_spent ends at 2.0008
    for a budget of 2. The CLI stops strictly at the target (trainer.budget_allows: 'instead of going past the target
    by up to the 0.1% it was once allowed'); the Python API still goes past it."""
    sigma = slimtune.privacy.noise_multiplier(epsilon=2.0, dataset_size=64, batch_size=8, steps=3, delta=1e-3)
    try:
        dp = slimtune.DPZero(tiny_lm("lora"), epsilon=2.0, noise_multiplier=sigma * 0.9998, clipping="fixed",
                             delta=1e-3, dataset_size=64, batch_size=8, steps=3, lr=1e-6)
    except SlimtuneError:
        return  # refused: this noise cannot keep the run within epsilon 2
    for _ in range(3):
        try:
            dp.step(lambda: torch.zeros(0))
        except SlimtuneError:
            break  # stopped before the step that would overspend
    assert dp.epsilon_spent <= 2.0 * (1 + 1e-9), dp.epsilon_spent


# -- 5. data-parallel ranks: the key each rank reads from its own --out ------------------------------------------------
def test_ranks_reading_different_run_key_files_are_refused_in_one_line(tmp_path, demo_paths):
    """--out may differ per rank (trainer.PER_RANK: 'paths may differ'), and without --secret-key-file every rank reads
    the key from ITS --out/secret.key; rank_facts compares a keyed digest only for --secret-key-file. A rank whose
    --out holds another run's key (a node-local directory of an earlier run) draws other Poisson batches and other
    noise: the global batch is then rank 0's even positions and rank 1's odd positions of two different draws (one
    example can be in both: sensitivity 2C), and the run dies in a collective when the draws' sizes differ, or trains
    on when they agree. Expected: after the key exists, every rank compares a digest of the key it read with rank 0's,
    and a rank with another key is one line, before any step."""
    from test_distributed_review import common, errors, launch

    from slimtune.privacy.secret import create_key_file

    other = tmp_path / "node-b-run"
    other.mkdir()
    create_key_file(other / "secret.key")  # an earlier run's key, on rank 1's side
    res = launch(tmp_path, common(demo_paths[0], tmp_path / "run", "dpzero", 3),
                 RANK_ARGS=json.dumps({"1": {"--out": str(other)}}))
    assert res.returncode != 0, "ranks with different run keys trained to completion"
    assert errors(res) and any("key" in line for line in errors(res)), res.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "a step was released with mixed keys"
