"""Commands generated from settings classes: every field becomes a typer option (same name, help, default), and
`--config FILE` fills the same fields from a file. Precedence: defaults < config file < command line.

Config files (YAML, JSON or TOML by their suffix; UTF-8, a byte order mark allowed) hold flat keys — flag names with
dashes or underscores (`lr: 2e-3`). A nested section is refused with the flat form it should have been written in,
except a run's own `config.json` (the nested TrainConfig a run stores), which `slimtune train --config RUN/config.json`
reads back. Values keep their exact type (settings/base.py `coerce`).
"""

from __future__ import annotations

import inspect
import re
import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable, Optional

import click
import typer
from click.core import ParameterSource
from rich.markup import escape

from slimtune import SlimtuneError
from slimtune.settings.base import Settings, flag, kind_of, spec_of

PY_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
# switches that older runs' config.json files hold as null (they had no default then): null there means unset; any
# other null in a settings file is refused, whether the setting may be None or not (`dry_run: ${DRY_RUN}` with the
# variable unset must not become a real run, nor `epsilon: ${EPS}` the default budget)
NULL_IS_UNSET = ("svfit_relative",)


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SlimtuneError(f"--config {path}: no such file")
    from slimtune.data.readers import DuplicateKey, read_text, unique_keys

    text = read_text(p)
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=unique_keys)
        elif p.suffix.lower() == ".toml":
            data = _load_toml(text)
        else:
            data = _load_yaml(text)
    except DuplicateKey as exc:
        raise SlimtuneError(f"{path}: {exc}: a setting given twice would silently take its last value") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError is one too
        kind = "TOML" if p.suffix.lower() == ".toml" else "JSON"
        raise SlimtuneError(f"{path}: not valid {kind} ({' '.join(str(exc).split())})") from None
    except Exception as exc:  # yaml.YAMLError and friends
        raise SlimtuneError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SlimtuneError(f"{path}: expected a mapping of settings at the top level")
    return data


def _load_toml(text: str) -> dict:
    """TOML (Python's tomllib): a key given twice is already an error there."""
    import tomllib
    return tomllib.loads(text)


def _load_yaml(text: str):
    import yaml

    from slimtune.data.readers import DuplicateKey

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def file_values(cls: type[Settings], path: str) -> tuple[dict, set[str]]:
    """({field: value}, the fields the file sets as user choices) from a config file for settings `cls`."""
    data = read_config_file(path)
    names = {f.name for f in fields(cls)}
    if cls.command == "train":
        from slimtune.settings.train import from_run_config, is_run_config
        if is_run_config(data):  # a run's own config.json: what it was trained with
            values = from_run_config(data, path)
            values.pop("resume", None)
            values.pop("restart", None)
            return values, set()  # filled by the run itself: applicability is not the user's doing
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = cls.ALIASES.get(name, name)
        if isinstance(value, dict):
            example = next(iter(value), "key")
            toml = Path(path).suffix.lower() == ".toml"  # in the file's own syntax
            setting, section = (f"{example} = ...", f"[{key}]") if toml else (f"{example}: ...", f"{key}:")
            raise SlimtuneError(f"{path}: {key!r} is a nested section; settings are flat keys (write "
                                f"`{setting}` at the top level, not under `{section}`)")
        if name in out:
            raise SlimtuneError(f"{path}: setting {key!r} is given twice (dashes and underscores name the same "
                                "setting); keep one")
        if name in ("config", "config_file"):
            raise SlimtuneError(f"{path}: setting {key!r}: a config file cannot include another one")
        if name not in names or not spec_of(_field(cls, name)).cli and name not in ("adapter", "runs"):
            known = ", ".join(sorted(n for n in names if spec_of(_field(cls, n)).cli))
            raise SlimtuneError(f"{path}: unknown setting {key!r} for `slimtune {cls.command}` (known: {known})")
        if value is None:
            if name in NULL_IS_UNSET:
                continue  # older runs' files hold null for a switch that now has a default (svfit_relative): unset
            # `out: ${RUN}` or `epsilon: ${EPS}` rendered with the variable unset: YAML's null, refused as `--out ""`
            # is, never the default (for epsilon the default budget); leaving the key out is how to unset it
            raise SlimtuneError(f"{path}: setting {key!r} has no value (an unset variable?); give a value or leave "
                                "the key out")
        out[name] = value
    return out, set(out)


def refuse_repeated_options(cmd: click.Command, args: list[str]) -> None:
    """A flag given twice (`--lr 1e-3 --lr 0.5`, `--svfit-relative --svfit-absolute`) is a usage error: click would keep the last
    value silently. Options that take several values (multiple=True) may repeat."""
    by_name = {opt: p for p in cmd.params if isinstance(p, click.Option)
               for opt in (*p.opts, *p.secondary_opts)}
    seen: dict[str, str] = {}
    tokens = iter(args)
    for token in tokens:
        if token == "--":
            break
        if not token.startswith("-") or token == "-":
            continue
        name = token.split("=", 1)[0]
        param = by_name.get(name)
        if param is None:
            continue
        if not (param.is_flag or param.count or "=" in token):
            for _ in range(max(param.nargs, 1)):
                next(tokens, None)  # the option's value(s), whatever they look like
        if param.multiple or param.count:
            continue
        if param.name in seen:
            also = "" if seen[param.name] == name else f" (also as {seen[param.name]})"
            raise click.UsageError(f"{name} given twice{also}: give it once", ctx=None)
        seen[param.name] = name


def _field(cls, name):
    return next(f for f in fields(cls) if f.name == name)


def decode_escapes(value):
    """A prompt template typed in a shell: '\\n' and '\\t' are a newline and a tab, '\\\\' a backslash (inside
    single quotes the shell keeps them as two characters); config files and Python give the characters themselves."""
    if not isinstance(value, str):
        return value
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], value)


def build_settings(cls: type[Settings], ctx: click.Context | None, values: dict, config_path: str | None = None,
                   base: dict | None = None, base_given: set[str] | None = None,
                   base_origin: str | None = None) -> Settings:
    """Settings from command-line values (the typer callback's kwargs), a config file, and `base` (e.g. a resumed
    run's stored settings, read from the file `base_origin`, which messages name). Precedence: defaults < base <
    file < command line."""
    typed = {k: v for k, v in values.items() if k in {f.name for f in fields(cls)}}
    on_command_line = {k for k in typed if ctx is None or ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    merged, given, origin = {}, set(), {}
    if base:
        merged.update(base)
        given |= set(base_given or ())
        if base_origin:
            origin = {k: base_origin for k in base}
    if config_path:
        fv, fgiven = file_values(cls, config_path)
        merged.update(fv)
        given |= fgiven
        origin.update({k: config_path for k in fv})
    for k in on_command_line:
        typed_in_a_shell = ctx is not None and spec_of(_field(cls, k)).escapes  # (ctx None: Python keywords)
        merged[k] = decode_escapes(typed[k]) if typed_in_a_shell else typed[k]
        given.add(k)
        origin.pop(k, None)
    if config_path and cls.command == "train":  # a run's table defaults follow a change of model, optimizer, PEFT
        from slimtune.settings.train import retable_from_file
        merged = retable_from_file(merged, config_path, on_command_line)
    for k, v in typed.items():  # flags left at their defaults fill what nothing else set
        merged.setdefault(k, v)
    return cls.build(merged, given=given, origin=origin)


def options(cls: type[Settings]) -> list[inspect.Parameter]:
    """typer options for every command-line field of `cls`."""
    params = []
    for f in fields(cls):
        spec = spec_of(f)
        if not spec.cli:
            continue
        base, optional = kind_of(f)
        typ = PY_TYPES.get(base, str)
        default = f.default if f.default is not MISSING else f.default_factory()
        names = [spec.bool_flags] if spec.bool_flags else list(spec.flags or (flag(f.name),))
        if base == "bool" and not spec.bool_flags:
            names = [flag(f.name)]
            option = typer.Option(default, *names, help=escape(spec.help), is_flag=True)
        else:
            option = typer.Option(default, *names, help=escape(spec.help))  # typer renders help as rich markup
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[typ] if optional else typ))
    return params


def command(app: typer.Typer, cls: type[Settings], run: Callable[[Settings], Any], *, name: str | None = None,
            arguments: list[inspect.Parameter] = (), with_config: bool = True, help: str | None = None,
            prepare: Callable | None = None) -> None:
    """Register `slimtune <name>`: options from `cls`, then `run(settings)`. `arguments`: positional typer arguments
    (their values are passed into the settings under the same names); `prepare(values) -> (base, base_given,
    base_origin)` may supply base values (e.g. a resumed run's settings) and the file they came from."""
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context), *arguments]
    if with_config:
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                        default=typer.Option(None, "--config", help="YAML/JSON/TOML file of settings "
                                                             "(flat keys: flag names); flags given here override it")))
    params += options(cls)

    def callback(ctx: typer.Context, **kwargs):
        from slimtune.cli import fail
        try:
            config_path = kwargs.pop("config", None)
            base, base_given, base_origin = prepare(kwargs, ctx, config_path) if prepare else (None, None, None)
            settings = build_settings(cls, ctx, kwargs, config_path, base, base_given, base_origin)
        except SlimtuneError as exc:
            fail(exc)
        return run(settings)

    callback.__signature__ = inspect.Signature(params)
    callback.__annotations__ = {p.name: p.annotation for p in params}
    callback.__name__ = (name or cls.command).replace("-", "_")
    callback.__doc__ = help or run.__doc__
    app.command(name or cls.command)(callback)
