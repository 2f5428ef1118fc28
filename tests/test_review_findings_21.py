"""Review 21 of the ZO step's all-or-nothing contract (b544dbe, 76c9db0) where it meets the rest of the system: the
abort path's own sweep, two Ctrl-C inside one held sweep under `slimtune train`'s handler, and a private
Hugging Face trainer trained again after Ctrl-C. Each test failed on the code it was written against."""

from __future__ import annotations

import os
import signal

import pytest

import slimtune
from test_privacy_review_13 import moved
from test_python_api import trainable
from test_review_findings_20 import build, refuses_further_steps


def failing_closure(good, at: int, calls: list):
    """`good`, except that its `at`-th call raises KeyboardInterrupt (Ctrl-C inside a forward pass)."""
    def closure():
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return good()
    return closure


# -- 1. a failure inside the abort's own sweep -----------------------------------------------------------------------
def test_a_failure_inside_the_sweep_that_undoes_a_failed_step_stops_the_optimizer(monkeypatch):
    """A step that fails before its update is undone by one more sweep (`_abort_step` -> `_perturb(seed, -offset)`).
    When that sweep itself fails part-way (out of memory on a later device, as review 20's sweeps), step() takes the
    abort branch only and never marks the optimizer broken: the next step runs from weights that are partly
    theta + eps z."""
    model, opt, good = build("MeZO")
    calls: list = []
    real, after_failure = opt.impl.source.draw, []

    def drawing(*args, **kwargs):
        if len(calls) >= 2:  # the closure failed: this is the abort's sweep
            after_failure.append(1)
            if len(after_failure) == 2:  # its second parameter: the first is restored, the rest are not
                raise RuntimeError("CUDA out of memory")
        return real(*args, **kwargs)
    monkeypatch.setattr(opt.impl.source, "draw", drawing)
    with pytest.raises(RuntimeError):
        opt.step(failing_closure(good, 2, calls))
    monkeypatch.undo()
    assert opt.steps_taken == 0
    refuses_further_steps(opt, good)


# -- 2. a second Ctrl-C during the abort's sweep -----------------------------------------------------------------------
def test_a_second_ctrl_c_during_the_abort_sweep_still_restores_the_estimators_state(monkeypatch):
    """Ctrl-C pressed twice: the first inside a forward (the step is aborted), the second during the abort's sweep, where
    it is held and raised when the sweep ends, from inside `_abort_step`, before the estimators' states are put back.
    DPZero with n_spsa=2 has moved its adaptive clip on the first estimate: the clip stays moved by a step that
    counts as never taken (Hybrid's override also skips dropping the top's gradients the same way)."""
    model, opt, good = build("DPZero", n_spsa=2)
    saved = opt.state_dict()["slimtune"]["optimizer"]["estimator"]
    calls: list = []
    real, after_failure = opt.impl.source.draw, []

    def drawing(*args, **kwargs):
        if len(calls) >= 3:  # the second estimate's forward failed: the abort's sweep
            after_failure.append(1)
            if len(after_failure) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
        return real(*args, **kwargs)
    monkeypatch.setattr(opt.impl.source, "draw", drawing)
    with pytest.raises(KeyboardInterrupt):
        opt.step(failing_closure(good, 3, calls))
    assert after_failure, "the abort made no sweep"
    assert opt.steps_taken == 0
    assert repr(opt.state_dict()["slimtune"]["optimizer"]["estimator"]) == repr(saved)
    monkeypatch.undo()
    opt.step(good)  # the abort's sweep ended whole (the Ctrl-C was held): theta is back and the optimizer goes on
    assert opt.steps_taken == 1


# -- 3. two Ctrl-C inside one held sweep, under `slimtune train`'s handler --------------------------------------------
def test_two_ctrl_c_inside_one_sweep_stop_slimtune_train_at_once(monkeypatch):
    """`slimtune train`: the first Ctrl-C = stop after this step, the second = stop at once. deferred_interrupt keeps
    only that a signal came (held[0]) and hands it to the trainer's handler once: two presses during one sweep (a
    large model's sweep takes seconds) count as one, and the step runs on to the end (all its forwards)."""
    from slimtune.train.trainer import _stop_on_interrupt
    model, opt, good = build("MeZO")
    before = trainable(model)
    real, seen = opt.impl.source.draw, []

    def drawing(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:  # inside the first perturbation sweep
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(opt.impl.source, "draw", drawing)
    with _stop_on_interrupt() as interrupted:
        with pytest.raises(KeyboardInterrupt):  # the second press: at once (after the sweep, which is never cut)
            opt.step(good)
    assert interrupted()
    assert opt.steps_taken == 0
    assert moved(before, model) < 1e-6


# -- 4. a private Hugging Face trainer trained again after Ctrl-C -----------------------------------------------------
def test_a_private_trainer_trained_again_evaluates_each_steps_own_poisson_batch(tmp_path, monkeypatch):
    """Ctrl-C in a notebook leaves a private ZOTrainer whose optimizer counted its steps (the held Ctrl-C ends a
    complete, counted step); `trainer.train()` again (resume_from_checkpoint is refused, a second call is not) keeps
    that optimizer, but PoissonBatches numbers its draws from epoch 0 again: step k is given the batch drawn for step
    0, which was already released. Its size is checked against step k's draw only: when the sizes differ the step is
    refused as 'another number of per-example losses' (misleading); when they agree, step 0's secret sample is used a
    second time, which the accountant (independent Poisson samples) never priced."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import DataCollatorForLanguageModeling, TrainerCallback

    from slimtune import hf
    from test_hf import hf_args, lm_dataset, model_for, tokenizer

    class CtrlC(TrainerCallback):
        fired = False

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and not CtrlC.fired:
                CtrlC.fired = True
                raise KeyboardInterrupt

    tok = tokenizer()
    trainer = hf.ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=6,
                                                                        per_device_train_batch_size=2),
                           train_dataset=lm_dataset(tok), data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                           zo_args=hf.ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2),
                           callbacks=[CtrlC()])
    yielded: list = []  # the step each batch the loader gave was drawn for, in order
    taken: list = []  # the optimizer's step when each batch reached a step
    real_iter, real_step = hf.PoissonBatches.__iter__, hf.ZOTrainer._private_step

    def iterate(self):
        for i, indices in enumerate(real_iter(self)):
            yielded.append(self.epoch * self.batches_per_epoch + i)
            yield indices

    def step(self, opt, model, inputs):
        taken.append(opt.steps_taken)
        return real_step(self, opt, model, inputs)
    monkeypatch.setattr(hf.PoissonBatches, "__iter__", iterate)
    monkeypatch.setattr(hf.ZOTrainer, "_private_step", step)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.zo_optimizer().steps_taken == 2
    yielded.clear()
    taken.clear()
    try:
        trainer.train()
    except slimtune.SlimtuneError as exc:
        assert not taken or "another number of per-example losses" not in str(exc), str(exc)
    pairs = list(zip(taken, yielded))
    assert all(step == drawn for step, drawn in pairs), f"(optimizer step, batch drawn for step): {pairs}"


# -- 5. the release ledger of a `slimtune train` step that failed in its update ---------------------------------------
def test_a_private_cli_step_that_fails_in_its_update_is_in_the_release_ledger(tmp_path, monkeypatch):
    """`released_through` (status.json, what --restart and a later attempt price) moved only when a step returned; a
    step that failed after its update began (its release in the weights, the optimizer counting it) was not priced:
    found in review 21, noted without a test."""
    import json

    from slimtune.zo.mezo import ZOOptimizer
    from test_bad_input_table import FAST, TINY, TRAIN, cli
    real, calls = ZOOptimizer._sweep, []

    def sweep(self, seed, op, *args, **kwargs):
        if op == "restore_update":
            calls.append(1)
            if len(calls) == 2:  # step 2's update
                raise RuntimeError("out of memory")
        return real(self, seed, op, *args, **kwargs)
    monkeypatch.setattr(ZOOptimizer, "_sweep", sweep)
    out = tmp_path / "run"
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "dpzero", "--epsilon", "3", "--delta", "1e-3",
              *["--steps", "3", *FAST[2:]], "--eval-every", "0", "--out", out)
    assert res.exit_code != 0
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["released_through"] == 2, status
