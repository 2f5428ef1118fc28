"""Predict peak training memory of optimizer x PEFT from the model config, batch and sequence length.

peak = runtime + weights + optimizer-specific terms:
- first order: gradients and optimizer state of the trainable parameters (AdamW: 2 moments) + activations kept
  for backward (every layer: ~ B*T*(c_h*H + c_i*I) values + attention probabilities B*heads*T^2);
- DP first order: + per-example gradients of the trainable parameters (Opacus grad_sample: B x trainable);
- zeroth order: no gradients, no state (LOZO-M: m x r momentum per matrix); activations are transient, one layer at a
  time (the peak of a forward pass), plus the z chunk buffer. HiZOO: + its fp32 diagonal Hessian (one value per
  trainable value); HiZOO-L: + row and column factors (~2 / hidden of the trainable values); sparse MeZO: + its
  bit-packed masks (1 bit per trainable value) and a second chunk buffer;
- hybrid (backprop through the top k blocks, ZO below): the ZO terms, plus what backprop keeps for the top k blocks
  only (their activations, as first order's per layer, and the head's logits) and the gradients and AdamW moments of
  the trainable parameters there (`fo_trainable`).
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


ZO_PLANNED = ("mezo", "lozo", "lozo-m", "fzoo", "dpzero", "dplozo", "hizoo", "hizoo-l", "dphizoo", "sparse-mezo")
CHUNKED_Z = ("mezo", "dpzero", "fzoo", "hizoo", "hizoo-l", "dphizoo", "sparse-mezo", "hybrid")  # a z chunk buffer


def predict_peak_mb(shape: ModelShape, optimizer: str, trainable_params: int, batch: int, seq_len: int,
                    runtime_mb: float = 0.0, bytes_per_value: int = 4, zo_chunk: int = 1 << 20,
                    lozo_rank: int = 2, fo_layers: int = 2, fo_trainable: int | None = None) -> dict:
    """Predicted peak memory (MB) and its parts. Hybrid: `fo_layers` blocks by backprop holding `fo_trainable` of
    the trainable values (None: the top blocks' share, fo_layers / layers)."""
    b = bytes_per_value
    weights = shape.total_params * b
    tokens = batch * seq_len
    logits = batch * shape.vocab * b  # only the last position is materialised (logits_to_keep=1)
    attn = batch * shape.heads * seq_len * seq_len * b
    zo_activations = tokens * (ACT_HIDDEN_ZO * shape.hidden + ACT_INTER_ZO * shape.intermediate) * b + attn + logits
    parts = {"runtime": runtime_mb * MB, "weights": weights}
    if optimizer in ZO_PLANNED:
        parts["activations"] = zo_activations
        parts["zo_buffer"] = min(zo_chunk, trainable_params) * b if optimizer in CHUNKED_Z else 0
        if optimizer == "lozo-m":
            parts["momentum"] = trainable_params * b * lozo_rank / max(shape.hidden, 1)
        if optimizer in ("hizoo", "dphizoo"):
            parts["hessian"] = trainable_params * 4  # fp32 whatever the weights' dtype
        if optimizer == "hizoo-l":
            parts["hessian"] = trainable_params * 4 * 2 / max(shape.hidden, 1)
        if optimizer == "sparse-mezo":
            parts["masks"] = trainable_params / 8
            parts["zo_buffer"] *= 2  # the drawn z and the masked z
    elif optimizer == "hybrid":
        top = fo_trainable if fo_trainable is not None else trainable_params * fo_layers / max(shape.layers, 1)
        parts["activations"] = zo_activations
        parts["fo_activations"] = fo_layers * (tokens * (ACT_HIDDEN_FO * shape.hidden + ACT_INTER_FO * shape.intermediate)
                                               * b + attn) + tokens * shape.hidden * b + 2 * logits
        parts["zo_buffer"] = min(zo_chunk, max(trainable_params - top, 0)) * b
        parts["gradients"] = top * b
        parts["optimizer_state"] = 2 * top * b
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
PLAN_OPTIMIZERS = ("adamw", "dp-adamw", "mezo", "lozo", "dpzero", "hybrid", "hizoo", "hizoo-l", "sparse-mezo")
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
    return peft_values(method, r, [tuple(dense_weight(m).shape) for _, m in layers])


def peft_values(method: str, r: int, shapes: list[tuple[int, int]]) -> int:
    """Trainable values `method` adds to layers of these (out, in) weight shapes."""
    if method in ("lora", "pissa"):
        return sum(r * (out + inp) for out, inp in shapes)
    if method == "svfit":
        return sum(min(r, out, inp) for out, inp in shapes)
    return sum(2 * out * r + r + out for out, _ in shapes)  # adapter: down (out->r) and up (r->out) with biases


def top_trainable_count(model, method: str, r: int, targets: list[str] | None = None, fo_layers: int = 2) -> int:
    """Trainable values `method` would put in the top `fo_layers` blocks and after them (the hybrid's backprop part)."""
    from slimtune.optim.hybrid import modules_after, parameter_users
    from slimtune.peft import tuner
    from slimtune.peft.registry import LAYER_TYPES, default_targets
    from slimtune.peft.svfit import dense_weight

    if method == "none":
        users = parameter_users(model)
        after = modules_after(model, fo_layers, [m for ms in users.values() for m in ms])
        return sum(p.numel() for p in model.parameters() if all(id(m) in after for m in users[id(p)]))
    layers = tuner.matching_modules(model, targets or default_targets(model, method), LAYER_TYPES)
    after = modules_after(model, fo_layers, [m for _, m in layers])
    return peft_values(method, r, [tuple(dense_weight(m).shape) for _, m in layers if id(m) in after])


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
                   targets: list[str] | None = None, fo_layers: int = 2) -> tuple[float, int]:
    """(predicted peak MB, trainable params) of `optimizer` + `method` on `model` (the base model, before PEFT);
    `fo_layers`: the hybrid's blocks trained by backprop."""
    trainable = trainable_count(model, method, r, targets)
    runtime = 0.0 if str(device).startswith("cuda") else RUNTIME_MB_CPU
    top = top_trainable_count(model, method, r, targets, fo_layers) if optimizer == "hybrid" else None
    peak = predict_peak_mb(ModelShape.from_model(model), optimizer, trainable, batch, seq_len, runtime,
                           fo_layers=fo_layers, fo_trainable=top)["peak_mb"]
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
