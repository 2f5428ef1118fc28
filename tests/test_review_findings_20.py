"""Review 20 of the changes since ef9da8e (the private step's draw check, the ZO step's abort path, the recorded SST-2
prompt). Each test failed on the code it was written against."""

from __future__ import annotations

import json

import pytest
import torch

import slimtune
from test_bad_input_table import DEV, FAST, TINY, TRAIN, assert_one_line, cli
from test_privacy_review_13 import losses_of, moved
from test_python_api import tiny_lm, trainable

PRIVATE = dict(epsilon=3.0, delta=1e-5, dataset_size=40, batch_size=16, steps=3)


def build(method, **extra):
    model = tiny_lm("lora")
    cls = getattr(slimtune, method)
    opt = cls(model, lr=1e-2, eps=1e-2, **extra, **(PRIVATE if cls.private else {}))
    idx = opt.sample_batch() if cls.private else list(range(4))
    return model, opt, losses_of(model, idx)


def interrupt_sweep(monkeypatch, opt, number: int, op: str | None = None):
    """A KeyboardInterrupt at the start of the step's `number`-th sweep (counting only sweeps of `op` if given)."""
    real, seen = opt.impl._sweep, []

    def sweep(seed, kind, *args, **kwargs):
        if op is None or kind == op:
            seen.append(kind)
            if len(seen) == number:
                raise KeyboardInterrupt
        return real(seed, kind, *args, **kwargs)
    monkeypatch.setattr(opt.impl, "_sweep", sweep)


def interrupt_inside_sweep(monkeypatch, opt, draw: int):
    """A KeyboardInterrupt inside a sweep: at the `draw`-th draw of z (one per parameter here), i.e. after the
    sweep has moved the parameters before it and not the ones after."""
    real, seen = opt.impl.source.draw, []

    def drawing(*args, **kwargs):
        seen.append(1)
        if len(seen) == draw:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(opt.impl.source, "draw", drawing)


# The contract these tests hold a step to (zo/mezo.ZOOptimizer.step): before its update, a failure puts theta and the
# estimators back (the step can be taken again); Ctrl-C is held until a sweep, or the update, ends; from the update on
# the step counts as taken (a private run prices its releases) and a failure there, or inside a sweep, leaves the
# optimizer refusing further steps (the weights cannot be put back exactly), never a silent retry of the same step.
def sigint_at_draw(monkeypatch, opt, draw: int):
    """A real Ctrl-C (SIGINT to this process) at the `draw`-th draw of z: inside a sweep, between two parameters."""
    import os
    import signal
    real, seen = opt.impl.source.draw, []

    def drawing(*args, **kwargs):
        seen.append(1)
        if len(seen) == draw:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(opt.impl.source, "draw", drawing)


def refuses_further_steps(opt, good):
    with pytest.raises(slimtune.SlimtuneError, match="reload them from a checkpoint"):
        opt.step(good)


# -- 1. a failure between a step's update sweeps -----------------------------------------------------------------------
@pytest.mark.parametrize("method, extra", [("MeZO", {"n_spsa": 2}), ("DPZero", {"n_spsa": 2}), ("FZOO", {})])
def test_a_failure_between_update_sweeps_counts_the_step_and_stops_the_optimizer(monkeypatch, method, extra):
    """n-SPSA (and FZOO) apply one update sweep per estimate. A failure after the first left part of the update in
    theta with step_count unchanged: a retried step applied its update again (private: a second release of the same
    batch that the accountant never priced)."""
    model, opt, good = build(method, **extra)
    interrupt_sweep(monkeypatch, opt, 2, op="update")
    with pytest.raises(KeyboardInterrupt):
        opt.step(good)
    assert opt.steps_taken == 1  # counted: its release is in the weights
    if opt.private:
        assert opt.epsilon_spent > 0
    refuses_further_steps(opt, good)


@pytest.mark.parametrize("method, extra", [("MeZO", {"n_spsa": 2}), ("DPZero", {}), ("FZOO", {})])
def test_ctrl_c_during_the_update_is_held_until_the_step_is_complete(monkeypatch, method, extra):
    """A real SIGINT inside an update sweep: the step finishes (theta as an uninterrupted step leaves it), is counted,
    and then KeyboardInterrupt leaves it; the optimizer goes on."""
    model, opt, good = build(method, **extra)
    twin_model, twin, twin_good = build(method, **extra)
    if opt.private:
        pytest.skip("a private twin draws other noise from its own key")  # the restore check below covers private
    twin.step(twin_good)
    per_sweep = len(opt.impl.params)
    forwards_sweeps = {"MeZO": 6, "FZOO": 16}[method]  # sweeps before the update: 3 per estimate, 2 per direction
    sigint_at_draw(monkeypatch, opt, per_sweep * forwards_sweeps + 2)
    with pytest.raises(KeyboardInterrupt):
        opt.step(good)
    assert opt.steps_taken == 1
    assert moved(trainable(twin_model), model) < 1e-6, "the held Ctrl-C cut the update"
    opt.step(good)
    assert opt.steps_taken == 2


# -- 2. inside a sweep --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, sweep", [("MeZO", 0), ("MeZO", 1), ("DPZero", 1), ("HiZOO", 1), ("SparseMeZO", 1)])
def test_ctrl_c_inside_a_perturbation_sweep_waits_for_it_then_puts_theta_back(monkeypatch, method, sweep):
    """`_sweep` sets `_offset` after its last parameter: an interrupt part-way left the parameters before it moved and
    the abort removed the wrong multiple of z. Ctrl-C is now held until the sweep ends, then the step is undone."""
    model, opt, good = build(method)
    per_sweep = len(opt.impl.params)
    before = trainable(model)
    sigint_at_draw(monkeypatch, opt, per_sweep * sweep + 2)
    with pytest.raises(KeyboardInterrupt):
        opt.step(good)
    assert opt.steps_taken == 0
    assert moved(before, model) < 1e-6, "the interrupted sweep left theta moved"
    monkeypatch.undo()
    opt.step(good)
    assert opt.steps_taken == 1


@pytest.mark.parametrize("method, sweep", [("MeZO", 0), ("MeZO", 2), ("DPZero", 2), ("HiZOO", 2)])
def test_another_failure_inside_a_sweep_stops_the_optimizer(monkeypatch, method, sweep):
    """An exception that is not Ctrl-C inside a sweep (out of memory on a later device) cannot be held: the weights
    are partly moved, so the optimizer refuses to go on from them (and, past the update, counts the step)."""
    model, opt, good = build(method)
    interrupt_inside_sweep(monkeypatch, opt, len(opt.impl.params) * sweep + 2)
    with pytest.raises(KeyboardInterrupt):
        opt.step(good)
    assert opt.steps_taken == (1 if sweep == 2 else 0)
    refuses_further_steps(opt, good)


# -- 3. the hybrid's top step -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["Hybrid", "DPHybrid"])
def test_a_hybrid_step_failing_in_its_top_step_is_counted_and_stops_the_optimizer(monkeypatch, method):
    """The low part was updated before _top_step (DPHybrid: Opacus' per-example clipping, where memory runs out); a
    failure there kept that update with step_count unchanged, and a retry released the batch again, unpriced."""
    model, opt, good = build(method, fo_layers=1)

    def fails():
        raise KeyboardInterrupt
    monkeypatch.setattr(opt.impl, "_top_step", fails)
    with pytest.raises(KeyboardInterrupt):
        opt.step(good)
    assert opt.steps_taken == 1
    refuses_further_steps(opt, good)


# -- 4. DP-HiZOO: the curvature release's state ------------------------------------------------------------------------
def test_an_aborted_dphizoo_step_restores_the_curvature_estimators_state():
    """HiZOO has a second estimator, `self.curvature` (DP-HiZOO: its own adaptive clip, moved by a noisy count); a step
    that failed after it ran kept the moved clip, so the retried step was not the step that failed."""
    model, opt, good = build("DPHiZOO")
    state = opt.state_dict()["slimtune"]["optimizer"]
    real = opt.impl.curvature

    class Fails:
        def __call__(self, *args):
            real(*args)  # moves the adaptive clip, then fails
            raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(real, name)
    opt.impl.curvature = Fails()
    with pytest.raises(KeyboardInterrupt):
        opt.step(good)
    opt.impl.curvature = real
    assert opt.steps_taken == 0
    assert opt.state_dict()["slimtune"]["optimizer"]["curvature"] == state["curvature"]


# -- 5. LOZO's forward hooks -------------------------------------------------------------------------------------------
def test_a_failure_inside_a_lozo_sweep_leaves_no_shift_in_the_forward(monkeypatch):
    """LOZO (full fine-tuning) perturbs its matrices through forward hooks: `_sweep` moves `_shift` before its loop and
    `_offset` after it. A failure inside the loop left `_shift` = eps, so every later forward of the model (an
    evaluation) added eps x U V^T to its hooked layers. The hooked matrices themselves are never written, so the
    shift can always be dropped."""
    from test_python_api import batch
    model = tiny_lm(None)
    opt = slimtune.LOZO(model, lr=1e-2, eps=1e-2)
    assert opt.impl.hooked
    ids = batch(3)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    real_sweep, real_is_matrix, inside = opt.impl._sweep, opt.impl.is_matrix, []

    def sweep(*args, **kwargs):
        inside.append(0)
        return real_sweep(*args, **kwargs)

    def is_matrix(p):
        if inside:
            inside.append(1)
            if len(inside) == 1 + len(opt.impl.params) + 2:  # after _directions' draws: the loop's second parameter
                raise KeyboardInterrupt
        return real_is_matrix(p)
    monkeypatch.setattr(opt.impl, "_sweep", sweep)
    monkeypatch.setattr(opt.impl, "is_matrix", is_matrix)
    with pytest.raises(KeyboardInterrupt):
        opt.step(losses_of(model, list(range(4))))
    assert opt.impl._shift == 0.0, opt.impl._shift


# -- 6. `--config RUN/config.json` and the recorded prompt ----------------------------------------------------------------
@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rv20") / "run"
    res = cli("train", "--data", TRAIN, *TINY, "--optimizer", "mezo", *FAST, "--eval-every", "0", "--out", out)
    assert res.exit_code == 0, res.output
    return out


def test_a_config_of_a_run_from_before_the_record_reproduces_its_prompt(sst2_run, tmp_path):
    """`--config RUN/config.json` is "what it was trained with" (settings/cli.file_values) and, for the same model,
    optimizer and PEFT, "the run is reproduced" (settings/train.retable). A run from before the prompt was recorded
    has template / label_words null; --resume reads it through resume.as_trained (the prompt of its time), --config
    does not: the "reproduction" silently trains on 'Review: ... Sentiment:' negative/positive."""
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((sst2_run / "config.json").read_text())
    config["template"] = config["label_words"] = None
    config["out_dir"] = str(old)
    (old / "config.json").write_text(json.dumps(config))
    res = cli("train", "--config", old / "config.json", "--out", tmp_path / "again", "--eval-every", "0")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (again["template"], again["label_words"]) == ("{sentence} It was", "0=terrible,1=great")


@pytest.mark.parametrize("task", ["rte", "generation"])
def test_a_runs_recorded_default_prompt_does_not_block_another_task_from_its_config(sst2_run, tmp_path, task):
    """A run now records SST-2's default prompt as template / label_words. `--config RUN/config.json --task rte`
    (or generation) carries that template into the new task and is refused with '--template 'Review: {sentence}...':
    only {sentence1}, {sentence2} can be filled in', a flag the user never gave (before the record, config.json held
    null and the same command worked). The recorded prompt was the old task's default, not a choice: the file's
    template must not be blamed on --template, and not be carried to another task."""
    res = cli("train", "--config", sst2_run / "config.json", "--task", task, "--data", TRAIN,
              "--out", tmp_path / "other", "--dry-run")
    assert "--template 'Review:" not in " ".join(res.output.split()), res.output


# -- 7. eval of an adapter whose parent directory is not a run ------------------------------------------------------
@pytest.mark.parametrize("content", ["[1, 2]", "{not json"])
def test_eval_of_an_adapter_beside_a_config_json_that_is_not_a_run(sst2_run, tmp_path, content):
    """prompt_of_adapter reads `<adapter>/../config.json` whatever it is. An adapter copied into a folder whose
    config.json is some other file (a list, another tool's file, a half-written one) cannot be evaluated any more:
    internal error (AttributeError, exit 1) for a JSON list, 'not valid JSON; cannot check what the run was trained
    with' (exit 2) for a broken one, although nothing asked for that file. A config.json that is not a run's own
    (settings/train.is_run_config) should be passed over (the given or the task's prompt)."""
    import shutil
    folder = tmp_path / "shared"
    shutil.copytree(sst2_run / "adapter", folder / "adapter")
    (folder / "config.json").write_text(content)
    res = cli("eval", "--data", DEV, *TINY, "--adapter", folder / "adapter")
    assert res.exit_code == 0, res.output
