"""Command line: `slimtune train | eval | generate | merge | export | plan | report | demo | federate`.

Each command's flags are generated from its settings dataclass (slimtune/settings/), which checks every value before
any model, data or output is touched; the command bodies live in slimtune/commands/. Every error is one line on
stderr with exit code 2 (Ctrl-C during training: exit 130 with the command that resumes); never a traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from slimtune import SlimtuneError
from slimtune.settings.cli import refuse_repeated_options

# Deprecation notices from the libraries underneath are for their developers, not for slimtune's users.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|opacus|torch|flwr)\b")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft|opacus|torch|flwr)\b")

# emoji=False: rich would print the ":x:" of `--device cuda:x` (or of a path) as an emoji
console = Console(width=None if sys.stdout.isatty() else 100, emoji=False)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 1000, emoji=False)


def print_error(exc: Exception | str) -> None:
    """One line on stderr."""
    errors.print(f"[bold red]error:[/] {escape(' '.join(str(exc).split()))}", soft_wrap=True, highlight=False)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI prints it: one line, without Python's file, line number and source line."""
    return f"warning: {' '.join(str(message).split())}\n"


def fail(exc: Exception | str, code: int = 2) -> None:
    """One line on stderr, then exit (2: bad input)."""
    print_error(exc)
    raise typer.Exit(code)


NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class OneLineErrors(TyperGroup):
    """Usage errors (unknown flag, a value click cannot convert, a missing argument) as one line with exit code 2,
    and no traceback for anything else either (SLIMTUNE_DEBUG=1 shows it)."""

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and not isinstance(cmd, click.Group):
            refuse_repeated_options(cmd, rest)
        return name, cmd, rest

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        shown, warnings.formatwarning = warnings.formatwarning, one_line_warning
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NO_ARGS_IS_HELP as exc:  # a bare `slimtune` (or group): the help, and no error line without a message
            if exc.format_message().strip():  # plain click returns the help; typer's rich help has printed it already
                click.echo(exc.format_message())
            code = exc.exit_code
        except click.UsageError as exc:
            where = f"{exc.ctx.command_path}: " if exc.ctx is not None and exc.ctx.command_path else ""
            print_error(f"{where}{exc.format_message()} (see --help)")
            code = 2
        except click.Abort:
            print_error("interrupted")
            code = 130
        except SlimtuneError as exc:
            print_error(exc)
            code = 2
        except Exception as exc:
            if os.environ.get("SLIMTUNE_DEBUG"):
                raise
            print_error(f"internal error ({type(exc).__name__}: {exc}); please report it (SLIMTUNE_DEBUG=1 shows "
                        "the traceback)")
            code = 1
        else:
            code = result if isinstance(result, int) else 0
        finally:
            warnings.formatwarning = shown
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune LLMs when memory and privacy are the constraints.")

from slimtune.commands import register  # noqa: E402  (the commands need `app`, `console` and `fail`)

register(app)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
