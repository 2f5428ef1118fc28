"""Keyword arguments of the Python API checked by the rules of `slimtune train`'s settings (settings/train.py).

`slimtune.MeZO(model, lr=...)`, `slimtune.apply_peft(model, "lora", r=...)` and `slimtune.hf.ZOArguments` take the
same names as the flags (or say which flag a name stands for) and go through the same checks: the field's type,
its choices and range, and whether it applies to the rest of the settings. Nothing here duplicates a rule: each one
is read from the `TrainSettings` field that declares it.
"""

from __future__ import annotations

import re
from dataclasses import fields
from types import SimpleNamespace

from slimtune import SlimtuneError
from slimtune.settings.base import check_value, coerce, spec_of
from slimtune.settings.train import TrainSettings

FIELDS = {f.name: f for f in fields(TrainSettings)}
DEFAULTS = TrainSettings.defaults()


def default(name: str):
    """The default of train setting `name` (what a Python keyword left out means)."""
    return DEFAULTS[name]


def check_keywords(owner: str, values: dict, context: dict, aliases: dict | None = None,
                   explicit: bool = False) -> dict:
    """`values` ({keyword: value}) checked as the train settings they stand for; returns them coerced.

    owner: how to name the caller in messages ("slimtune.MeZO"); context: the other settings the applicability rules
    read (optimizer=..., peft=..., clipping=...); aliases: keyword -> setting name where they differ (LOZO's `rank`
    is `lozo_rank`). A value equal to the setting's default counts as not given (a keyword's default in a signature
    cannot be told from the same value passed), unless `explicit`: every value was given (None means left out, as in
    ZOArguments), and one that does not apply is refused as the flag would be."""
    aliases = aliases or {}
    checked, names = {}, {}
    for keyword, value in values.items():
        name = aliases.get(keyword, keyword)
        if name not in FIELDS:
            raise SlimtuneError(f"{owner}: unknown argument {keyword!r}")
        f, spec = FIELDS[name], spec_of(FIELDS[name])
        raw, value = value, coerce(f, value, owner)
        if value is not None:  # target_modules=[] or "": not the default layers, as `--target-modules ""` is not
            check_value(f"{owner}: {keyword}", value, spec, empty_given=True, keyword=True, as_given=raw,
                        leave=f", or leave {keyword} out (None) for the default")
        checked[keyword], names[keyword] = value, name
    state = SimpleNamespace(**{**DEFAULTS, **context, **{names[k]: v for k, v in checked.items()}})
    for keyword, value in checked.items():
        spec = spec_of(FIELDS[names[keyword]])
        given = value is not None if explicit else value != DEFAULTS[names[keyword]]
        if spec.applies is not None and given and not spec.applies.test(state):
            now = spec.applies.current(state)  # the rule's words name flags: a Python caller gave keywords
            raise SlimtuneError(in_python_terms(owner, f"{owner}: {keyword} applies only to {spec.applies.describe}"
                                                f"{f' (here: {now})' if now else ''}", aliases))
    return checked


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
