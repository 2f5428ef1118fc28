"""One settings model for every command: a dataclass per command whose fields carry their own rules.

Each field is declared with `setting(default, help, ...)`: its flag names, allowed choices, numeric range and the
condition under which it applies (`when(optimizer=(...))`). The same class is filled from command-line flags
(slimtune/settings/cli.py generates the typer options from the fields) and from config files (flat keys, exact
types), and `Settings.build` checks everything before any model, data or output is touched:

1. types: a config file's value must have the field's type (int: an integer, never 2.7 -> 2; float: a number or a
   numeric string such as YAML's `1e-3`; str: a string; bool: true/false; null only where the field allows None);
2. choices and ranges (`low`/`high`, open or closed);
3. applicability: a setting the user *gave* (flag or file key) that does not apply to the rest of the settings is an
   error naming it and what it applies to — never silently ignored;
4. `check()`: the command's cross-field rules (a subclass hook).
Every failure is a one-line `SlimtuneError` naming the flag (and the file, for config files).
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar

from slimtune import SlimtuneError


@dataclass(frozen=True)
class Condition:
    """When a setting applies: a predicate on the settings and the words that describe it."""

    test: Callable[[Any], bool]
    describe: str  # "--optimizer lozo-m, sgd or dp-sgd"
    current: Callable[[Any], str] = lambda s: ""  # "--optimizer mezo" (what this run has instead)


def when(**allowed: tuple) -> Condition:
    """Applies when every named setting has one of the allowed values, e.g. when(optimizer=("sgd", "lozo-m"))."""
    def test(s) -> bool:
        return all(getattr(s, k) in v for k, v in allowed.items())

    describe = " with ".join(f"{flag(k)} {_or(v)}" for k, v in allowed.items())
    current = lambda s: ", ".join(f"{flag(k)} {getattr(s, k)}" for k in allowed)  # noqa: E731
    return Condition(test, describe, current)


def unless(**excluded: tuple) -> Condition:
    def test(s) -> bool:
        return all(getattr(s, k) not in v for k, v in excluded.items())

    describe = " and ".join(f"{flag(k)} other than {_or(v)}" for k, v in excluded.items())
    current = lambda s: ", ".join(f"{flag(k)} {getattr(s, k)}" for k in excluded)  # noqa: E731
    return Condition(test, describe, current)


def condition(test: Callable[[Any], bool], describe: str, current: Callable[[Any], str] = lambda s: "") -> Condition:
    return Condition(test, describe, current)


def _or(values: tuple) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Spec:
    help: str
    flags: tuple[str, ...] = ()  # command-line names (default: --name-with-dashes)
    bool_flags: str | None = None  # a bool's "--x/--no-x" pair
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low < value instead of low <= value
    high_open: bool = False
    applies: Condition | None = None
    cli: bool = True  # False: config files and Python only
    list_of_str: bool = False  # a comma-separated list; config files may give a YAML list
    escapes: bool = False  # on the command line, \n and \t are a newline and a tab (\\ a backslash): prompt templates
    name: str | None = None  # how messages name it when it is not a flag (a positional argument: ADAPTER)


def setting(default: Any = None, help: str = "", *, factory: Callable | None = None, **spec) -> Any:
    """A settings field: `default` and the rules in `Spec`."""
    meta = {"spec": Spec(help, **spec)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def spec_of(f) -> Spec:
    return f.metadata.get("spec") or Spec("")


def kind_of(f) -> tuple[str, bool]:
    """(base type name, optional) from the field's annotation (a string under `from __future__ import annotations`)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in text.replace("Optional[", "").rstrip("]").split("|")]
    optional = "None" in parts or "Optional[" in text
    base = next((p for p in parts if p != "None"), "str")
    return base, optional


class Settings:
    """Mixin for a command's settings dataclass. Subclasses define `command` and may override `check()`."""

    command: ClassVar[str] = ""
    ALIASES: ClassVar[dict[str, str]] = {}  # config-file key -> field name (e.g. a run's config.json names)

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, values: dict, given: set[str] | None = None, origin: dict | None = None):
        """Settings from `values` ({field: value}); `given`: the fields the user set (flag or file key), checked for
        applicability; `origin`: {field: "file.yaml"} for messages about values read from files."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SlimtuneError(f"unknown setting {unknown[0]!r} for `slimtune {cls.command}`")
        origin = origin or {}
        checked = {}
        for f in fields(cls):
            if f.name in values:
                checked[f.name] = coerce(f, values[f.name], origin.get(f.name))
        obj = cls(**checked)
        obj._given = set(given if given is not None else values)
        obj._origin = dict(origin)
        obj.validate()
        return obj

    @classmethod
    def defaults(cls) -> dict:
        out = {}
        for f in fields(cls):
            out[f.name] = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING \
                else f.default
        return out

    @classmethod
    def check_values(cls, values: dict, origin: str | None = None) -> dict:
        """Exact types, choices and ranges of `values` ({field: value}) read from somewhere other than flags or a
        config file (e.g. Flower's run config or a server settings file): the same rules; messages name `origin`
        and the key, or the flag when origin is None. Returns the coerced values."""
        by_name = {f.name: f for f in fields(cls)}
        out = {}
        for name, value in values.items():
            f = by_name.get(name)
            if f is None:
                raise SlimtuneError(f"{origin}: unknown setting {name!r}")
            out[name] = value = coerce(f, value, origin)
            if value is not None:
                check_value(f"{origin}: setting {name!r}" if origin else flag(name), value, spec_of(f),
                             empty_given=True)
        return out

    # -- validation --------------------------------------------------------------------------------------------
    def given(self, name: str) -> bool:
        return name in getattr(self, "_given", set())

    def where(self, name: str) -> str:
        """How to name a setting in a message: the flag, and the file it came from."""
        src = getattr(self, "_origin", {}).get(name)
        if src:
            return f"{src}: setting {name!r}"
        return next((spec_of(f).name for f in fields(self) if f.name == name and spec_of(f).name), flag(name))

    def validate(self) -> None:
        for f in fields(self):
            spec, value = spec_of(f), getattr(self, f.name)
            if value is None:
                continue
            where = self.where(f.name)
            leave = f", or leave {where} out" if spec.cli and not getattr(self, "_origin", {}).get(f.name) else ""
            check_value(where, value, spec, empty_given=self.given(f.name), leave=leave)
        self.adopt_records()
        self.check_applicable()
        self.check()

    def adopt_records(self) -> None:
        """Settings left out that a record fills before the flags are checked against them (subclasses: eval's task
        from its adapter)."""

    def check_applicable(self) -> None:
        """Each setting the user gave applies to these settings (a check() that fills a setting from a record, as
        eval's task from its adapter, calls it again)."""
        for f in fields(self):  # applicability: only what the user gave
            spec = spec_of(f)
            if spec.applies is not None and self.given(f.name) and not spec.applies.test(self):
                now = spec.applies.current(self)
                raise SlimtuneError(f"{self.where(f.name)} applies only to {spec.applies.describe}"
                                    f"{f' (this run: {now})' if now else ''}; remove it or change the run")

    def check(self) -> None:
        """Cross-field rules of the command (subclasses)."""

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


INT64 = 2**63 - 1  # torch and numpy take no larger integer


def check_value(where: str, value: Any, spec: Spec, *, empty_given: bool, leave: str = "", keyword: bool = False,
                as_given: Any = None) -> None:
    """The per-field rules every source of values shares (flags, config files, other settings files and the Python
    API's keywords, settings/python.py): a given empty string, the choices, the range. `keyword`: name the value as
    a Python keyword argument (`lr=...`) instead of a flag's (`--lr ...`); `as_given`: the value as the caller wrote
    it, when `value` is its coerced form (target_modules=[] became "")."""
    raw = value if as_given is None else as_given
    shown = f"{where}={raw!r}" if keyword else f"{where} {raw!r}"
    if empty_given and is_empty(value):
        raise SlimtuneError(f"{shown}: empty{'' if keyword else ' (an unset variable?)'}; give a value{leave}")
    if spec.choices is not None and value not in spec.choices:
        raise SlimtuneError(f"{shown}: choose one of {', '.join(map(str, spec.choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_range(where, value, spec)


def _check_range(where: str, value: float, spec: Spec) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise SlimtuneError(f"{where} {value}: must be a finite number")
    if isinstance(value, int) and not -INT64 <= value <= INT64:
        raise SlimtuneError(f"{where} {value}: out of range (at most {INT64:,} in magnitude)")
    low_bad = spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low)
    high_bad = spec.high is not None and (value >= spec.high if spec.high_open else value > spec.high)
    if low_bad or high_bad:
        lo = "" if spec.low is None else f"{'>' if spec.low_open else '>='} {spec.low:g}"
        hi = "" if spec.high is None else f"{'<' if spec.high_open else '<='} {spec.high:g}"
        raise SlimtuneError(f"{where} {value:g}: must be {' and '.join(p for p in (lo, hi) if p)}")


def is_empty(value: Any) -> bool:
    """A given value that is an empty string is not the default: `--out "$OUT"` with OUT unset wrote the run into the
    current directory, --output "" printed instead, --eval-data "" trained without evaluation. Flags, config files
    and the Python API's keywords (settings/python.py) refuse it alike."""
    return isinstance(value, str) and not value.strip()


def coerce(f, value: Any, source: str | None):
    """A value for field `f` with exactly its type (config files; flags come typed from click)."""
    base, optional = kind_of(f)
    spec = spec_of(f)
    where = f"{source}: setting {f.name!r}" if source else flag(f.name)
    if value is None:
        if optional:
            return None
        raise SlimtuneError(f"{where}: null is not allowed (expected {_article(base)})")
    if base.startswith("list"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise SlimtuneError(f"{where}: expected a list of names")
        return list(value)
    if spec.list_of_str and isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise SlimtuneError(f"{where}: expected a list of names")
        return ",".join(value)
    if isinstance(value, (list, dict)):
        raise SlimtuneError(f"{where}: expected {_article(base)}, got a {'list' if isinstance(value, list) else 'mapping'}")
    if base == "bool":
        if not isinstance(value, bool):
            raise SlimtuneError(f"{where}: expected true or false, got {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SlimtuneError(f"{where}: expected an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool):
            raise SlimtuneError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                raise SlimtuneError(f"{where}: expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise SlimtuneError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(value, os.PathLike):  # Python callers' pathlib.Path (files and flags give strings)
        value = os.fspath(value)
    if not isinstance(value, str):
        raise SlimtuneError(f"{where}: expected a string, got {value!r}")
    return value


def _article(base: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(base, base)
