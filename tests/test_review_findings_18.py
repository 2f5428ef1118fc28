"""Eighteenth review round: the fixes of privacy review 12, review 17 and federated review 11 attacked (the private
Hugging Face trainer's loss refusal, the private optimizer's state check, the model-position rule, a run's lock probe,
rich markup, the Python API's messages).

Each test fails on the code it was written against (HEAD e4d27a7); nothing here runs a slow test."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from slimtune import SlimtuneError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import DEMO  # noqa: E402
from test_bad_input_table import assert_one_line, cli  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


# -- 1. a custom loss in a trainer class below ZOTrainerMixin is silently replaced ---------------------------------
def test_a_private_trainer_refuses_a_custom_loss_of_the_trainer_it_is_mixed_into(tmp_path):
    """_check_private_loss refuses a compute_loss only when the class that defines it is a subclass of ZOTrainerMixin.
    The documented way to add slimtune to a trainer is `class ZOX(ZOTrainerMixin, X)`, and TRL 1.x deprecates
    compute_loss_func in favour of 'subclass SFTTrainer and override compute_loss': the user's own X (a weighted or
    custom-objective trainer) sits below the mixin, its compute_loss is not refused, and the private run trains on
    per_example_losses' plain cross-entropy without a word (compute_loss is never called)."""
    datasets = pytest.importorskip("datasets")  # noqa: F841
    from transformers import DataCollatorForLanguageModeling, Trainer

    from slimtune.hf import ZOArguments, ZOTrainerMixin
    from test_hf import hf_args, lm_dataset, model_for, tokenizer

    calls = []

    class WeightedTrainer(Trainer):  # the user's own trainer, with the objective they want
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls.append(1)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class ZOWeighted(ZOTrainerMixin, WeightedTrainer):
        pass

    tok = tokenizer()
    with pytest.raises(SlimtuneError, match="compute_loss"):
        trainer = ZOWeighted(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=2),
                             train_dataset=lm_dataset(tok),
                             data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                             zo_args=ZOArguments(optimizer="dpzero", epsilon=8.0, delta=1e-3, lr=1e-2, eps=1e-2))
        trainer.train()
    assert not calls


# -- 2. --max-new-tokens beyond the model's positions: eval and train still crash ----------------------------------
def _generation_table(tmp_path: Path) -> Path:
    table = tmp_path / "e2e.csv"
    rows = [(f"food[{f}], area[{a}]", f"A {f} place by the {a}.")
            for f in ("pizza", "sushi") for a in ("centre", "river")]
    table.write_text("mr,ref\n" + "".join(f"\"{p}\",{r}\n" for p, r in rows))
    return table


GENERATION = ["--model", "tiny-gpt2", "--task", "generation", "--input-column", "mr", "--target-column", "ref",
              "--template", "{mr}\n", "--max-new-tokens", "300", "--batch-size", "4", "--device", "cpu"]


@pytest.mark.parametrize("command", ["eval", "train"])
def test_generation_beyond_the_models_positions_is_refused_before_any_work(tmp_path, command):
    """Review 17 added check_positions(model, max_length, new_tokens), but only `generate` passes --max-new-tokens:
    `eval` and `train` of a generation task check --max-length alone. tiny-gpt2 has 256 learned positions; with
    --max-new-tokens 300 prompt_room cuts the prompts to 1 token and generation then indexes position 256: 'internal
    error (IndexError: index out of range in self)', exit 1 (train: at its first evaluation,
    after loading the model and data)."""
    table = _generation_table(tmp_path)
    if command == "eval":
        res = cli("eval", "--data", table, *GENERATION)
    else:
        res = cli("train", "--data", table, "--eval-data", table, "--out", tmp_path / "run", "--steps", "2",
                  "--eval-every", "2", "--quiet", *GENERATION)
    assert_one_line(res, "--max-new-tokens")


# -- 3. federate prints its --out as rich markup ------------------------------------------------------------------
def test_federate_prints_its_output_directory_as_text(tmp_path, monkeypatch):
    """Review 17 escaped the paths train, export, merge, report, plan and generate print, not federate's: a run whose
    --out holds '[/b]' (sweep[/b], a results/[lr=3e-4] folder) trains every round, writes its adapter and summary, and
    then ends in 'internal error (MarkupError: closing tag ...)', exit 1."""
    import slimtune.federated
    import slimtune.report

    monkeypatch.setattr(slimtune.federated, "simulate",  # the run itself (minutes of Flower) is not what is tested
                        lambda cfg: {"final_accuracy": 0.5, "client_visible_accuracy": 0.5})
    monkeypatch.setattr(slimtune.report, "print_summary", lambda summaries, console: None)
    out = tmp_path / "sweep[/b]"
    res = cli("federate", "--data", DEMO / "sst2_demo_train.tsv", "--model", "tiny-llama", "--out", out)
    assert res.exit_code == 0, res.output
    assert "sweep[/b]" in "".join(res.stdout.split()), res.stdout  # the path as it is (rich may wrap it)


# -- 4. export's lock probe makes a train that starts at the same moment refuse -----------------------------------
def test_the_lock_probe_of_export_does_not_refuse_a_starting_train(tmp_path, monkeypatch):
    """run_dir.lock_held tests the run's .lock by taking a shared flock (LOCK_SH | LOCK_NB) for a moment. A `slimtune
    train --resume` of that run (its status.json says running: it crashed) that claims the directory in that moment
    takes LOCK_EX | LOCK_NB, fails, and refuses: 'another slimtune process (pid ...) is training into this
    directory', naming the dead run's pid. The probe is what export and merge run on every call."""
    from slimtune.train.run_dir import LOCK_FILE, STATUS_FILE, RunDirectory, check_finished_run

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / STATUS_FILE).write_text(json.dumps({"state": "running", "pid": 999999, "step": 4}))
    (run / LOCK_FILE).touch()
    flock, outcome, threads = fcntl.flock, [], []

    def train_claims():  # `slimtune train --resume` in another process, as RunDirectory.acquire claims the directory
        try:
            claim = RunDirectory(run)
            claim.acquire()
            claim.release()
            outcome.append("claimed")
        except SlimtuneError as exc:
            outcome.append(str(exc))

    def probing(fd, operation):
        flock(fd, operation)
        if operation == fcntl.LOCK_SH | fcntl.LOCK_NB and not threads:  # export holds its probe: train starts now
            threads.append(threading.Thread(target=train_claims))
            threads[0].start()
            time.sleep(0.2)  # the probe is held for a moment (a busy machine, a slow file system)

    monkeypatch.setattr(fcntl, "flock", probing)
    with pytest.raises(SlimtuneError):  # the run stopped without finishing: export refuses (as it should)
        check_finished_run(run / "adapter", "ADAPTER")
    threads[0].join(10)
    assert outcome == ["claimed"], outcome


# -- 5. a private optimizer's state saved before the privacy identity existed -------------------------------------
def test_a_private_state_without_its_privacy_settings_is_not_restored_under_other_noise():
    """load_state_dict checks the privacy settings only `if "privacy" in saved`. Every PrivateOptimizer state written
    before today (92ca67e and earlier) has `run` (seed, eps, shapes) but no `privacy`: restored into a DPZero of other
    noise it is accepted, and epsilon_spent re-prices its steps at the new noise (50 -> ~1: the under-report the check
    was added for)."""
    import slimtune
    from test_privacy_review_12 import spent_dpzero

    model, spent = spent_dpzero()
    state = spent.state_dict()
    del state["slimtune"]["run"]["privacy"]  # as 92ca67e's PrivateOptimizer.state_dict wrote it
    restored = slimtune.DPZero(model, dataset_size=72, batch_size=8, steps=8, epsilon=1.0, delta=1e-3, lr=1e-2,
                               eps=1e-2)
    try:
        restored.load_state_dict(state)
    except SlimtuneError:
        return  # refused: its privacy settings are unknown
    assert restored.epsilon_spent >= spent.epsilon_spent * (1 - 1e-6), (restored.epsilon_spent, spent.epsilon_spent)


# -- 6. the Python API's messages changed ----------------------------------------------------------------------------
def test_an_empty_keyword_is_named_as_the_caller_gave_it():
    """9814ab1 ('messages unchanged: keyword=value for Python callers') names the coerced value: target_modules=[]
    is now reported as "target_modules='': empty", a value the caller never passed (it was target_modules=[])."""
    from slimtune.settings.python import check_keywords

    with pytest.raises(SlimtuneError) as err:
        check_keywords("slimtune.MeZO", {"target_modules": []}, {"optimizer": "mezo", "peft": "lora"})
    assert "target_modules=[]" in str(err.value), str(err.value)


# -- 7. export of an unfinished run's adapter through '.' or a symlink ----------------------------------------------
@pytest.mark.parametrize("how", ["dot", "symlink"])
def test_export_checks_the_run_of_an_adapter_given_as_dot_or_a_symlink(tmp_path, monkeypatch, how):
    """check_finished_run looks for status.json in Path(adapter).parent, unresolved: `cd run/adapter && slimtune export
    . --out m.gguf` (parent '.') or a `best -> run/adapter` symlink (parent: the symlink's folder) finds no status.json
    and takes the adapter of a run that is still training as it is."""
    from slimtune.train.run_dir import LOCK_FILE, STATUS_FILE, check_finished_run

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / STATUS_FILE).write_text(json.dumps({"state": "running", "pid": os.getpid(), "step": 4}))
    fd = os.open(run / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a train holds it: it is training into the run now
    try:
        if how == "dot":
            monkeypatch.chdir(run / "adapter")
            given = "."
        else:
            given = tmp_path / "best"
            given.symlink_to(run / "adapter", target_is_directory=True)
        with pytest.raises(SlimtuneError, match="still training"):
            check_finished_run(given, "ADAPTER")
    finally:
        os.close(fd)
