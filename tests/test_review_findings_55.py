"""Review 55 of d034150 (withhold.py's per-thread stream filters) and d7c25d3 (report/render.py rewritten), as an
adversary and a careless user. Each test fails on the code it was written against (see the lead's report for the
proposed fixes)."""

from __future__ import annotations

import copy
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rich.console import Console

from slimtune.privacy.withhold import silenced, withheld
from slimtune.report import load_runs, print_summary, render_report
from slimtune.report import render
from test_review_findings_54 import cli, fake_run


# --- withhold.py: the per-thread filters ----------------------------------------------------------------------------

def test_a_thread_that_a_private_step_starts_prints_nothing(capsys):
    """d034150 drops only the printing thread's writes while it is inside a private block; a thread the step itself
    starts (a thread pool in a collator or a model's forward, a tokenizer's workers; on CUDA, torch's autograd runs
    every backward hook and custom Function.backward on its own device thread) has depth 0, so what it prints about
    the batch (a shape, a row) reaches stdout. Before d034150 sys.stdout itself was replaced and this was dropped."""
    with withheld("a private training step failed"):
        with ThreadPoolExecutor(1) as pool:
            pool.submit(print, "batch of 3 rows; row 2 = 'my secret diagnosis'").result()
    out = capsys.readouterr()
    assert "secret" not in out.out + out.err, out


def test_click_echo_still_works_after_a_private_block_that_echoed(capsys):
    """Inside a block the filter accepts bytes (write(b'') returns 0), outside it raises TypeError as a text stream
    does. click (and typer.echo) probes `stream.write(b'')` once per sys.stdout object and caches the answer: when
    its first echo happens inside a private step it takes the filter for a binary stream, wraps it, and every later
    click.echo / typer.echo in the process dies with 'TypeError: write() argument must be str, not bytes'."""
    import click
    with silenced():
        click.echo("inside")
    click.echo("after the block")  # TypeError on d034150
    assert "after the block" in capsys.readouterr().out


def test_copying_sys_stdout_does_not_recurse_forever():
    """_PrivateAware.__getattr__ reads self.wrapped, which on an instance made by copy/pickle (no __init__) is looked
    up through __getattr__ again: copy.copy(sys.stdout), copy.deepcopy of any object holding it, or unpickling the
    filter end in RecursionError (a plain stream raises TypeError 'cannot pickle', which callers handle)."""
    with silenced():
        pass
    try:
        copy.copy(sys.stdout)
    except RecursionError:
        pytest.fail("copy.copy(sys.stdout) recursed without end through _PrivateAware.__getattr__")
    except Exception:  # noqa: BLE001 - a stream that cannot be copied may say so
        pass


# --- render.py --------------------------------------------------------------------------------------------------------

def _md_table(out: Path) -> list[str]:
    return [line for line in (out / "report.md").read_text().splitlines() if line.startswith("|")]


def test_a_run_name_with_a_pipe_keeps_its_markdown_row(tmp_path):
    """The run's name is its directory's (or summary.json's) and goes into report.md unescaped: a '|' in it (a
    directory 'lr|r8', legal on every Unix) adds a cell, so every number of the row sits under the wrong header."""
    run = fake_run(tmp_path, "lr1e-4|r8")
    res = cli("report", run, "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    header, _, row = _md_table(tmp_path / "rep")
    cells = lambda line: [c for c in line.replace("\\|", "").split("|")]  # noqa: E731 - an escaped pipe is one cell
    assert len(cells(row)) == len(cells(header)), (header, row)


def test_a_run_name_with_dollar_signs_is_not_read_as_mathtext(tmp_path):
    """The plots' legends take the run name as matplotlib text, where '$...$' is TeX: a name like 'eps$^$2' stops
    the whole report with 'internal error ... please report it' (exit 1, a pyparsing message), and 'cost$5$_x' is
    drawn as italic maths. A name is text: escape '$' (labels in _labels / _epsilon_plot)."""
    run = fake_run(tmp_path, "eps$^$2")
    res = cli("report", run, "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.output


def _captured_figures(monkeypatch) -> dict:
    figures = {}

    def save(fig, path):
        figures[path.name] = fig
        return path
    monkeypatch.setattr(render, "_save", save)
    return figures


def test_every_run_of_a_large_report_has_its_own_colour(tmp_path, monkeypatch):
    """d7c25d3 gives 'one distinct colour per run' by switching to tab20 above 10 runs; above 20 the colours cycle
    and every curve has the same marker, so run 21's accuracy curve is drawn exactly as run 1's (a sweep of 24 or 48
    runs is an ordinary use of `slimtune report runs/*`)."""
    figures = _captured_figures(monkeypatch)
    runs = [fake_run(tmp_path, f"sweep-{i:02d}", final_accuracy=0.5 + i / 100) for i in range(24)]
    render_report(load_runs(runs), tmp_path / "rep")
    ax = figures["accuracy_vs_steps.png"].axes[0]
    styles = {(str(line.get_color()), line.get_marker(), line.get_linestyle()) for line in ax.get_lines()}
    assert len(styles) == 24, f"{len(styles)} distinct curve styles for 24 runs"


def test_a_private_run_at_epsilon_zero_is_not_drawn_as_non_private(tmp_path, monkeypatch):
    """_right_edge is max(epsilon) * 1.5: with every private run at epsilon 0 (a private run stopped before its
    first step, evaluated zero-shot) the 'non-private' tick is at 0, on top of the private run, and the only x label
    of the plot calls that private run 'non-private'."""
    figures = _captured_figures(monkeypatch)
    private = fake_run(tmp_path, "private-stopped", epsilon=0.0, steps=0)
    public = fake_run(tmp_path, "public", epsilon=None, delta=None, private_stats_logged=None)
    render_report(load_runs([private, public]), tmp_path / "rep")
    ax = figures["accuracy_vs_epsilon.png"].axes[0]
    at_zero = [t.get_text() for t in ax.get_xticklabels() if t.get_position()[0] == 0]
    assert "non-private" not in at_zero, at_zero


def test_the_terminal_table_keeps_each_runs_name_at_100_columns(tmp_path):
    """d7c25d3: 'numbers never cut (fits 100 columns)'. A generation task's comparison (loss, BLEU, ROUGE-L), one
    private run (epsilon, delta), one federated (bytes) and a full fine-tune's 134,515,008 trainable parameters
    leave no room: rich shrinks the run column to nothing, so no row says which run it is (with 1,843,200 params
    the names fold to two letters a line: 'me/zo/-l/or/a')."""
    common = dict(model="smollm2-135m", task="e2e", final_accuracy=None, best_accuracy=None, steps=2000)
    runs = [fake_run(tmp_path, "mezo-full", method="mezo", peft="full", trainable_params=134_515_008,
                     peak_mem_mb=12534.2, time_per_step_s=0.512, best_eval_loss=1.234, best_bleu=23.4,
                     best_rougeL=45.6, epsilon=None, delta=None, private_stats_logged=None, **common),
            fake_run(tmp_path, "dpzero-full-eps6", peft="full", trainable_params=134_515_008, peak_mem_mb=12530.0,
                     time_per_step_s=0.6, best_eval_loss=1.301, best_bleu=21.0, best_rougeL=44.0,
                     private_stats_logged=True, **common),
            fake_run(tmp_path, "fed-lora", method="fedlpp-lora", trainable_params=1_843_200, best_eval_loss=1.5,
                     best_bleu=20.0, best_rougeL=40.0, epsilon=3.0, bytes_communicated=1_234_567_890, **common)]
    console = Console(width=100, record=True, force_terminal=False)
    print_summary([r.summary for r in load_runs(runs)], console)
    text = console.export_text()
    for name in ("mezo-full", "dpzero-full-eps6", "fed-lora"):
        assert name in text, text


def test_a_federated_run_is_tabled_with_the_training_runs_of_its_model(tmp_path, monkeypatch):
    """The terminal report has one table per task and model, but a federated run's summary.json has no 'model'
    (server_app._write_summary writes the task only): `slimtune report train-run fed-run` on the same task and model
    splits them into 'task sst2, model tiny-llama' and 'task sst2', and `slimtune federate`'s own table does not say
    which model it trained."""
    from slimtune.federated.server_app import run_server
    from test_bad_input_table import DEV, TRAIN
    from test_federated import InProcessGrid, make_cfg
    from flwr.supercore.task_identity import TaskIdentity
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):  # as test_federated's fixture
        monkeypatch.setattr(TaskIdentity, attr, value)
    fed = tmp_path / "fed"
    run_server(InProcessGrid(2), make_cfg((TRAIN, DEV), out_dir=str(fed), num_clients=2, rounds=1, local_steps=1,
                                          model="tiny-llama", eval_max=8))
    trained = fake_run(tmp_path, "train", method="mezo", model="tiny-llama", task="sst2")
    console = Console(width=200, record=True)
    print_summary([r.summary for r in load_runs([trained, str(fed)])], console)
    titles = [line.strip() for line in console.export_text().splitlines() if "slimtune runs" in line]
    assert titles == ["slimtune runs: task sst2, model tiny-llama"], titles


def test_a_federated_run_with_a_local_privacy_bound_is_not_reported_as_non_private(tmp_path, monkeypatch):
    """A federated run whose clients train with local DP and --local-dp-min-examples has summary.json
    'local_epsilon' (every client's bound, server_app._write_summary) and 'epsilon' null (no client-level DP). The
    report reads 'epsilon' only: its table shows '-' and the accuracy-vs-epsilon plot puts the run at the
    'non-private' tick, as if its clients' data had no protection."""
    figures = _captured_figures(monkeypatch)
    fed = fake_run(tmp_path, "fed-local-dp", method="fedlpp-lora", epsilon=None, delta=None,
                   private_stats_logged=None, local_epsilon=4.2, local_delta=1e-5, bytes_communicated=10_000)
    private = fake_run(tmp_path, "central-dp", epsilon=2.0)
    render_report(load_runs([fed, private]), tmp_path / "rep")
    ax = figures["accuracy_vs_epsilon.png"].axes[0]
    edge = [t.get_position()[0] for t in ax.get_xticklabels() if t.get_text() == "non-private"]
    xs = [tuple(c.get_offsets()[0])[0] for c in ax.collections]
    assert not edge or xs.count(edge[0]) == 0, (edge, xs)
    row = [line for line in (tmp_path / "rep" / "report.md").read_text().splitlines() if "fed-local-dp" in line]
    assert "4.2" in row[0], row
