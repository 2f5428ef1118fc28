"""The bodies of the CLI commands, one module per concern; `register` adds them to the typer app (slimtune/cli.py).
Their settings (and so their flags) are the dataclasses of slimtune/settings/."""

from __future__ import annotations


def register(app) -> None:
    from slimtune.commands import evaluate, export, federate, plan, report, train

    train.register(app)
    evaluate.register(app)
    export.register(app)
    plan.register(app)
    report.register(app)
    federate.register(app)
