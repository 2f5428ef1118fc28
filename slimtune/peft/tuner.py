"""Shared machinery for slimtune's own tuners (SVFit, bottleneck adapters): wrap target layers, save, load, merge.

A tuner wraps each targeted layer in a module exposing `merged()` (the dense layer to deploy) and
`extra_state()`/`load_extra_state()` (the tensors needed to rebuild it on the base model). Saved as
`slimtune_adapter.safetensors` + `slimtune_adapter_config.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimtune import SlimtuneError

WEIGHTS = "slimtune_adapter.safetensors"
CONFIG = "slimtune_adapter_config.json"


def targets_module(name: str, target: str) -> bool:
    """peft's rule for a target given by name: the module's name is the target or ends with "." + target ("q_proj",
    or a dotted suffix of a module path such as "layers.28.self_attn.q_proj" for one block)."""
    return name == target or name.endswith("." + target)


def matching_modules(model: torch.nn.Module, targets: list[str], kinds: tuple) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) pairs that one of `targets` names (`targets_module`) and whose type is one of `kinds`."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, kinds) and any(targets_module(name, t) for t in targets)]


def replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def wrap(model, config, wrapper_cls, kinds) -> torch.nn.Module:
    found = matching_modules(model, list(config.target_modules), kinds)
    check_targets(model, config.method, list(config.target_modules), kinds, found)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in found:
        replace_module(model, name, wrapper_cls(module, config))
    model.slimtune_tuner = config
    return model


def layer_names(model: torch.nn.Module, kinds: tuple) -> list[str]:
    return sorted({name.split(".")[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)})


def check_targets(model, method: str, targets: list[str], kinds: tuple, found: list) -> None:
    """Every named target must be a layer of the model: a typo must not silently train less than asked."""
    missing = [t for t in targets if not any(targets_module(name, t) for name, _ in found)]
    if missing or not found:
        raise SlimtuneError(f"--target-modules {','.join(missing or targets)}: no such layer for --peft {method} in "
                            f"this model (its layers: {', '.join(layer_names(model, kinds))}; or a dotted suffix of "
                            "a module path, e.g. layers.0.self_attn.q_proj)")


def wrappers(model, wrapper_cls) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, wrapper_cls)]


def save(model, wrapper_cls, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in wrappers(model, wrapper_cls):
        for key, t in m.extra_state().items():
            tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
    _atomic(directory / WEIGHTS, lambda p: save_file(tensors, str(p)))
    _atomic(directory / CONFIG, lambda p: p.write_text(json.dumps(asdict(model.slimtune_tuner), indent=2)))


def check_finite(tensors: dict, path: str | Path) -> None:
    """Refuse adapter tensors holding NaN or inf (a damaged file, or a run that diverged): merged, evaluated or
    exported they make every output NaN, which nothing downstream reports."""
    for key, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()) \
                and not bool(torch.isfinite(tensor).all()):
            raise SlimtuneError(f"{path}: tensor {key} holds NaN or inf (a damaged adapter, or a run that diverged); "
                                "it is not loaded")


def load(model, config, wrapper_cls, kinds, directory: str | Path) -> torch.nn.Module:
    """Rebuild the wrapped layers from a saved adapter; every saved tensor must find its layer and vice versa."""
    weights = Path(directory) / WEIGHTS
    if not weights.exists():
        raise SlimtuneError(f"{directory}: {CONFIG} but no {WEIGHTS} (an incomplete adapter directory)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise SlimtuneError(f"{weights}: not a readable safetensors file ({exc})") from None
    check_finite(state, weights)
    found = matching_modules(model, list(config.target_modules), kinds)
    per_layer = {name: {k for k in state if k.startswith(name + ".")} for name, _ in found}
    unused = sorted(set(state) - set().union(*per_layer.values()))  # tensors no layer of this model takes
    bare = [name for name, keys in per_layer.items() if not keys]  # layers the file has nothing for
    if not found or unused or bare:
        example = (unused or bare or list(config.target_modules))[0]
        raise SlimtuneError(f"{directory}: adapter does not match this model (e.g. {example!r}); evaluate it on "
                            "the base model it was trained on")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in found:
        prefix = name + "."
        try:
            new = wrapper_cls(module, config, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        except (KeyError, RuntimeError) as exc:
            raise SlimtuneError(f"{directory}: adapter tensors for {name} do not fit this model "
                                f"({str(exc).splitlines()[0]})") from None
        replace_module(model, name, new)
    model.slimtune_tuner = config
    return model


def merge(model, wrapper_cls) -> torch.nn.Module:
    for name, m in wrappers(model, wrapper_cls):
        replace_module(model, name, m.merged())
    if hasattr(model, "slimtune_tuner"):
        del model.slimtune_tuner
    return model


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
