"""`slimtune plan`: which optimizer x PEFT pairs fit this machine."""

from __future__ import annotations

from slimtune import SlimtuneError
from slimtune.settings.cli import command
from slimtune.settings.commands import PlanSettings
from slimtune.settings.train import resolve_device


def register(app) -> None:
    command(app, PlanSettings, run_plan, with_config=False)


def run_plan(s: PlanSettings):
    """Predicted peak memory of every optimizer x PEFT pair against the memory available here (what fits)."""
    from rich.table import Table

    from slimtune.cli import console, fail
    from slimtune.models import load_model_and_tokenizer
    from slimtune.report.memory_model import plan_rows

    try:
        dev = resolve_device(s.device)
        m, _ = load_model_and_tokenizer(s.model, texts=["plan"])
        rows = plan_rows(m, s.batch_size, s.max_length, dev, s.r)
    except SlimtuneError as exc:
        fail(exc)
    table = Table(title=f"{s.model}: batch {s.batch_size} x {s.max_length} tokens on {dev} "
                        f"(budget {rows[0]['budget_mb']:,.0f} MB = 90% of available)")
    for col in ("optimizer", "PEFT", "trainable", "peak MB", "fits"):
        table.add_column(col, justify="right" if col in ("trainable", "peak MB") else "left")
    for row in rows:
        table.add_row(row["optimizer"], row["peft"], f"{row['trainable_params']:,}", f"{row['peak_mb']:,.0f}",
                      "yes" if row["fits"] else "[red]no[/]")
    console.print(table)
