"""`slimtune plan`: which optimizer x PEFT pairs fit this machine, and the best method that does."""

from __future__ import annotations

from rich.markup import escape

from slimtune import SlimtuneError
from slimtune.settings.cli import command
from slimtune.settings.commands import PlanSettings
from slimtune.settings.train import resolve_device


def register(app) -> None:
    command(app, PlanSettings, run_plan, with_config=False)


def run_plan(s: PlanSettings):
    """Predicted peak memory of every optimizer x PEFT pair (at --dtype, on a --base-quant base) against the memory
    available here, then the methods that fit ranked by expected quality (report/memory_model.py, QUALITY_ORDER);
    --private: the private optimizers only."""
    from rich.table import Table

    from slimtune.cli import console, fail
    from slimtune.models.loading import check_positions
    from slimtune.optim.hybrid import check_fo_layers
    from slimtune.optim.methods import METHODS
    from slimtune.report.memory_model import ModelShape, as_flags, model_for_planning, plan_rows, ranked_methods

    try:
        dev = resolve_device(s.device)
        m = model_for_planning(s.model)
        check_positions(m, s.max_length)
        check_fo_layers(s.fo_layers, ModelShape.from_model(m).layers)
        rows = [r for r in plan_rows(m, s.batch_size, s.max_length, dev, s.r, s.dtype, s.base_quant, s.fo_layers)
                if not s.private or METHODS[r["optimizer"]].private]
        ranked = [r for r in ranked_methods(m, s.batch_size, s.max_length, dev, s.r, s.dtype, s.fo_layers,
                                            private=s.private) if r["fits"]]
    except SlimtuneError as exc:
        fail(exc)
    base = f", {s.base_quant} base" if s.base_quant else ""
    table = Table(title=f"{escape(s.model)}: batch {s.batch_size} x {s.max_length} tokens on {dev}, {s.dtype}{base} "
                        f"(budget {rows[0]['budget_mb']:,.0f} MB = 90% of available)")
    for col in ("optimizer", "PEFT", "trainable", "peak MB", "fits"):
        table.add_column(col, justify="right" if col in ("trainable", "peak MB") else "left")
    for row in rows:
        table.add_row(row["optimizer"], row["peft"], f"{row['trainable_params']:,}", f"{row['peak_mb']:,.0f}",
                      "yes" if row["fits"] else "[red]no[/]" + (f" (train refuses this {row['refused_by']})"
                                                                   if row.get("refused") else ""))
    console.print(table)
    if not ranked:
        console.print("[red]nothing fits[/]: lower --batch-size or --max-length")
        return
    console.print("what fits" + (" a private run" if s.private else "") +
                  ", best expected quality first (slimtune train flags, predicted peak):")
    for i, row in enumerate(ranked, 1):  # one unwrapped line each: flags to copy
        console.print(f"{i:>3}. {as_flags(row, s.batch_size, s.max_length, s.r)}  ({row['peak_mb']:,.0f} MB)",
                      soft_wrap=True, highlight=False, markup=False)
