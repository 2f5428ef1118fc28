"""Parameter-efficient fine-tuning: one switch over LoRA / PiSSA (Hugging Face peft), bottleneck adapters and SVFit.

    model = apply_peft(model, PeftSettings(method="svfit", r=8))
    save_peft(model, "out/")            # peft's format for LoRA/PiSSA, safetensors + JSON for adapter/SVFit
    model = load_peft(base_model, "out/")
    dense = merge_peft(model)           # a plain transformers model
"""

from slimtune.peft.registry import (PEFT_METHODS, PeftSettings, apply_peft, default_targets, load_peft, merge_peft,
                                    peft_summary, save_peft)
from slimtune.peft.svfit import SVFitConfig, SVFitLinear
from slimtune.peft.adapter import AdapterConfig, BottleneckAdapter

__all__ = ["PEFT_METHODS", "PeftSettings", "apply_peft", "default_targets", "load_peft", "merge_peft", "peft_summary",
           "save_peft", "SVFitConfig", "SVFitLinear", "AdapterConfig", "BottleneckAdapter"]
