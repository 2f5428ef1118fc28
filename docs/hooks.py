"""MkDocs hook: tables the docs take from the code, so they never drift from it.

`<!-- settings:train -->` (or eval, generate, merge, export, plan, report, demo) becomes the command's flags from its
settings dataclass (slimtune/settings/): flag, default, what it is, and when it applies. `<!-- defaults-table -->`
becomes slimtune/optim/defaults.py's optimizer x PEFT table with each entry's source.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, fields


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def settings_table(command: str) -> str:
    from slimtune.settings import (DemoSettings, EvalSettings, ExportSettings, GenerateSettings, MergeSettings,
                                   PlanSettings, ReportSettings, TrainSettings)
    from slimtune.settings.base import spec_of

    classes = {c.command: c for c in (TrainSettings, EvalSettings, GenerateSettings, MergeSettings, ExportSettings,
                                      PlanSettings, ReportSettings, DemoSettings)}
    rows = ["| flag | default | what it sets | applies to |", "|---|---|---|---|"]
    for f in fields(classes[command]):
        spec = spec_of(f)
        if not spec.cli:
            continue
        names = spec.bool_flags or " ".join(spec.flags) or "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        shown = "-" if default is None else f"`{default}`"
        choices = f" ({', '.join(map(str, spec.choices))})" if spec.choices else ""
        applies = spec.applies.describe if spec.applies is not None else "always"
        rows.append(f"| `{_cell(names)}` | {_cell(shown)} | {_cell(spec.help)}{_cell(choices)} | {_cell(applies)} |")
    return "\n".join(rows)


def defaults_table() -> str:
    from slimtune.optim.defaults import OWN, TABLE

    rows = ["| optimizer | PEFT | lr | eps | schedule | warm-up | steps | other | where the values come from |",
            "|---|---|---|---|---|---|---|---|---|"]
    for (optimizer, peft), d in [*TABLE.items(), *OWN.items()]:
        other = ", ".join(f"{k} {v:g}" for k, v in d.extra) or "-"
        eps = "-" if d.eps is None else f"{d.eps:g}"
        rows.append(f"| {optimizer} | {peft} | {d.lr:g} | {eps} | {d.lr_scheduler} | {d.warmup_ratio:.0%} | "
                    f"{d.steps:,} | {other} | {_cell(d.source)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = re.sub(r"<!-- settings:(\w+) -->", lambda m: settings_table(m.group(1)), markdown)
    return markdown.replace("<!-- defaults-table -->", defaults_table())
