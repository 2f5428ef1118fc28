"""Parameter-efficient fine-tuning: one switch over LoRA / PiSSA (Hugging Face peft), bottleneck adapters and SVFit.

    model = apply_peft(model, PeftSettings(method="svfit", r=8))
    save_peft(model, "out/")            # peft's format for LoRA/PiSSA, safetensors + JSON for adapter/SVFit
    model = load_peft(base_model, "out/")
    write_adapter(model, tokenizer, "run/adapter", meta=adapter_meta("tiny-llama"))   # + tokenizer, base record
    write_adapter(model, tokenizer, "run/adapter", meta=adapter_meta_of(model))       # the record, read off the model
    model, tokenizer = read_adapter("run/adapter", "tiny-llama")                      # the run's model, checked
    dense = merge_peft(model)           # a plain transformers model
"""

from slimtune.peft.registry import (PEFT_METHODS, PeftSettings, adapter_meta, adapter_meta_of, apply_peft,
                                    default_targets, load_peft, merge_peft, peft_summary, read_adapter, save_peft,
                                    write_adapter)
from slimtune.peft.svfit import SVFitConfig, SVFitLinear
from slimtune.peft.adapter import AdapterConfig, BottleneckAdapter

__all__ = ["PEFT_METHODS", "PeftSettings", "adapter_meta", "adapter_meta_of", "apply_peft", "default_targets",
           "load_peft", "merge_peft", "peft_summary", "read_adapter", "save_peft", "write_adapter", "SVFitConfig", "SVFitLinear", "AdapterConfig",
           "BottleneckAdapter"]
