"""Run settings from a YAML/JSON file (`--config`), merged under the command line: flags always win.

A file holds flag names (`lr: 2e-3`, dashes or underscores) or a run's own `config.json` (the nested TrainConfig /
FederatedConfig it stores), so `slimtune train --config runs/x/config.json --out runs/y` re-runs x. Values are
converted by the same click types as the flags; an unknown key is a one-line error naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from slimtune import SlimtuneError

# config.json field -> flag name (the rest have the same name); None: the same setting as another flag, skipped
TRAIN_FIELDS = {
    "out_dir": "out", "train_data": "data", "optim.seed": None, "optim.rank": "lozo_rank", "optim.nu": "lozo_nu",
    "peft.method": "peft", "peft.alpha": "lora_alpha", "peft.dropout": "lora_dropout",
    "privacy.target_epsilon": "epsilon", "generation.eval_batch_size": None, "secret_key_file": None, "resumed": None,
}
FEDERATED_FIELDS = {"out_dir": "out", "num_clients": "clients", "dirichlet_alpha": "alpha"}


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SlimtuneError(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as exc:
        raise SlimtuneError(f"{path}: not valid JSON ({exc})") from None
    except Exception as exc:  # yaml.YAMLError and friends
        raise SlimtuneError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise SlimtuneError(f"{path}: expected a mapping of settings at the top level")
    return data


def flatten(values: dict, fields: dict, prefix: str = "") -> dict:
    """Nested config.json -> {flag_name: value}; plain flag files pass through (dashes become underscores)."""
    flat = {}
    for key, value in values.items():
        name = prefix + str(key).replace("-", "_")
        if name in fields and fields[name] is None:
            continue  # bookkeeping or a duplicate of another setting
        if isinstance(value, dict) and not prefix:  # a nested settings dataclass (optim, peft, privacy)
            flat.update(flatten(value, fields, name + "."))
        elif name == "progress":
            flat["quiet"] = not value
        elif not (name == "privacy" and value is None) and (target := fields.get(name, name.split(".")[-1])):
            flat[target] = ",".join(value) if isinstance(value, list) and target == "target_modules" else value
    return flat


def apply_config(ctx: click.Context, params: dict, path: str | None, fields: dict) -> dict:
    """params (the command's arguments) with the file's values for every option not given on the command line."""
    if not path:
        return params
    by_name = {p.name: p for p in ctx.command.params}
    for name, value in flatten(read_config_file(path), fields).items():
        if name == "config" or name not in by_name:
            raise SlimtuneError(f"{path}: unknown setting {name!r} for `slimtune {ctx.command.name}` "
                                f"(known: {', '.join(sorted(n for n in by_name if n != 'config'))})")
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            continue  # the flag wins
        param = by_name[name]
        if value is None and param.default is not None:
            continue  # null: not set (e.g. an older run's config.json), so the flag's default holds
        try:
            params[name] = None if value is None else param.type.convert(value, param, ctx)
        except click.BadParameter as exc:
            raise SlimtuneError(f"{path}: setting {name!r}: {exc.message}") from None
    return params
