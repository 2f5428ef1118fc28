"""Trade-off reports: a table and plots comparing runs (accuracy, memory, time, privacy, communication)."""

from slimtune.report.render import COLUMNS, RunData, load_runs, print_summary, render_report, table_rows

__all__ = ["COLUMNS", "RunData", "load_runs", "print_summary", "render_report", "table_rows"]
