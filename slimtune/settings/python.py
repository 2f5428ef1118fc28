"""Keyword arguments of the Python API checked by the rules of `slimtune train`'s settings (settings/train.py).

`slimtune.MeZO(model, lr=...)`, `slimtune.apply_peft(model, "lora", r=...)` and `slimtune.hf.ZOArguments` take the
same names as the flags (or say which flag a name stands for) and go through the same checks: the field's type,
its choices and range, and whether it applies to the rest of the settings. Nothing here duplicates a rule: each one
is read from the `TrainSettings` field that declares it.
"""

from __future__ import annotations

import itertools
import numbers
import operator
import re
from contextlib import contextmanager
from dataclasses import fields
from types import SimpleNamespace

from slimtune import SlimtuneError
from slimtune.settings.base import Spec, check_value, coerce, kind_of, spec_of
from slimtune.settings.train import TrainSettings

FIELDS = {f.name: f for f in fields(TrainSettings)}
DEFAULTS = TrainSettings.defaults()


def default(name: str):
    """The default of train setting `name` (what a Python keyword left out means)."""
    return DEFAULTS[name]


def argument(keyword: str, kind: str, **rules) -> tuple[str, object]:
    """An argument of the Python API that is not a train setting (slimtune.privacy.epsilon's `dataset_size`), or one
    whose rule differs there (a required `steps`): its type ("int", "float", "str", "int | None") and its `Spec`
    rules (low, high, choices, ...), for check_keywords' `extra`."""
    return keyword, SimpleNamespace(name=keyword, type=kind, metadata={"spec": Spec("", **rules)})


def python_value(value, f):
    """A Python caller's value for field `f` as the settings take it: a numpy / torch scalar as the int or float it
    stands for (`python_number`), a tuple of names as a list (target_modules=("q_proj", "v_proj"), as peft takes);
    anything else as it is, for coerce to judge."""
    base, _ = kind_of(f)
    if base in ("int", "float"):
        return python_number(value, base)
    if isinstance(value, tuple) and spec_of(f).list_of_str:
        return list(value)
    return value


def typed(owner: str, keyword: str, value, f):
    """`value` with exactly the type of field `f` (a train setting, or an `argument`), or a one-line error naming the
    keyword. Python callers pass typed values: a string for a number (lr="1e-3", noise_multiplier="1") is refused,
    as a list or a dict is wherever one value is expected (ZOArguments(optimizer=["mezo"]))."""
    base, _ = kind_of(f)
    if base in ("int", "float") and isinstance(value, str):
        raise SlimtuneError(f"{owner}: {keyword}={value!r}: expected {'an integer' if base == 'int' else 'a number'}, "
                            "got a string")
    value = python_value(value, f)
    try:
        return coerce(SimpleNamespace(name=keyword, type=f.type, metadata=f.metadata), value, None)
    except SlimtuneError as exc:  # coerce names the flag (--keyword): name the keyword
        raise SlimtuneError(in_python_terms(owner, str(exc))) from None


def python_number(value, base: str):
    """A number as numpy and torch hand it out, as the Python int or float it stands for (coerce then checks the
    type and the range as for any Python number): an integer through operator.index (np.int64, a 0-d integer
    tensor), a real through numbers.Real (np.float32) or a 0-d array's / tensor's .item(). Booleans (np.bool_, a
    bool tensor), complex numbers, strings and anything else are returned as they are, for coerce to refuse."""
    if value is None or isinstance(value, (bool, int, float, str)) or getattr(value, "ndim", 0) != 0:
        return value  # a 1-element array or tensor is a list of one, not a number
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)) and \
            not isinstance(value, numbers.Number):  # a 0-d torch tensor or numpy array: its one element
        try:
            value = value.item()
        except Exception:  # noqa: BLE001 - not a number after all: coerce names it
            return value
        if isinstance(value, (bool, int, float)):
            return value
    if _is_bool(value) or isinstance(value, complex) or (isinstance(value, numbers.Complex)
                                                        and not isinstance(value, numbers.Real)):
        return value
    if base == "int":
        try:
            return operator.index(value)
        except TypeError:
            return value
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            return value
    return value


def _is_bool(value) -> bool:
    """np.bool_ and the like: never a number here, whatever __index__ they have."""
    dtype = getattr(value, "dtype", None)
    return isinstance(value, bool) or type(value).__name__ in ("bool_", "bool") or "bool" in str(dtype or "")


def check_types(owner: str, values: dict, aliases: dict | None = None) -> dict:
    """Only the types of `values` ({keyword: value}, None: left out) as the train settings they stand for; returns
    them coerced (a dataclass of keywords checks its fields this way when it is built, the rest when it is used)."""
    aliases = aliases or {}
    out = {}
    for keyword, value in values.items():
        name = aliases.get(keyword, keyword)
        if name not in FIELDS:
            raise SlimtuneError(f"{owner}: unknown argument {keyword!r}")
        out[keyword] = None if value is None else typed(owner, keyword, value, FIELDS[name])
    return out


def check_keywords(owner: str, values: dict, context: dict, aliases: dict | None = None,
                   explicit: bool = False, extra: dict | None = None, unknown: tuple = ()) -> dict:
    """`values` ({keyword: value}) checked as the train settings they stand for; returns them coerced.

    owner: how to name the caller in messages ("slimtune.MeZO"); context: the other settings the applicability rules
    read (optimizer=..., peft=..., clipping=...); aliases: keyword -> setting name where they differ (LOZO's `rank`
    is `lozo_rank`). A value equal to the setting's default counts as not given (a keyword's default in a signature
    cannot be told from the same value passed), unless `explicit`: every value was given (None means left out, as in
    ZOArguments), and one that does not apply is refused as the flag would be. extra: keyword -> `argument(...)` for
    arguments that are not train settings, or whose rule differs for this caller (checked for type and range only).
    unknown: settings the caller has no value for (slimtune.apply_peft has no optimizer: the user's own trains it):
    a setting applies when its rule holds for some value of them."""
    aliases, extra = aliases or {}, extra or {}
    checked, names = {}, {}
    for keyword, value in values.items():
        name = aliases.get(keyword, keyword)
        if keyword not in extra and name not in FIELDS:
            raise SlimtuneError(f"{owner}: unknown argument {keyword!r}")
        f = extra.get(keyword) or FIELDS[name]
        raw, value = value, typed(owner, keyword, value, f)
        if value is not None:  # target_modules=[] or "": not the default layers, as `--target-modules ""` is not
            check_value(f"{owner}: {keyword}", value, spec_of(f), empty_given=True, keyword=True, as_given=raw,
                        leave=f", or leave {keyword} out (None) for the default")
        checked[keyword] = value
        if keyword not in extra:
            names[keyword] = name
    state = SimpleNamespace(**{**DEFAULTS, **context, **{names[k]: v for k, v in checked.items() if k in names}})
    for keyword, name in names.items():
        value, spec = checked[keyword], spec_of(FIELDS[name])
        given = value is not None if explicit else value != DEFAULTS[name]
        if spec.applies is not None and given and not _applies(spec.applies, state, unknown):
            now = spec.applies.current(state)  # the rule's words name flags: a Python caller gave keywords
            now = ", ".join(part for part in now.split(", ") if part and not any(  # not a value the caller has not
                part.startswith(f"--{n.replace('_', '-')} ") for n in unknown))
            raise SlimtuneError(in_python_terms(owner, f"{owner}: {keyword} applies only to {spec.applies.describe}"
                                                f"{f' (here: {now})' if now else ''}", aliases))
    return checked


def _applies(rule, state: SimpleNamespace, unknown: tuple) -> bool:
    """The rule holds for `state`, or (for settings in `unknown`) for some choice of their values."""
    if rule.test(state):
        return True
    choices = [spec_of(FIELDS[name]).choices or () for name in unknown]
    return any(rule.test(SimpleNamespace(**{**vars(state), **dict(zip(unknown, combo))}))
               for combo in itertools.product(*choices))


@contextmanager
def python_terms(owner: str, aliases: dict | None = None):
    """Errors raised inside (by code shared with the command line, whose messages name its flags: the accountant's
    "omit --noise-multiplier", "--n-spsa") re-raised in the Python caller's terms, starting with `owner`
    (`in_python_terms`)."""
    try:
        yield
    except SlimtuneError as exc:
        raise SlimtuneError(in_python_terms(owner, str(exc), aliases)) from None


def require_model(owner: str, model) -> None:
    """The model argument of the Python API: a torch module (a name or None failed deep inside with an
    AttributeError such as "'str' object has no attribute 'named_modules'")."""
    import torch

    if not isinstance(model, torch.nn.Module):
        hint = " (load it first: slimtune.models.load_model_and_tokenizer)" if isinstance(model, str) else ""
        raise SlimtuneError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}{hint}")


def in_python_terms(owner: str, message: str, aliases: dict | None = None) -> str:
    """A message written for the command line, for a Python caller: `--fo-layers 9` becomes `fo_layers=9`'s keyword
    (`fo_layers 9`), a leading `--optimizer NAME:` becomes `owner:`, and the message starts with `owner`."""
    keyword = {setting: kw for kw, setting in (aliases or {}).items()}
    message = re.sub(r"^--optimizer [\w-]+:\s*", "", message)
    message = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: keyword.get(m[1].replace("-", "_"), m[1].replace("-", "_")),
                     message)
    return message if message.startswith(owner) else f"{owner}: {message}"
