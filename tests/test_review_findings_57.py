"""Review 57 of f5984c6, 2078849 and 74b8827 (withhold's thread marking, dtype_refusal in train and plan, the report's
local epsilon, ZOArguments.warmup_steps), as an adversary. Each test fails on the code it was written against (see
the lead's report for the proposed fixes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimtune import SlimtuneError
from slimtune.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


# --- withhold.py: Thread.start replaced, threads running before pass ------------------------------------------------

def test_a_thread_pool_made_before_a_private_block_does_not_print_the_blocks_work():
    """A pool whose worker was started before the block (a collator's or tokenizer's module-level executor, asyncio's
    default executor behind to_thread / run_in_executor) runs work submitted from inside the block on a thread that
    'was running before': its print of a private row reaches the user. Only threads *started* inside are marked."""
    r = _python("""
        from concurrent.futures import ThreadPoolExecutor
        from slimtune.privacy.withhold import silenced
        pool = ThreadPoolExecutor(1)
        pool.submit(lambda: None).result()  # the worker exists before the block
        with silenced():
            pool.submit(print, "PRIVATE-ROW-42", flush=True).result()
    """)
    assert r.returncode == 0, r.stderr[-800:]
    assert "PRIVATE-ROW-42" not in r.stdout + r.stderr


def test_another_tools_thread_start_wrapper_does_not_make_thread_start_recurse():
    """_install_stream_filters re-patches whenever Thread.start `is not _start`: a tool that wraps Thread.start after
    slimtune's first block (sentry_sdk's ThreadingIntegration, opentelemetry's threading instrumentor: both call the
    start they found, i.e. `_start`) makes the next block store that wrapper as the original, so every later
    Thread.start is _start -> wrapper -> _start -> ... RecursionError, in the whole process (a DataLoader's
    pin-memory thread, grpc's, Flower's)."""
    r = _python("""
        import threading
        from slimtune.privacy.withhold import silenced
        with silenced():
            pass
        found = threading.Thread.start
        def instrumented_start(self, *a, **k):
            return found(self, *a, **k)
        threading.Thread.start = instrumented_start
        with silenced():
            pass
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        print("STARTED")
    """)
    assert r.returncode == 0 and "STARTED" in r.stdout, r.stderr[-600:]


def test_a_thread_running_before_the_block_that_python_did_not_start_keeps_its_output():
    """A thread started by _thread.start_new_thread (or by a C extension calling back into Python: grpc's completion
    queue threads under Flower) is a threading._DummyThread, and every write of it was dropped while some other
    thread was inside a private block: the user's own output lost although it never saw a private row. Such threads
    cannot be told from autograd's device threads (which run backward hooks inside a step), so one that has written
    while no block was active passes (withhold._dropped); one that never did stays dropped during private steps."""
    r = _python("""
        import _thread, threading, time
        from slimtune.privacy.withhold import silenced
        go, done = threading.Event(), threading.Event()
        def users_thread():
            print("users thread started", flush=True)  # written while no block is active
            go.wait(5)
            print("USERS-OWN-OUTPUT", flush=True)
            done.set()
        _thread.start_new_thread(users_thread, ())  # running before any private block
        time.sleep(0.2)
        def private_step():
            with silenced():
                go.set()
                done.wait(5)
        t = threading.Thread(target=private_step)
        t.start()
        t.join()
    """)
    assert r.returncode == 0, r.stderr[-600:]
    assert "USERS-OWN-OUTPUT" in r.stdout


# --- plan: dtype_refusal shown as a --r refusal ---------------------------------------------------------------------

def test_plan_names_the_dtype_refusal_not_the_rank():
    """2078849 makes plan_rows mark backprop on 16-bit trainable weights as refused, but commands/plan.py prints every
    refused row as 'no (train refuses this --r)': `slimtune plan --dtype bf16` tells the user to change --r for
    adamw + none (which has no rank), while train's refusal names --dtype / --peft."""
    r = runner.invoke(app, ["plan", "--model", "tiny-llama", "--dtype", "bf16", "--batch-size", "4",
                            "--max-length", "32"], terminal_width=200)
    assert r.exit_code == 0, r.output[-600:]
    rows = [line for line in r.output.splitlines() if " adamw " in line and " none " in line]
    assert rows, r.output
    assert "--r" not in rows[0], rows[0]


# --- report: a finite but huge epsilon ------------------------------------------------------------------------------

def test_a_huge_finite_epsilon_is_reported_or_refused_in_one_line(tmp_path):
    """_check_summary refuses inf but passes 1.7e308; _right_edge multiplies it by 1.5 (inf) and matplotlib stops
    the report with 'internal error (ValueError: arange: cannot compute length); please report it' (exit 1)."""
    from test_review_findings_54 import cli, fake_run

    big = fake_run(tmp_path, "huge", epsilon=1.7e308)
    public = fake_run(tmp_path, "public", epsilon=None, delta=None, private_stats_logged=None)
    res = cli("report", big, public, "--out", tmp_path / "rep")
    assert "internal error" not in res.output and res.exit_code in (0, 2), res.output[-400:]


# --- hf.py: ZOArguments.warmup_steps under a scheduler without warm-up ----------------------------------------------

def test_zoarguments_warmup_steps_is_not_silently_dropped_by_a_constant_schedule(tmp_path):
    """transformers' get_scheduler('constant') ignores num_warmup_steps: ZOArguments(warmup_steps=50) with
    TrainingArguments(lr_scheduler_type='constant') trains at the full rate from step 1, no error, no warning (the
    same for 'reduce_lr_on_plateau'; and the table's warm-up warning then says 'warms up over N steps' which it
    does not). A given setting is never silently ignored: refuse the pair, or use constant_with_warmup."""
    pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling

    from slimtune.hf import ZOArguments, ZOTrainer
    from test_hf import hf_args, lm_dataset, model_for, tokenizer

    tok = tokenizer()
    try:  # (lead) refused when the trainer is built (review 89), or at the scheduler
        trainer = ZOTrainer(model=model_for(tok, "lora"), args=hf_args(tmp_path, max_steps=400,
                                                                      lr_scheduler_type="constant"),
                            train_dataset=lm_dataset(tok),
                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                            zo_args=ZOArguments(optimizer="mezo", warmup_steps=50))
        trainer.create_optimizer_and_scheduler(num_training_steps=400)
    except SlimtuneError:
        return  # refused in one line: fine
    group = trainer.zo_optimizer().param_groups[0]
    assert trainer.lr_scheduler.get_last_lr()[0] < group["initial_lr"], "ZOArguments.warmup_steps=50 was dropped"
