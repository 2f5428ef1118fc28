"""Render runs (summary.json + metrics.jsonl each) into report.html, report.md and PNG plots."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from slimtune import SlimtuneError
from slimtune.train.metrics import numbered_records
from slimtune.train.run_dir import read_record

# (header, summary key, formatter)
COLUMNS = [
    ("run", "name", str),
    ("method", "method", str),
    ("PEFT", "peft", str),
    ("task", "task", str),
    ("model", "model", str),
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
    ("local epsilon", "local_epsilon", lambda v: f"{v:.2f}"),  # federated: every client's bound (local DP)
    ("bytes communicated", "bytes_communicated", lambda v: _bytes(v)),
]
IDENTITY = ("run", "method", "PEFT")  # shown for every run, even empty
TEXT = ("run", "method", "PEFT", "task", "model")  # left-aligned; task and model shown when some run has them
FOOTNOTE = "*: --log-private-stats: its logs are outside the (epsilon, delta) guarantee"
# measured on a private run's batches: released only with --log-private-stats (trainer.write_summary withholds them)
WITHHELD = ("peak_mem_mb", "time_per_step_s")
REQUIRED = ("method", "steps")  # every slimtune run's summary.json has them (train's and federate's)


@dataclass
class RunData:
    name: str
    summary: dict
    metrics: list[dict]


def load_runs(directories: list[str]) -> list[RunData]:
    """Returns each run directory's RunData; a name several runs share becomes each one's shortest distinct path
    suffix. Bad input (no summary.json, a foreign or damaged file, one run given twice) raises SlimtuneError."""
    _refuse_repeats(directories)
    loaded = [_load_summary(d) for d in directories]
    names = _distinct_names(directories, [name for _, name, _ in loaded])
    runs = []
    for d, (summary, _, state), name in zip(directories, loaded, names):
        if state not in (None, "completed"):  # e.g. a resumed run that failed: its summary is the earlier one
            name = f"{name} ({state}; summary of an earlier completion)"
        metrics = _checked_metrics(Path(d) / "metrics.jsonl")
        through = summary.get("steps") if isinstance(summary.get("steps"), int) else None
        extra = {"name": name, "last_eval_step": _last_eval_step(metrics, through), "prompt": _prompt(d)}
        runs.append(RunData(name, released({**summary, **extra}), metrics))
    return runs


def _last_eval_step(metrics: list[dict], through: int | None = None):
    """The step of the run's last evaluation at or before step `through` (summary.json's steps: a later, failed
    attempt's evaluations are not its final_accuracy's; trainer.write_summary), or None when metrics.jsonl has none."""
    evals = [m for m in metrics if (m.get("eval_loss") is not None or m.get("eval_accuracy") is not None)
             and (through is None or not isinstance(m.get("step"), int) or m["step"] <= through)]
    return evals[-1].get("step") if evals else None


def _prompt(d: str) -> list | None:
    """[template, label words] the run trained with, read as `--resume` reads it (train/resume.read_stored: runs that
    recorded null used the prompt of their time); None where config.json is missing, unreadable or has none."""
    from slimtune.train.resume import read_stored
    try:
        stored = read_stored(Path(d))
    except SlimtuneError:  # the report does not need config.json; a damaged one leaves the prompt unknown
        return None
    if not stored or not isinstance(stored.get("template"), str) \
            or not isinstance(stored.get("label_words"), (str, type(None))):
        return None  # none, or not text (a damaged record): unknown
    return [stored["template"], stored.get("label_words")]


def withholds_stats(summary: dict) -> bool:
    """Whether the summary is a private training run's that did not log private stats (private_stats_logged not
    true): its peak memory and step time are measured on private batches, released only with --log-private-stats.
    Runs written before trainer.write_summary withheld them still hold them. (A federated run, which has "rounds",
    withholds its own.)"""
    return summary.get("epsilon") is not None and summary.get("private_stats_logged") is not True \
        and "rounds" not in summary


def released(summary: dict) -> dict:
    """The summary as it may be shown: WITHHELD values null for a run that withholds them (withholds_stats)."""
    return {**summary, **{k: None for k in WITHHELD}} if withholds_stats(summary) else summary


def _refuse_repeats(directories: list[str]) -> None:
    """Raises SlimtuneError when two arguments are the same directory (one run twice); returns None otherwise."""
    seen: dict[Path, str] = {}
    for d in directories:
        key = Path(d).resolve()
        if key in seen:
            raise SlimtuneError(f"{d}: the same run as {seen[key]}, given twice")
        seen[key] = d


def _load_summary(d: str) -> tuple[dict, str, str | None]:
    """Returns the run's checked summary, its name (summary's or the directory's) and its status.json state."""
    path = Path(d) / "summary.json"
    if not path.exists():
        raise SlimtuneError(f"{d}: no summary.json (not a finished slimtune run)")
    try:
        summary = json.loads(read_record(path))
    except json.JSONDecodeError as exc:
        raise SlimtuneError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise SlimtuneError(f"{path}: not UTF-8 text (damaged?)") from None
    if not isinstance(summary, dict):
        raise SlimtuneError(f"{path}: not a slimtune summary (expected a JSON object)")
    from slimtune.train.run_dir import read_status
    status = read_status(d)
    if status.get("damaged"):
        raise SlimtuneError(f"{Path(d) / 'status.json'}: damaged (not a JSON object): whether the run finished is "
                            "unknown")
    _check_summary(path, summary)
    return summary, str(summary.get("name") or Path(d).resolve().name), status.get("state")


def _distinct_names(directories: list[str], names: list[str]) -> list[str]:
    """Returns the names, each one that several runs share replaced by that run's shortest distinct path suffix."""
    parts = [Path(d).resolve().parts for d in directories]
    distinct = []
    for i, name in enumerate(names):
        rivals = [parts[j] for j, other in enumerate(names) if other == name and j != i]
        distinct.append(_shortest_suffix(parts[i], rivals) if rivals else name)
    return distinct


def _shortest_suffix(parts: tuple[str, ...], rivals: list[tuple[str, ...]]) -> str:
    """Returns the shortest tail of the path `parts` that no rival path ends with (the whole path at worst)."""
    for k in range(1, len(parts) + 1):
        if all(rival[-k:] != parts[-k:] for rival in rivals):
            return str(Path(*parts[-k:]))
    return str(Path(*parts))


SUMMARY_NUMBERS = ("trainable_params", "peak_mem_mb", "time_per_step_s", "steps", "final_accuracy", "best_accuracy",
                   "best_eval_loss", "best_bleu", "best_rougeL", "epsilon", "delta", "local_epsilon",
                   "bytes_communicated")
PLOTTED = ("eval_accuracy", "eval_loss", "eval_bleu")  # the metrics rows the plots read, with their step


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_summary(path: Path, summary: dict) -> None:
    """Raises SlimtuneError unless the summary is a slimtune run's (method and steps) whose fields the table and plots
    read are numbers or null (a string there was an internal error after the report directory was half written)."""
    missing = [key for key in REQUIRED if key not in summary]
    if missing:
        raise SlimtuneError(f"{path}: not a slimtune run's summary (no {' or '.join(map(repr, missing))} field)")
    for key in SUMMARY_NUMBERS:
        if summary.get(key) is not None and not _number(summary[key]):
            raise SlimtuneError(f"{path}: field {key!r} is {summary[key]!r}, not a number")
    for key in ("epsilon", "local_epsilon"):
        if summary.get(key) is not None and not 0 <= summary[key] < float("inf"):
            raise SlimtuneError(f"{path}: field {key!r} is {summary[key]!r}, not a privacy budget (0 or more)")


def _checked_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records (train.metrics.read_jsonl's); a record with a plotted value must carry a numeric step
    and numeric values, named by file and line otherwise."""
    records, skipped = [], []
    numbered = numbered_records(path, skipped)
    last = max([n for n, _ in numbered] + skipped, default=0)
    damaged = [n for n in skipped if n != last]  # a partial last line is what a kill leaves: skipped in silence
    if damaged:
        import warnings
        more = f" (and {len(damaged) - 1} more lines)" if len(damaged) > 1 else ""
        warnings.warn(f"{path}:{damaged[0]}: not a JSON record (damaged){more}; skipped, so the report's curves miss "
                      "it", stacklevel=2)
    for number, record in numbered:
        plotted = [k for k in PLOTTED if record.get(k) is not None]
        bad = next((k for k in ("step", *plotted) if not _number(record.get(k))), None) if plotted else None
        if bad is not None:
            raise SlimtuneError(f"{path}:{number}: field {bad!r} is {record.get(bad)!r}, not a number")
        records.append(record)
    return records


def table_rows(summaries: list[dict]) -> list[list[str]]:
    """Returns one row of formatted cells per summary, in COLUMNS order ('-' for a missing value or one a private run
    withholds, see `released`; the epsilon of a --log-private-stats run marked '*', see FOOTNOTE; a final accuracy
    evaluated before the run's last step followed by that step)."""
    return [[_cell(released(s), key, fmt) for _, key, fmt in COLUMNS] for s in summaries]


def _cell(summary: dict, key: str, fmt) -> str:
    """Returns the summary's value for key as shown, the epsilon of a run whose logs are outside it marked '*', the
    final accuracy of a run last evaluated before its last step (stopped early) with the step it is from."""
    text = _fmt(summary.get(key), fmt)
    if key == "final_accuracy" and text != "-" and _number(summary.get("last_eval_step")) \
            and _number(summary.get("steps")) and summary["last_eval_step"] != summary["steps"]:
        return f"{text} (step {summary['last_eval_step']})"
    return f"{text}*" if key == "epsilon" and text != "-" and logs_outside_guarantee(summary) else text


def logs_outside_guarantee(summary: dict) -> bool:
    """Returns whether the run wrote --log-private-stats logs, which its (epsilon, delta) does not cover."""
    return summary.get("private_stats_logged") is True and summary.get("epsilon") is not None


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
    """Prints the runs as terminal tables, one per task and model (named in its title): short headers, no column
    that is empty for every run of the table, numbers never cut (fits 100 columns); returns None."""
    from rich.markup import escape

    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        groups.setdefault((s.get("task"), s.get("model")), []).append(s)
    for (task, model), group in groups.items():
        console.print(_terminal_table(group, _title(task, model)))
    if any(logs_outside_guarantee(s) for s in summaries):
        console.print(escape(FOOTNOTE))
    note = prompt_note(summaries)
    if note:
        console.print(escape(note))


def prompt_note(summaries: list[dict]) -> str | None:
    """A note naming each prompt and its runs when the runs trained with different prompts (their accuracies are
    not comparable: SST-2's prompt alone moved zero-shot accuracy by 26 points); None when they share one or the
    prompts are unknown."""
    groups: dict[tuple, list[str]] = {}
    for s in summaries:
        if s.get("prompt"):
            groups.setdefault(tuple(s["prompt"]), []).append(str(s.get("name", s.get("method"))))
    if len(groups) < 2:
        return None
    shown = "; ".join(f"{_prompt_text(p)}: {', '.join(names)}" for p, names in groups.items())
    unknown = [str(s.get("name", s.get("method"))) for s in summaries if not s.get("prompt")]
    return ("Runs trained with different prompts (their accuracies are not comparable): " + shown +
            (f"; prompt not recorded: {', '.join(unknown)}" if unknown else "") + ".")


def _prompt_text(prompt: tuple) -> str:
    """A prompt as one line: the template (line ends as \\n) and its label words."""
    template, words = prompt
    text = json.dumps(template, ensure_ascii=False)[1:-1]  # \n, not a line break
    return f"prompt `{text}`" + (f" ({words})" if words else "")


def _title(task, model) -> str:
    """Returns a terminal table's title: the task and model its runs were scored on, where known."""
    known = [f"{what} {value}" for what, value in (("task", task), ("model", model)) if value is not None]
    return "slimtune runs" + (": " + ", ".join(known) if known else "")


def _terminal_table(summaries: list[dict], title: str):
    """Returns a rich Table of the runs (task and model left to the title): light rules, so the numbers keep their
    width and only a long run name folds."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    rows = table_rows([{"name": s.get("name", s.get("method")), **s} for s in summaries])
    keep = [i for i in _kept_columns(rows) if COLUMNS[i][0] not in ("task", "model")]
    if not any(s.get("best_accuracy") is None for s in summaries):  # classification only: accuracy says it
        keep = [i for i in keep if COLUMNS[i][1] != "best_eval_loss"]
    table = Table(title=escape(title), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for i in keep:
        header = COLUMNS[i][0]
        width = min(max(len(row[i]) for row in rows), 20) if header == "run" else None  # a name stays legible
        table.add_column(TERMINAL_HEADERS.get(header, header), justify="left" if header in TEXT else "right",
                         overflow="fold", no_wrap=header != "run", min_width=width)  # only a long run name folds
    for row in rows:
        table.add_row(*(escape(row[i]) for i in keep))  # names and fields as they are, not markup
    return table


def _kept_columns(rows: list[list[str]]) -> list[int]:
    """Column indices to show: the run's identity and every column some run has a value in."""
    empty = {"-", "0 B"}
    return [i for i, (header, _, _) in enumerate(COLUMNS)
            if header in IDENTITY or any(row[i] not in empty for row in rows)]


def render_report(runs: list[RunData], out_dir: str | Path) -> dict:
    """Writes report.md, report.html, report.json and the plots into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs, out)
    rows = table_rows([r.summary for r in runs])
    marked = any(logs_outside_guarantee(r.summary) for r in runs)
    note = prompt_note([r.summary for r in runs])
    (out / "report.md").write_text(_markdown(rows, plots, marked, note))
    (out / "report.html").write_text(_html(rows, plots, marked, note))
    (out / "report.json").write_text(json.dumps([released(r.summary) for r in runs], indent=2))
    return {"html": out / "report.html", "markdown": out / "report.md", "plots": plots}


# (metrics key, y label, title, file): a curve per run that has the key; a plot when some run has it
CURVES = (("eval_accuracy", "dev accuracy", "Accuracy vs steps", "accuracy_vs_steps.png"),
          ("eval_loss", "eval loss", "eval loss vs steps", "loss_vs_steps.png"),
          ("eval_bleu", "BLEU", "BLEU vs steps", "bleu_vs_steps.png"))


def _plots(runs: list[RunData], out: Path) -> list[Path]:
    """Draws each plot that some run has values for (curves per metric, accuracy against memory and epsilon);
    returns the PNG paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.cm.tab20.colors if len(runs) > 10 else plt.cm.tab10.colors
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=colors)  # one distinct colour per run
    labels = _labels(runs)
    paths = [_curves(runs, labels, key, label, title, out / name) for key, label, title, name in CURVES
             if any(m.get(key) is not None for r in runs for m in r.metrics)]
    if any(_has(r, "peak_mem_mb", "final_accuracy") for r in runs):  # _has: a value withheld is not there
        paths.append(_memory_plot(runs, labels, out / "accuracy_vs_memory.png"))
    if any(_has(r, "epsilon", "final_accuracy") or _has(r, "local_epsilon", "final_accuracy") for r in runs):
        paths.append(_epsilon_plot(runs, labels, out / "accuracy_vs_epsilon.png"))
    return paths


def _labels(runs: list[RunData]) -> list[str]:
    """Returns each run's legend label: its name, with its task when the runs are on several tasks."""
    several = len({r.summary.get("task") for r in runs}) > 1
    labels = [f"{r.name} ({r.summary.get('task') or '?'})" if several else r.name for r in runs]
    return [label.replace("$", r"\$") for label in labels]  # matplotlib reads $...$ as TeX


def _has(run: RunData, *keys: str) -> bool:
    """Returns whether the run's summary has a value for every key (one a private run withholds: no)."""
    return all(released(run.summary).get(key) is not None for key in keys)


def _curves(runs, labels, key, label, title, path: Path) -> Path:
    """Draws the key's values against steps, a curve per run that has them; returns the PNG's path."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (r, name) in enumerate(zip(runs, labels)):
        evals = [m for m in r.metrics if m.get(key) is not None]
        if evals:  # 20 colours; past them another marker and line style, so every run has its own look
            ax.plot([m["step"] for m in evals], [m[key] for m in evals], label=name, **_style(i))
    _finish(ax, "step", label, title)
    return _save(fig, path)


def _style(i: int) -> dict:
    """Returns the i-th run's marker and line style (a new pair every 20 runs, the colour cycle's length)."""
    markers, lines = "os^Dv<>pP*", ("-", "--", ":", "-.")
    return {"marker": markers[(i // 20) % len(markers)], "linestyle": lines[(i // 20) % len(lines)]}


def _memory_plot(runs, labels, path: Path) -> Path:
    """Draws each run's final accuracy against its peak memory; returns the PNG's path."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for r, name in zip(runs, labels):
        if _has(r, "peak_mem_mb", "final_accuracy"):
            ax.scatter([r.summary["peak_mem_mb"]], [r.summary["final_accuracy"]], s=60, label=name)
    _finish(ax, "peak memory (MB)", "dev accuracy", "Accuracy vs peak memory")
    return _save(fig, path)


def _epsilon_plot(runs, labels, path: Path) -> Path:
    """Draws each run's final accuracy against its epsilon (non-private runs at the right edge), a run whose logs
    are outside its guarantee marked '*' with the footnote under the axis; returns the PNG's path."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    edge = _right_edge(runs)
    for r, name in zip(runs, labels):
        x, y, local = r.summary.get("epsilon"), r.summary.get("final_accuracy"), r.summary.get("local_epsilon")
        if y is None:
            continue
        mark = "*" if logs_outside_guarantee(r.summary) else ""
        mark += f" (epsilon {x:.3g}, drawn at {EPS_SHOWN:g})" if x is not None and x > EPS_SHOWN else ""
        if x is None and local is not None:  # federated local DP: each client's bound, not the run's
            ax.scatter([min(local, EPS_SHOWN)], [y], s=60, label=f"{name} (per client)", marker="D")
        else:
            ax.scatter([edge if x is None else min(x, EPS_SHOWN)], [y], s=60, label=name + mark,
                       marker="o" if x is not None else "s")
    ticks = [t for t in ax.get_xticks() if 0 <= t < edge * 0.9]
    ax.set_xticks(ticks + [edge], [f"{t:g}" for t in ticks] + ["non-private"])
    marked = any(logs_outside_guarantee(r.summary) for r in runs)
    _finish(ax, "epsilon (privacy spent)" + (f"\n{FOOTNOTE}" if marked else ""), "dev accuracy", "Accuracy vs epsilon")
    return _save(fig, path)


EPS_SHOWN = 1e6  # the largest epsilon drawn where it is (a larger one, no guarantee to speak of, is drawn here)


def _right_edge(runs) -> float:
    """Returns the x of the 'non-private' tick: right of every run's epsilon (and local epsilon), never at 0."""
    eps = [min(r.summary[k], EPS_SHOWN) for r in runs for k in ("epsilon", "local_epsilon")
           if r.summary.get(k) is not None]
    return max(max(eps) * 1.5, 1.0) if eps else 10.0


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


def _markdown(rows, plots, marked: bool = False, note: str | None = None) -> str:
    """Returns report.md: the table (FOOTNOTE under it when a run is marked, the prompt note when prompts differ) and
    the plots."""
    keep = _kept_columns(rows)
    headers = [COLUMNS[i][0] for i in keep]
    lines = ["# slimtune report", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(row[i]) for i in keep) + " |" for row in rows]
    lines += ["", FOOTNOTE] if marked else []
    lines += ["", note] if note else []
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    """Returns a table cell as Markdown reads it whole: '|' escaped, line ends as spaces."""
    return " ".join(text.splitlines()).replace("|", "\\|")


def _html(rows, plots, marked: bool = False, note: str | None = None) -> str:
    """Returns report.html: the table (FOOTNOTE under it when a run is marked, the prompt note when prompts differ)
    and the plots."""
    keep = _kept_columns(rows)
    text = sum(COLUMNS[i][0] in TEXT for i in keep)  # the leading text columns, left-aligned
    headers = "".join(f"<th>{html.escape(COLUMNS[i][0])}</th>" for i in keep)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(row[i])}</td>" for i in keep) + "</tr>" for row in rows)
    note = (f"<p>{html.escape(FOOTNOTE)}</p>" if marked else "") + (f"<p>{html.escape(note)}</p>" if note else "")
    images = "".join(f'<figure><img src="{p.name}" alt="{p.stem}"><figcaption>{p.stem.replace("_", " ")}'
                     "</figcaption></figure>" for p in plots)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>slimtune report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 6px 10px; text-align: right; }}
th {{ background: #f0f3f7; }}
td:nth-child(-n+{text}) {{ text-align: left; }}
tr:nth-child(even) {{ background: #fafafa; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} img {{ max-width: 600px; border: 1px solid #eee; }}
</style></head><body>
<h1>slimtune report</h1>
<table><thead><tr>{headers}</tr></thead><tbody>{body}</tbody></table>
{note}<div class="plots">{images}</div>
</body></html>
"""
