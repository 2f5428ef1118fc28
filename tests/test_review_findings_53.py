"""Review 53: the newest commits (withhold.py's process-wide stdout/stderr swap, the held-out check by attended tokens,
ZOTrainer's table warm-up and its warning), as an adversary.

1. A right-padded copy of a training row *without* an attention_mask column (tokenized with padding, the mask column
   dropped) keys by its pad tokens too, so the held-out check passes it; the collator labels pads -100 and a causal
   model's logits at the real tokens do not see trailing pads: evaluate() returns the training row's exact loss.
2. `withheld` swaps sys.stdout/sys.stderr for the whole process: a non-private thread's output during a private step
   (rich's progress-bar refresh thread, a server thread, a notebook's other thread) is lost.
3. The first Ctrl-C during a private `slimtune train` step prints "stopping after this step" from the signal handler,
   which runs inside the step's block: the message is discarded (the user presses Ctrl-C again and loses the step).
4. Two private blocks overlapping in threads (the docstring says they may): warnings.catch_warnings is not thread-safe,
   so after both leave, every warning of the process stays ignored for good (and a non-LIFO stream swap in another
   thread leaves sys.stdout discarded for good).
5. ZOTrainer's warning "names every value taken from the table" (docs), but a hybrid's fo_lr and its warm-up, both
   taken from the table, are not named.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

from slimtune import SlimtuneError
from slimtune.privacy.withhold import silenced, withheld


# -- 1. held-out check: a padded copy without attention_mask --------------------------------------------------------
def test_private_eval_refuses_padded_copies_of_training_rows_without_an_attention_mask(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling

    from slimtune import SlimtuneError
    from slimtune.hf import ZOArguments, ZOTrainer
    from test_hf import ROWS, held_out_dataset, hf_args, lm_dataset, model_for, tokenizer

    tok = tokenizer()
    padded = datasets.Dataset.from_dict({"text": ROWS[:4]}).map(
        lambda b: {"input_ids": tok(b["text"], padding="max_length", max_length=64)["input_ids"]}, batched=True,
        remove_columns=["text"])
    assert padded.column_names == ["input_ids"]
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    model = model_for(tok, "lora").eval()
    with torch.no_grad():  # the copy scores exactly as the training row itself
        plain = model(**collator([dict(tok(ROWS[0]))])).loss
        copy = model(**collator([dict(padded[0])])).loss
    assert torch.allclose(plain, copy, atol=1e-6, rtol=0)
    trainer = ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=4,
                                                                   per_device_eval_batch_size=1),
                        train_dataset=lm_dataset(tok), eval_dataset=held_out_dataset(tok), data_collator=collator,
                        zo_args=ZOArguments(optimizer="dpzero", epsilon=6))
    with pytest.raises(SlimtuneError, match="shares rows"):
        trainer.evaluate(eval_dataset=padded)


# -- 2. another thread's output during a private step ---------------------------------------------------------------
def test_a_non_private_threads_print_during_a_private_step_is_not_lost(capsys):
    inside, done = threading.Event(), threading.Event()

    def other():  # e.g. rich's refresh thread, or a server thread: nothing to do with the private batch
        inside.wait(5)
        print("round 3 finished")
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with withheld("a private training step failed at step 1"):
        inside.set()
        done.wait(5)
    t.join()
    assert "round 3 finished" in capsys.readouterr().out


# -- 3. Ctrl-C's acknowledgement during a private step ---------------------------------------------------------------
def test_the_first_ctrl_c_during_a_private_step_is_acknowledged(monkeypatch, capsys):
    from slimtune.train import trainer as T

    def step(run, i):
        os.kill(os.getpid(), signal.SIGINT)  # the user's first Ctrl-C arrives while the step runs
        time.sleep(0.2)
        return {"step": i + 1}

    monkeypatch.setattr(T, "_step", step)
    run = SimpleNamespace(key=object(), config=SimpleNamespace(log_private_stats=False))
    with T._stop_on_interrupt() as interrupted:
        T._train_step(run, 0)
        assert interrupted()
    assert "stopping after this step" in capsys.readouterr().err


# -- 4. overlapping blocks in threads ------------------------------------------------------------------------------
def _overlap(first_leaves_first: bool, body_a=None, body_b=None):
    """Thread A enters, thread B enters, then A leaves before B (non-nested overlap)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with silenced():
            a_in.set()
            b_in.wait(5)
            if body_a:
                body_a()
        a_out.set()

    def b():
        a_in.wait(5)
        with silenced():
            b_in.set()
            a_out.wait(5)
            if body_b:
                body_b()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_overlapping_private_blocks_in_threads_leave_warnings_as_they_were():
    before = list(warnings.filters)
    try:
        _overlap(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # what the user had: the record=True list must see the next warning
            warnings.warn("a warning long after the private steps", UserWarning)
        assert caught, "lost"
        assert warnings.filters == before, "warnings.filters changed for good by two overlapping private blocks"
    finally:
        warnings.filters[:] = before


def test_overlapping_private_blocks_in_threads_do_not_let_a_private_warning_through():
    seen = []
    old = warnings.showwarning
    warnings.showwarning = lambda message, *a, **k: seen.append(str(message))
    before = list(warnings.filters)
    try:
        _overlap(True, body_b=lambda: warnings.warn("row 17 of the batch is 36 tokens", UserWarning))
    finally:
        warnings.showwarning = old
        warnings.filters[:] = before
    assert not any("row 17" in s for s in seen), seen


def test_a_redirect_in_another_thread_does_not_leave_stdout_discarded_for_good(capsys):
    entered, redirected, left = threading.Event(), threading.Event(), threading.Event()

    def other():  # a non-private thread capturing its own output (contextlib.redirect_stdout, a notebook cell)
        entered.wait(5)
        with contextlib.redirect_stdout(io.StringIO()):
            redirected.set()
            left.wait(5)

    t = threading.Thread(target=other)
    t.start()
    real = sys.stdout
    try:
        with withheld("a private training step failed at step 1"):
            entered.set()
            redirected.wait(5)
        left.set()
        t.join()
        print("error: --data x.tsv line 3: ...")  # the CLI's own one-line error, after every block has left
        assert "line 3" in capsys.readouterr().out, f"sys.stdout is {sys.stdout!r} for good"
    finally:
        sys.stdout = real


# -- 5. ZOTrainer's warning names every value taken from the table ----------------------------------------------------
def test_zotrainer_hybrid_warning_names_fo_lr_and_warm_up_taken_from_the_table(tmp_path):
    pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling

    from slimtune.hf import ZOArguments, ZOTrainer
    from test_hf import hf_args, lm_dataset, model_for, tokenizer

    tok = tokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=400),
                            train_dataset=lm_dataset(tok),
                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                            zo_args=ZOArguments(optimizer="hybrid"))
        trainer.create_optimizer_and_scheduler(num_training_steps=400)
    said = " ".join(str(w.message) for w in caught if "defaults table" in str(w.message))
    assert trainer.zo_optimizer().settings["fo_lr"] == 3e-3  # the table's
    assert trainer.lr_scheduler.get_last_lr()[0] < trainer.zo_optimizer().param_groups[0]["initial_lr"]  # warm-up
    assert "fo_lr" in said and "warm" in said, f"the table's fo_lr and warm-up are not named: {said!r}"


def test_zoarguments_warmup_steps_zero_turns_the_tables_warm_up_off(tmp_path):
    """transformers cannot tell warmup_steps=0 from unset: ZOArguments.warmup_steps=0 says 'no warm-up' (and a bad
    value is one line)."""
    pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling

    from slimtune.hf import ZOArguments, ZOTrainer
    from test_hf import hf_args, lm_dataset, model_for, tokenizer

    tok = tokenizer()
    trainer = ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=400),
                        train_dataset=lm_dataset(tok), data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                        zo_args=ZOArguments(optimizer="hybrid", warmup_steps=0))
    trainer.create_optimizer_and_scheduler(num_training_steps=400)
    assert trainer.lr_scheduler.get_last_lr()[0] == trainer.zo_optimizer().param_groups[0]["initial_lr"]
    with pytest.raises(SlimtuneError, match="warmup_steps"):
        ZOArguments(optimizer="hybrid", warmup_steps=-1)


def test_zoarguments_warmup_steps_and_the_trainers_both_set_differently_is_one_line(tmp_path):
    """As the learning rate: two different values for one setting are an error, never one silently dropped."""
    pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling

    from slimtune.hf import ZOArguments, ZOTrainer
    from test_hf import hf_args, lm_dataset, model_for, tokenizer

    tok = tokenizer()
    with pytest.raises(SlimtuneError, match="warmup_steps"):  # (lead) refused when the trainer is built (review 89)
        trainer = ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=400, warmup_steps=10),
                            train_dataset=lm_dataset(tok),
                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                            zo_args=ZOArguments(optimizer="hybrid", warmup_steps=0))
        trainer.create_optimizer_and_scheduler(num_training_steps=400)
