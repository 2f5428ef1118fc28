"""The one-call functions of the Python API: `slimtune.apply_peft` and `slimtune.train`.

Both take the keyword names of `slimtune train`'s flags (`--lora-alpha` is `lora_alpha`) and check them with the same
rules (settings/train.py): a value out of range, a setting that does not apply, or an unknown name is a one-line
`SlimtuneError`, raised before any model or data is touched.
"""

from __future__ import annotations

from typing import Any

import torch

from slimtune import SlimtuneError


def apply_peft(model: torch.nn.Module, method: str = "lora", *, r: int = 8, lora_alpha: float = 16.0,
               lora_dropout: float = 0.0, target_modules: str | list[str] | None = None,
               pissa_niter: int | None = None, learn_scale: bool = False,
               svfit_relative: bool = True) -> torch.nn.Module:
    """Make `model` parameter-efficient; returns the model to train (only the new parameters are trainable).

    Methods: `lora` and `pissa` (Hugging Face peft; PiSSA initialises the adapter from the principal singular
    vectors), `adapter` (bottleneck adapters after the targeted layers), `svfit` (train only the top-r singular values
    of each targeted matrix: W = U diag(s * m) V^T with m trainable), `none` (every parameter trainable).

    Args:
        model: a transformers causal LM (or any module with nn.Linear layers).
        method: `lora`, `pissa`, `adapter`, `svfit` or `none`.
        r: LoRA/PiSSA rank, SVFit's number of singular values, the adapter's bottleneck.
        lora_alpha: LoRA/PiSSA scaling (the update is lora_alpha / r x B A).
        lora_dropout: LoRA/PiSSA dropout.
        target_modules: layer names (a list or "q_proj,v_proj"); None: a default per architecture.
        pissa_niter: PiSSA by randomized SVD with this many iterations (None: exact SVD).
        learn_scale: SVFit: also learn a scale per singular value.
        svfit_relative: SVFit: train multiplicative scales of the singular values (True) or the values themselves.
    """
    from slimtune.peft import PeftSettings
    from slimtune.peft import apply_peft as apply
    from slimtune.settings.python import check_keywords, in_python_terms, require_model

    require_model("slimtune.apply_peft", model)
    given = dict(peft=method, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                 pissa_niter=pissa_niter, learn_scale=learn_scale, svfit_relative=svfit_relative)
    # no optimizer here (the caller trains with their own, torch's AdamW as well as slimtune's): a setting that applies
    # to some optimizer (lora_dropout: the backprop ones) is the caller's to use
    checked = check_keywords("slimtune.apply_peft", given, {"peft": method}, unknown=("optimizer",))
    targets = [t.strip() for t in checked["target_modules"].split(",")] if checked["target_modules"] else None
    try:
        return apply(model, PeftSettings(method, checked["r"], checked["lora_alpha"], checked["lora_dropout"],
                                         targets, checked["pissa_niter"], checked["learn_scale"],
                                         checked["svfit_relative"]))
    except SlimtuneError as exc:  # the checks that need the model speak the CLI's flags
        raise SlimtuneError(in_python_terms("slimtune.apply_peft", str(exc), {"method": "peft"})) from None


def python_values(settings: dict, cls) -> dict:
    """A Python caller's keywords as the settings take them: None left out (as ZOArguments' None: not "null", which
    a setting that applies only to some optimizers refused for the others), numpy / torch scalars as the int or
    float they stand for, a tuple of names as a list."""
    from dataclasses import fields

    from slimtune.settings.python import python_value
    kinds = {f.name: f for f in fields(cls)}
    return {name: python_value(value, kinds[name]) for name, value in settings.items() if value is not None}


def train(config: str | None = None, **settings: Any) -> dict:
    """Run `slimtune train` from Python: the same settings (flag names with underscores), the same checks and the
    same run directory (`out`: metrics.jsonl, summary.json, checkpoint/, adapter/). Returns the run's summary.

        slimtune.train(data="train.tsv", eval_data="dev.tsv", optimizer="mezo", peft="lora", steps=500,
                       out="runs/zo")

    Args:
        config: a settings file (YAML/JSON/TOML with flag names as keys, or a run's config.json), as `--config`; keyword
            arguments override it.
        **settings: any `slimtune train` setting (`slimtune train --help` lists them): data, eval_data, out, model,
            task, optimizer, peft, r, lr, eps, steps, batch_size, epsilon, delta, resume, ...; `dry_run=True`
            resolves and checks them and returns the resolved configuration without training. As in the rest of
            the Python API, None means left out (the default, or the config file's value) whatever the optimizer,
            numbers may be numpy or torch scalars, and lists may be tuples.
    """
    from dataclasses import asdict, fields

    from slimtune.settings.train import TrainSettings
    from slimtune.train import prepare
    from slimtune.train import train as run_training

    import os

    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise SlimtuneError(f"slimtune.train: config is the path of a settings file, got {type(config).__name__}; "
                            "pass settings as keyword arguments (slimtune.train(**settings))")
    names = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise SlimtuneError(f"unknown setting {unknown[0]!r} for `slimtune train`")
    settings = python_values(settings, TrainSettings)
    # the command line's own path (commands/train.py): defaults < a resumed run's config.json < config < keywords
    from slimtune.commands.train import resumed_settings
    from slimtune.settings.cli import build_settings
    config = os.fspath(config) if config is not None else None
    base, base_given, base_origin = resumed_settings(settings, None, config)
    s = build_settings(TrainSettings, None, settings, config, base, base_given, base_origin)
    run_config = s.to_config()
    if s.dry_run:  # the command line's checks (a --resume's run, the output directory), as `slimtune train --dry-run`
        from slimtune.commands.train import checked_dry_run
        checked_dry_run(s, run_config)
        return asdict(run_config)
    return run_training(prepare(run_config, resume=s.resume, restart=s.restart))


__all__ = ["apply_peft", "train"]
