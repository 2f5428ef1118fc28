"""Predict peak training memory of optimizer x PEFT from the model config, batch and sequence length.

peak = runtime + weights + optimizer-specific terms:
- first order: gradients and optimizer state of the trainable parameters (AdamW: 2 moments) + activations kept
  for backward (every layer: ~ B*T*(c_h*H + c_i*I) values + attention probabilities B*heads*T^2);
- DP first order: + per-example gradients of the trainable parameters (Opacus grad_sample: B x trainable);
- zeroth order: no gradients, no state (LOZO-M: m x r momentum per matrix); activations are transient, one layer at a
  time (the peak of a forward pass), plus the z chunk buffer.
`runtime` is the process baseline (interpreter + libraries: RSS on CPU) or 0 for CUDA allocated memory.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 2**20
ACT_HIDDEN_FO, ACT_INTER_FO = 16, 3  # values kept per token per layer for backward (llama block, rough)
ACT_HIDDEN_ZO, ACT_INTER_ZO = 4, 3  # live values per token in one layer's forward


@dataclass
class ModelShape:
    total_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int

    @classmethod
    def from_model(cls, model) -> "ModelShape":
        c = model.config
        return cls(sum(p.numel() for p in model.parameters()), c.hidden_size,
                   getattr(c, "intermediate_size", None) or 4 * c.hidden_size, c.num_hidden_layers,
                   c.num_attention_heads, c.vocab_size)


def predict_peak_mb(shape: ModelShape, optimizer: str, trainable_params: int, batch: int, seq_len: int,
                    runtime_mb: float = 0.0, bytes_per_value: int = 4, zo_chunk: int = 1 << 20,
                    lozo_rank: int = 2) -> dict:
    """Predicted peak memory (MB) and its parts."""
    b = bytes_per_value
    weights = shape.total_params * b
    tokens = batch * seq_len
    logits = batch * shape.vocab * b  # only the last position is materialised (logits_to_keep=1)
    attn = batch * shape.heads * seq_len * seq_len * b
    parts = {"runtime": runtime_mb * MB, "weights": weights}
    if optimizer in ("mezo", "lozo", "lozo-m", "fzoo", "dpzero", "dplozo"):
        parts["activations"] = tokens * (ACT_HIDDEN_ZO * shape.hidden + ACT_INTER_ZO * shape.intermediate) * b + attn + logits
        parts["zo_buffer"] = min(zo_chunk, trainable_params) * b if optimizer in ("mezo", "dpzero", "fzoo") else 0
        if optimizer == "lozo-m":
            parts["momentum"] = trainable_params * b * lozo_rank / max(shape.hidden, 1)
    elif optimizer in ("inference",):
        parts["activations"] = tokens * (ACT_HIDDEN_ZO * shape.hidden + ACT_INTER_ZO * shape.intermediate) * b + attn + logits
    else:
        state = {"adamw": 2, "dp-adamw": 2, "sgd": 0, "dp-sgd": 0}[optimizer]
        parts["gradients"] = trainable_params * b
        parts["optimizer_state"] = state * trainable_params * b
        parts["activations"] = shape.layers * (tokens * (ACT_HIDDEN_FO * shape.hidden + ACT_INTER_FO * shape.intermediate)
                                               * b + attn) + tokens * shape.hidden * b + 2 * logits
        if optimizer.startswith("dp-"):
            parts["per_example_grads"] = batch * trainable_params * b
    parts_mb = {k: v / MB for k, v in parts.items()}
    return {"peak_mb": sum(parts_mb.values()), "parts_mb": parts_mb}


# -- planning: what fits here ---------------------------------------------------------------------------------------
RUNTIME_MB_CPU = 420.0  # measured process baseline (interpreter + torch + transformers): benchmarks/memory_model.py
PLAN_OPTIMIZERS = ("adamw", "dp-adamw", "mezo", "lozo", "dpzero")
PLAN_PEFT = ("none", "lora", "pissa", "svfit", "adapter")
HEADROOM = 0.9  # plan to use at most 90% of what is available


def trainable_count(model, method: str, r: int, targets: list[str] | None = None) -> int:
    """Trainable parameters `method` would give `model` (default target layers unless given; nothing is applied)."""
    from slimtune.peft import tuner
    from slimtune.peft.registry import LAYER_TYPES, default_targets
    from slimtune.peft.svfit import dense_weight

    if method == "none":
        return sum(p.numel() for p in model.parameters())
    layers = tuner.matching_modules(model, targets or default_targets(model, method), LAYER_TYPES)
    shapes = [tuple(dense_weight(m).shape) for _, m in layers]
    if method in ("lora", "pissa"):
        return sum(r * (out + inp) for out, inp in shapes)
    if method == "svfit":
        return sum(min(r, out, inp) for out, inp in shapes)
    return sum(2 * out * r + r + out for out, _ in shapes)  # adapter: down (out->r) and up (r->out) with biases


def available_mb(device: str) -> float:
    """Memory this process may still use plus what it already holds: free GPU memory, or MemAvailable + own RSS."""
    import torch
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return (free + torch.cuda.memory_allocated()) / MB
    import resource
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (int(meminfo["MemAvailable"].split()[0]) + rss_kb) / 1024


def budget_mb(device: str) -> float:
    return available_mb(device) * HEADROOM


def predict_run_mb(model, optimizer: str, method: str, r: int, batch: int, seq_len: int, device: str,
                   targets: list[str] | None = None) -> tuple[float, int]:
    """(predicted peak MB, trainable params) of `optimizer` + `method` on `model` (the base model, before PEFT)."""
    trainable = trainable_count(model, method, r, targets)
    runtime = 0.0 if str(device).startswith("cuda") else RUNTIME_MB_CPU
    peak = predict_peak_mb(ModelShape.from_model(model), optimizer, trainable, batch, seq_len, runtime)["peak_mb"]
    return peak, trainable


def plan_rows(model, batch: int, seq_len: int, device: str, r: int = 8) -> list[dict]:
    """Predicted peak (MB) for every optimizer x PEFT pair of the planner, and whether it fits here."""
    budget = budget_mb(device)
    rows = []
    for method in PLAN_PEFT:
        for optimizer in PLAN_OPTIMIZERS:
            peak, trainable = predict_run_mb(model, optimizer, method, r, batch, seq_len, device)
            rows.append({"optimizer": optimizer, "peft": method, "trainable_params": trainable, "peak_mb": peak,
                         "fits": peak <= budget, "budget_mb": budget})
    return rows
