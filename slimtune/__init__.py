"""slimtune: fine-tune language models when memory and privacy are the constraints.

    import slimtune
    model = slimtune.apply_peft(model, "lora", r=8)
    opt = slimtune.MeZO(model)                          # lr, eps: the defaults table's values for LoRA
    out = opt.step(lambda: model(**batch).loss)         # forward passes only

The names below are imported on first use, so `import slimtune` stays cheap (no torch until you touch them).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def _stay_off_the_hub() -> None:
    """slimtune never reaches the Hugging Face Hub: no downloads, no telemetry, no agent-registry lookup (which
    transformers/TRL trigger through huggingface_hub's request headers). huggingface_hub reads HF_HUB_OFFLINE and
    HF_HUB_DISABLE_TELEMETRY once, when it is first imported; a setting the user made wins. If it was imported before
    slimtune (e.g. `import transformers` first), the constants it read are corrected for what slimtune set here."""
    ours = [var for var in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY") if var not in os.environ]
    for var in ours:
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        for var in ours:
            setattr(constants, var, True)


_stay_off_the_hub()

# `import peft` imports bitsandbytes whenever it is installed (the extra "quant"), and bitsandbytes' CPU backend then
# logs that an optional kernels-hub package is missing; slimtune never downloads kernels: keep runs quiet
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class SlimtuneError(Exception):
    """A user-facing error: the message says what is wrong and where (file, line, field)."""


# public name -> the module that defines it
_LAZY = {
    **{name: "slimtune.optimizers" for name in ("MeZO", "LOZO", "FZOO", "HiZOO", "HiZOOL", "SparseMeZO", "Hybrid",
                                                  "DPZero", "DPLOZO", "DPHiZOO", "DPHybrid",
                                                  "ZerothOrderOptimizer", "PrivateOptimizer", "StepOutput")},
    "apply_peft": "slimtune.api",
    **{name: "slimtune.peft" for name in ("read_adapter", "write_adapter")},
    "peft_kind": "slimtune.optimizers",
}
_SUBMODULES = ("privacy", "hf", "train", "optimizers", "api", "peft", "models", "data", "optim", "zo", "settings")

__all__ = ["SlimtuneError", "__version__", "MeZO", "LOZO", "FZOO", "HiZOO", "HiZOOL", "SparseMeZO", "Hybrid",
           "DPZero", "DPLOZO", "DPHiZOO", "DPHybrid", "ZerothOrderOptimizer", "PrivateOptimizer", "StepOutput",
           "apply_peft", "read_adapter", "write_adapter", "peft_kind",
           "train", "privacy", "hf"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:  # slimtune.train is a module you can call: slimtune.train(data=..., out=...)
        return importlib.import_module(f"slimtune.{name}")
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from slimtune import hf, privacy, train
    from slimtune.api import apply_peft
    from slimtune.optimizers import peft_kind
    from slimtune.peft import read_adapter, write_adapter
    from slimtune.optimizers import (DPHiZOO, DPHybrid, DPLOZO, DPZero, FZOO, HiZOO, HiZOOL, LOZO, Hybrid, MeZO,
                                     PrivateOptimizer, SparseMeZO, StepOutput, ZerothOrderOptimizer)
