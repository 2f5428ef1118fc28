"""`slimtune report`: an HTML + Markdown report comparing runs."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer
from rich.markup import escape

from slimtune import SlimtuneError
from slimtune.settings.cli import command
from slimtune.settings.commands import ReportSettings

RUNS = inspect.Parameter("runs", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                         default=typer.Argument(..., help="run directories (each with summary.json)"))


def register(app) -> None:
    command(app, ReportSettings, run_report, arguments=[RUNS], with_config=False)


def run_report(s: ReportSettings):
    """Render an HTML + Markdown report comparing runs (table and plots)."""
    from slimtune.cli import fail
    try:
        make_report(list(s.runs), s.out)
    except SlimtuneError as exc:
        fail(exc)


def make_report(runs: list[str], out: str) -> None:
    from slimtune.cli import console
    from slimtune.report import load_runs, print_summary, render_report

    from slimtune.train.run_dir import write_new_directory

    loaded = load_runs(runs)
    written: dict = {}
    write_new_directory(out, lambda tmp: written.update(render_report(loaded, tmp)), "--out")  # whole or nothing
    paths = {key: Path(out) / Path(value).name for key, value in written.items() if key != "plots"}
    print_summary([r.summary for r in loaded], console)
    console.print(f"report: [bold]{escape(str(paths['html']))}[/] and {escape(str(paths['markdown']))}")
