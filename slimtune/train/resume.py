"""Resume is exact or refused: a resumed run trains what its config.json says, nothing else.

`prepare(config, resume=True)` first fills every setting the caller left unset (None) from the run's config.json, then
compares every setting with it. A difference in anything that shapes the trajectory (model, data, task, optimizer and
its hyper-parameters, PEFT, privacy, batch size, seed, lengths, dtype, ...) is refused with the list of differences.
What the settings name is checked too: the data files' contents, a model directory's weights, a private run's key,
the checkpoint's run and the library versions, against the fingerprint the checkpoint records (train/fingerprint.py);
a damaged checkpoint file is refused in one line naming it.
A setting the run did not record (it predates the setting) counts as its default. Only these may change, and each
change is recorded in config.json under "resumed" (step, old -> new); a longer or shorter `steps` also stretches the
learning-rate schedule from the checkpoint on (a decaying schedule's later steps use other rates than the first run
would have: that is what extending a run means):
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

from slimtune import SlimtuneError
from slimtune.data.readers import same_path

# settings a resume may change: how long to train (and so the schedule's length), when to evaluate/checkpoint and what
# is printed
MAY_CHANGE = ("steps", "eval_every", "checkpoint_every", "patience", "progress", "force", "out_dir")
__doc__ += "".join(f"\n- `{name}`" for name in MAY_CHANGE)


def flat(values: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1} (the keys of a stored config.json)."""
    out = {}
    for key, value in values.items():
        if key == "resumed" and not prefix:  # config.json's own history of resumes, not a setting
            continue
        name = prefix + key
        if isinstance(value, dict) and key in ("optim", "peft", "privacy", "generation"):
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def as_json(config) -> dict:
    return json.loads(json.dumps(asdict(config), default=str))


def read_stored(run_dir: Path) -> dict | None:
    from slimtune.train.run_dir import read_record
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    try:
        stored = json.loads(read_record(path))
    except (ValueError, UnicodeDecodeError):
        raise SlimtuneError(f"{path}: not valid JSON; cannot check what the run was trained with") from None
    if not isinstance(stored, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(stored), "a number")
        raise SlimtuneError(f"{path}: holds {kind}, not a run's settings (a JSON object); cannot check what the run "
                            f"was trained with") from None
    return as_trained(stored)


# What a run used where its config.json, written before the value was resolved into it, records null: the builders'
# constants of that time (frozen here: a later change to the defaults must not change what an old run resumes with)
# setting -> (the optimizers that read it, the value they used)
USED_FOR_NULL = {"sparsity": (("sparse-mezo",), 0.75), "mask_every": (("sparse-mezo",), 50),
                 "fo_layers": (("hybrid", "dphybrid"), 2), "fo_clip": (("dphybrid",), 1.0)}


# The prompts of the built-in tasks before runs recorded them (config.json template / label_words null): SST-2's changed
# to "Review: ... Sentiment:" negative/positive afterwards (data/tasks.py); frozen here, as USED_FOR_NULL
PROMPT_FOR_NULL = {"sst2": ("{sentence} It was", "0=terrible,1=great"),
                   "rte": ('{sentence1}\nDoes this mean that "{sentence2}" is true? Yes or No?\n', "0=Yes,1=No")}


def as_trained(stored: dict) -> dict:
    """A stored config with what the run trained with where older versions recorded something else: the prompt of a
    built-in task (PROMPT_FOR_NULL); null for a method's own setting (USED_FOR_NULL); for FZOO, gaussian (it always drew
    Rademacher directions then) and n_spsa 1 (its N was 8 then whenever --n-spsa was not above 1)."""
    if stored.get("task") in PROMPT_FOR_NULL:
        for name, used in zip(("template", "label_words"), PROMPT_FOR_NULL[stored["task"]]):
            if stored.get(name) is None:
                stored[name] = used
    optim = stored.get("optim")
    if not isinstance(optim, dict):
        return stored
    optimizer = stored.get("optimizer")
    for name, (users, used) in USED_FOR_NULL.items():
        if optimizer in users and optim.get(name) is None:
            optim[name] = used
    if optimizer == "fzoo" and optim.get("perturbation") == "gaussian":
        optim["perturbation"] = "rademacher"
    if optimizer == "fzoo" and optim.get("n_spsa") == 1:
        optim["n_spsa"] = 8
    return stored


def adopt_unset(config, stored: dict, groups: dict | None = None) -> None:
    """Every setting left None in `config` (nested dataclasses included) takes the stored value; `groups` maps a
    nested group left None (e.g. "privacy") to the dataclass that rebuilds it from its stored dict."""
    for name, cls in (groups or {}).items():
        if getattr(config, name, None) is None and isinstance(stored.get(name), dict):
            known = {f.name for f in fields(cls)}
            setattr(config, name, cls(**{k: v for k, v in stored[name].items() if k in known}))
    _adopt(config, stored)
    if getattr(config, "optimizer", None) == "fzoo" and getattr(config.optim, "n_spsa", None) == 1:
        config.optim.n_spsa = (stored.get("optim") or {}).get("n_spsa", 1)  # 1 is FZOO's "unset" (defaults.resolve
        # makes it 8 and records the 8): the run's own N, as a None would take it


def _adopt(obj, stored: dict) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value) and isinstance(stored.get(f.name), dict):
            _adopt(value, stored[f.name])
        elif value is None and stored.get(f.name) is not None and not isinstance(stored[f.name], dict):
            setattr(obj, f.name, stored[f.name])


def differences(config, stored: dict) -> tuple[list[str], dict]:
    """(refused differences as 'name: stored -> new', allowed changes {name: [old, new]})."""
    new_nested = as_json(config)
    refused, allowed = [], {}
    for group in ("privacy", "generation"):  # a whole group present in one and None in the other
        if (stored.get(group) is None) != (new_nested.get(group) is None) and group in stored:
            refused.append(f"{group}: {'none' if stored.get(group) is None else 'set'} -> "
                           f"{'none' if new_nested.get(group) is None else 'set'}")
    new, old = flat(new_nested), flat(stored)
    defaults = flat(as_json(type(config)(out_dir="", train_data="")))  # what a run that did not record a setting used
    for name in sorted(set(new) | set(old)):
        if name not in old:  # a setting newer than the run: it trained with the field's default
            if name in defaults and not _same(defaults[name], new.get(name)) and name not in MAY_CHANGE:
                refused.append(f"{name}: not recorded by the run (so {defaults[name]!r}) -> {new.get(name)!r}")
            continue
        a, b = old.get(name), new.get(name)
        if _same(a, b) or (name in PATH_SETTINGS and same_path(a, b)):
            continue
        if name in MAY_CHANGE:
            allowed[name] = [a, b]
        else:
            refused.append(f"{name}: {a!r} -> {b!r}")
    return refused, allowed


PATH_SETTINGS = ("train_data", "eval_data", "model", "secret_key_file")  # compared as files, not as strings


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_resume(config, run_dir: Path) -> dict:
    """Refuse a resume whose settings differ from the run's, or whose data, model, key or checkpoint are not what the
    run was trained with (its checkpoint's fingerprint, train/fingerprint.py); a damaged trainer state is one line.
    Returns the allowed changes (to record)."""
    from slimtune.train import fingerprint
    from slimtune.train.checkpoint import resumed_state
    from slimtune.train.run_dir import read_status
    stored = read_stored(run_dir)
    if stored is None:
        raise SlimtuneError(f"{run_dir}: no config.json, so the settings of the run cannot be checked; it cannot be "
                            "resumed")
    state = resumed_state(run_dir)
    done = None if state is None else state["step"]
    if done is not None and config.steps is not None and config.steps < done:
        raise SlimtuneError(f"--steps {config.steps}: the run at {run_dir} is already at step {done} (its checkpoint); "
                            f"a resume goes on from there: give --steps {done} or more, or leave --steps out")
    refused, allowed = differences(config, stored)
    if refused:
        shown = "; ".join(refused[:6]) + (f"; and {len(refused) - 6} more" if len(refused) > 6 else "")
        raise SlimtuneError(f"--resume {run_dir}: settings differ from the run's config.json ({shown}); a resumed "
                            f"run trains exactly what it started with (only {', '.join(MAY_CHANGE[:-1])} may change)")
    if state is not None and isinstance(state.get("fingerprint"), dict):  # checkpoints of older versions: none
        allowed.update(fingerprint.check(config, Path(run_dir), state["fingerprint"], read_status(run_dir)))
    return allowed
