"""Render runs (summary.json + metrics.jsonl each) into report.html, report.md and PNG plots."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from slimtune import SlimtuneError
from slimtune.train.metrics import numbered_records

# (header, summary key, formatter)
COLUMNS = [
    ("run", "name", str),
    ("method", "method", str),
    ("PEFT", "peft", str),
    ("trainable params", "trainable_params", lambda v: f"{v:,}"),
    ("peak memory (MB)", "peak_mem_mb", lambda v: f"{v:,.0f}"),
    ("time/step (s)", "time_per_step_s", lambda v: f"{v:.3f}"),
    ("steps", "steps", str),
    ("dev accuracy", "final_accuracy", lambda v: f"{v:.3f}"),
    ("best dev acc", "best_accuracy", lambda v: f"{v:.3f}"),
    ("eval loss (best)", "best_eval_loss", lambda v: f"{v:.3f}"),
    ("BLEU (best)", "best_bleu", lambda v: f"{v:.1f}"),
    ("ROUGE-L (best)", "best_rougeL", lambda v: f"{v:.1f}"),
    ("epsilon", "epsilon", lambda v: f"{v:.2f}"),
    ("delta", "delta", lambda v: f"{v:.0e}"),
    ("bytes communicated", "bytes_communicated", lambda v: _bytes(v)),
]


@dataclass
class RunData:
    name: str
    summary: dict
    metrics: list[dict]


def load_runs(directories: list[str]) -> list[RunData]:
    runs = []
    for d in directories:
        path = Path(d) / "summary.json"
        if not path.exists():
            raise SlimtuneError(f"{d}: no summary.json (not a finished slimtune run)")
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SlimtuneError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except UnicodeDecodeError:
            raise SlimtuneError(f"{path}: not UTF-8 text (damaged?)") from None
        if not isinstance(summary, dict):
            raise SlimtuneError(f"{path}: not a slimtune summary (expected a JSON object)")
        name = summary.get("name") or Path(d).name
        from slimtune.train.run_dir import read_status
        status = read_status(d)
        if status.get("damaged"):
            raise SlimtuneError(f"{Path(d) / 'status.json'}: damaged (not a JSON object): whether the run finished is "
                                "unknown")
        state = status.get("state")
        if state not in (None, "completed"):  # e.g. a resumed run that failed: its summary is the earlier one
            name = f"{name} ({state}; summary of an earlier completion)"
        _check_summary(path, summary)
        runs.append(RunData(name, {**summary, "name": name}, _checked_metrics(Path(d) / "metrics.jsonl")))
    return runs


SUMMARY_NUMBERS = ("trainable_params", "peak_mem_mb", "time_per_step_s", "steps", "final_accuracy", "best_accuracy",
                   "best_eval_loss", "best_bleu", "best_rougeL", "epsilon", "delta", "bytes_communicated")
PLOTTED = ("eval_accuracy", "eval_loss", "eval_bleu")  # the metrics rows the plots read, with their step


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_summary(path: Path, summary: dict) -> None:
    """The summary fields the table and plots read are numbers or null (a string there was an internal error after
    the report directory was half written)."""
    for key in SUMMARY_NUMBERS:
        if summary.get(key) is not None and not _number(summary[key]):
            raise SlimtuneError(f"{path}: field {key!r} is {summary[key]!r}, not a number")


def _checked_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records (train.metrics.read_jsonl's); a record with a plotted value must carry a numeric step
    and numeric values, named by file and line otherwise."""
    records = []
    for number, record in numbered_records(path):
        plotted = [k for k in PLOTTED if record.get(k) is not None]
        bad = next((k for k in ("step", *plotted) if not _number(record.get(k))), None) if plotted else None
        if bad is not None:
            raise SlimtuneError(f"{path}:{number}: field {bad!r} is {record.get(bad)!r}, not a number")
        records.append(record)
    return records


def table_rows(summaries: list[dict]) -> list[list[str]]:
    return [[_fmt(s.get(key), fmt) for _, key, fmt in COLUMNS] for s in summaries]


def _fmt(value, fmt) -> str:
    if value is None:
        return "-"
    try:
        return fmt(value)
    except (TypeError, ValueError):
        return str(value)


def _bytes(v) -> str:
    v = float(v)
    for unit in ("B", "KB", "MB", "GB"):
        if v < 1024 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024


TERMINAL_HEADERS = {"trainable params": "trainable", "peak memory (MB)": "peak MB", "time/step (s)": "s/step",
                    "dev accuracy": "acc", "best dev acc": "best acc", "epsilon": "ε", "delta": "δ",
                    "eval loss (best)": "loss", "BLEU (best)": "BLEU", "ROUGE-L (best)": "ROUGE-L",
                    "bytes communicated": "bytes"}


def print_summary(summaries: list[dict], console) -> None:
    """The runs as a terminal table: short headers, and no column that is empty for every run (fits 100 columns)."""
    from rich.table import Table
    from rich.markup import escape

    rows = table_rows([{"name": s.get("name", s.get("method")), **s} for s in summaries])
    keep = _kept_columns(rows)
    if not any(s.get("best_accuracy") is None for s in summaries):  # classification only: accuracy says it
        keep = [i for i in keep if COLUMNS[i][1] != "best_eval_loss"]
    table = Table(title="slimtune runs")
    for i in keep:
        header = COLUMNS[i][0]
        table.add_column(TERMINAL_HEADERS.get(header, header), justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*(escape(row[i]) for i in keep))  # names and fields as they are, not markup
    console.print(table)


def _kept_columns(rows: list[list[str]]) -> list[int]:
    """Column indices to show: the run's identity and every column some run has a value in."""
    empty = {"-", "0 B"}
    return [i for i, (header, _, _) in enumerate(COLUMNS)
            if header in ("run", "method", "PEFT") or any(row[i] not in empty for row in rows)]


def render_report(runs: list[RunData], out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs, out)
    rows = table_rows([r.summary for r in runs])
    md = _markdown(rows, plots)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_html(rows, plots))
    (out / "report.json").write_text(json.dumps([r.summary for r in runs], indent=2))
    return {"html": out / "report.html", "markdown": out / "report.md", "plots": plots}


def _plots(runs: list[RunData], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = plt.cm.tab20.colors if len(runs) > 10 else plt.cm.tab10.colors
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=colors)  # one distinct colour per run
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for r in runs:
        evals = [m for m in r.metrics if m.get("eval_accuracy") is not None]
        if evals:
            ax.plot([m["step"] for m in evals], [m["eval_accuracy"] for m in evals], marker="o", label=r.name)
    _finish(ax, "step", "dev accuracy", "Accuracy vs steps")
    paths.append(_save(fig, out / "accuracy_vs_steps.png"))

    for key, label in (("eval_loss", "eval loss"), ("eval_bleu", "BLEU")):  # generation runs: their metrics
        if all(m.get("eval_accuracy") is None for r in runs for m in r.metrics) and \
                any(m.get(key) is not None for r in runs for m in r.metrics):
            fig, ax = plt.subplots(figsize=(7.5, 4))
            for r in runs:
                evals = [m for m in r.metrics if m.get(key) is not None]
                ax.plot([m["step"] for m in evals], [m[key] for m in evals], marker="o", label=r.name)
            _finish(ax, "step", label, f"{label} vs steps")
            paths.append(_save(fig, out / f"{key[5:]}_vs_steps.png"))

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for r in runs:
        x, y = r.summary.get("peak_mem_mb"), r.summary.get("final_accuracy")
        if x is not None and y is not None:
            ax.scatter([x], [y], s=60, label=r.name)
    _finish(ax, "peak memory (MB)", "dev accuracy", "Accuracy vs peak memory")
    paths.append(_save(fig, out / "accuracy_vs_memory.png"))

    if any(r.summary.get("epsilon") is not None for r in runs):  # only meaningful with at least one private run
        fig, ax = plt.subplots(figsize=(7.5, 4))
        edge = _right_edge(runs)
        for r in runs:
            x, y = r.summary.get("epsilon"), r.summary.get("final_accuracy")
            if y is not None:
                ax.scatter([edge if x is None else x], [y], s=60, label=r.name, marker="o" if x is not None else "s")
        ticks = [t for t in ax.get_xticks() if 0 <= t < edge * 0.9]
        ax.set_xticks(ticks + [edge], [f"{t:g}" for t in ticks] + ["non-private"])
        _finish(ax, "epsilon (privacy spent)", "dev accuracy", "Accuracy vs epsilon")
        paths.append(_save(fig, out / "accuracy_vs_epsilon.png"))
    return paths


def _right_edge(runs) -> float:
    eps = [r.summary["epsilon"] for r in runs if r.summary.get("epsilon") is not None]
    return (max(eps) * 1.5) if eps else 10.0


def _finish(ax, xlabel, ylabel, title) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def _markdown(rows, plots) -> str:
    keep = _kept_columns(rows)
    headers = [COLUMNS[i][0] for i in keep]
    lines = ["# slimtune report", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row[i] for i in keep) + " |" for row in rows]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _html(rows, plots) -> str:
    keep = _kept_columns(rows)
    headers = "".join(f"<th>{html.escape(COLUMNS[i][0])}</th>" for i in keep)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(row[i])}</td>" for i in keep) + "</tr>" for row in rows)
    images = "".join(f'<figure><img src="{p.name}" alt="{p.stem}"><figcaption>{p.stem.replace("_", " ")}'
                     "</figcaption></figure>" for p in plots)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>slimtune report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 6px 10px; text-align: right; }}
th {{ background: #f0f3f7; }}
td:nth-child(-n+3) {{ text-align: left; }}
tr:nth-child(even) {{ background: #fafafa; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} img {{ max-width: 600px; border: 1px solid #eee; }}
</style></head><body>
<h1>slimtune report</h1>
<table><thead><tr>{headers}</tr></thead><tbody>{body}</tbody></table>
<div class="plots">{images}</div>
</body></html>
"""
