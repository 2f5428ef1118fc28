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

Precision (issue 38): `dtype` sets the bytes of the weights, activations, gradients and optimizer state (bf16: 2);
LoRA / PiSSA adapters stay fp32 on a bf16 base (peft casts adapters up), and the bf16 ZO sweeps add two fp32-sized
chunk buffers (zo/precision.py). A quantized base (`base_quant` int8 / int4, models/quantize.py) stores the blocks'
linear weights in 1 or 0.5 + 1/16 bytes each (the LM head and embeddings stay in `dtype`) and adds one dequantized
layer of transient memory (its largest linear weight in `dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from slimtune.optim.methods import HYBRID, METHOD_CONSTANTS, METHODS, OPTIMIZERS, WITH_SOURCES, ZEROTH_ORDER

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
    quantizable: int = 0  # weights of the linear layers a quantized base stores in int8 / int4 (all but the LM head)
    largest_linear: int = 0  # the largest of those layers (its dequantized copy is transient memory)

    @classmethod
    def from_model(cls, model) -> "ModelShape":
        """From a model (dense, quantized, or on the meta device): values counted as the dense model has them."""
        from slimtune.models.quantize import layer_shape, quantized_layers

        c = getattr(model, "config", None)
        c = c.get_text_config() if hasattr(c, "get_text_config") else c
        sizes = [a * b for a, b in (layer_shape(m) for _, m in quantized_layers(model))]
        packed = {id(m.weight) for _, m in quantized_layers(model)}
        total = sum(p.numel() for p in model.parameters() if id(p) not in packed) + sum(sizes)
        return cls(total, c.hidden_size, getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                   c.num_hidden_layers, c.num_attention_heads, c.vocab_size, sum(sizes), max(sizes, default=0))


ZO_PLANNED, HYBRIDS = ZEROTH_ORDER, HYBRID
FO_LAYERS = METHOD_CONSTANTS["fo_layers"]  # the hybrid's blocks by backprop when a caller does not say
CHUNKED_Z = WITH_SOURCES  # ZO methods with a perturbation source draw z chunk by chunk into one buffer


def predict_peak_mb(shape: ModelShape, optimizer: str, trainable_params: int, batch: int, seq_len: int,
                    runtime_mb: float = 0.0, bytes_per_value: int = 4, zo_chunk: int = 1 << 20,
                    lozo_rank: int = 2, fo_layers: int = FO_LAYERS, fo_trainable: int | None = None,
                    base_quant: str | None = None, trainable_bytes: int | None = None,
                    sgd_momentum: bool = False) -> dict:
    """Predicted peak memory (MB) and its parts. Hybrid: `fo_layers` blocks by backprop holding `fo_trainable` of
    the trainable values (None: the top blocks' share, fo_layers / layers). `bytes_per_value`: the dtype's bytes;
    `trainable_bytes`: the trainable values' (default: the same; LoRA on a bf16 base: 4); `base_quant`: int8 / int4
    linear weights (frozen); `sgd_momentum`: SGD / DP-SGD keep a momentum buffer (one value per trainable value);
    `lozo_rank`: LOZO-M's momentum rank."""
    from slimtune.models.quantize import bytes_per_weight

    b = bytes_per_value
    tb = trainable_bytes or b
    if base_quant is None:
        weights = shape.total_params * b
    else:
        weights = (shape.total_params - shape.quantizable) * b + shape.quantizable * bytes_per_weight(base_quant, b)
    if tb != b:  # adapters kept at another precision than the base (not counted in total_params' dtype)
        weights += trainable_params * (tb - b) if optimizer != "inference" else 0
    tokens = batch * seq_len
    logits = batch * shape.vocab * b  # only the last position is materialised (logits_to_keep=1)
    attn = batch * shape.heads * seq_len * seq_len * b
    zo_activations = tokens * (ACT_HIDDEN_ZO * shape.hidden + ACT_INTER_ZO * shape.intermediate) * b + attn + logits
    parts = {"runtime": runtime_mb * MB, "weights": weights}
    if base_quant is not None:
        parts["dequantized_layer"] = shape.largest_linear * b
    b_act, b = b, tb  # below: activations in the dtype, gradients / state / z in the trainable values' precision
    if optimizer in ZO_PLANNED:
        parts["activations"] = zo_activations
        parts["zo_buffer"] = min(zo_chunk, trainable_params) * b if optimizer in CHUNKED_Z else 0
        if b < 4:  # bf16 / fp16 sweeps: an fp32 chunk and its stochastic-rounding bits (zo/precision.py)
            parts["zo_buffer"] += min(zo_chunk, trainable_params) * 8
        if optimizer == "lozo-m":
            parts["momentum"] = trainable_params * b * lozo_rank / max(shape.hidden, 1)
        if optimizer in ("hizoo", "dphizoo"):
            parts["hessian"] = trainable_params * 4  # fp32 whatever the weights' dtype
        if optimizer == "hizoo-l":
            parts["hessian"] = trainable_params * 4 * 2 / max(shape.hidden, 1)
        if optimizer == "sparse-mezo":
            parts["masks"] = trainable_params / 8
            parts["zo_buffer"] *= 2  # the drawn z and the masked z
    elif optimizer in HYBRIDS:
        top = fo_trainable if fo_trainable is not None else trainable_params * fo_layers / max(shape.layers, 1)
        parts["activations"] = zo_activations
        parts["fo_activations"] = fo_layers * (tokens * (ACT_HIDDEN_FO * shape.hidden + ACT_INTER_FO * shape.intermediate)
                                               * b_act + attn) + tokens * shape.hidden * b_act + 2 * logits
        parts["zo_buffer"] = min(zo_chunk, max(trainable_params - top, 0)) * b
        parts["gradients"] = top * b
        parts["optimizer_state"] = 2 * top * b
        if optimizer == "dphybrid":  # Opacus: per-example gradients of the top part, their clipped sum, the noise
            parts["per_example_gradients"] = batch * top * b + top * (b + 8)
    elif optimizer in ("inference",):
        parts["activations"] = zo_activations
    else:
        state = {"adamw": 2, "dp-adamw": 2, "sgd": int(sgd_momentum), "dp-sgd": int(sgd_momentum)}[optimizer]
        parts["gradients"] = trainable_params * b
        parts["optimizer_state"] = state * trainable_params * b
        parts["activations"] = shape.layers * (tokens * (ACT_HIDDEN_FO * shape.hidden + ACT_INTER_FO * shape.intermediate)
                                               * b_act + attn) + tokens * shape.hidden * b_act + 2 * logits
        if optimizer.startswith("dp-"):
            parts["per_example_grads"] = batch * trainable_params * b
    parts_mb = {k: v / MB for k, v in parts.items()}
    return {"peak_mb": sum(parts_mb.values()), "parts_mb": parts_mb}


# -- planning: what fits here ---------------------------------------------------------------------------------------
RUNTIME_MB_CPU = 420.0  # measured process baseline (interpreter + torch + transformers): benchmarks/memory_model.py
PLAN_OPTIMIZERS = OPTIMIZERS  # every optimizer train takes (optim/methods.py's one table)
PLAN_PEFT = ("none", "lora", "pissa", "svfit", "adapter")
HEADROOM = 0.9  # plan to use at most 90% of what is available


def trainable_count(model, method: str, r: int, targets: list[str] | None = None) -> int:
    """Trainable parameters `method` would give `model` (default target layers unless given; nothing is applied)."""
    from slimtune.models.quantize import layer_shape
    from slimtune.peft import tuner
    from slimtune.peft.registry import LAYER_TYPES, default_targets

    if method == "none":
        return ModelShape.from_model(model).total_params
    layers = tuner.matching_modules(model, targets or default_targets(model, method), LAYER_TYPES)
    return peft_values(method, r, [layer_shape(m) for _, m in layers])


def peft_values(method: str, r: int, shapes: list[tuple[int, int]]) -> int:
    """Trainable values `method` adds to layers of these (out, in) weight shapes."""
    if method in ("lora", "pissa"):
        return sum(r * (out + inp) for out, inp in shapes)
    if method == "svfit":
        return sum(min(r, out, inp) for out, inp in shapes)
    return sum(2 * out * r + r + out for out, _ in shapes)  # adapter: down (out->r) and up (r->out) with biases


def top_trainable_count(model, method: str, r: int, targets: list[str] | None = None,
                        fo_layers: int = FO_LAYERS) -> int:
    """Trainable values `method` would put in the top `fo_layers` blocks and after them (the hybrid's backprop part)."""
    from slimtune.models.quantize import layer_shape
    from slimtune.optim.hybrid import modules_after, parameter_users
    from slimtune.peft import tuner
    from slimtune.peft.registry import LAYER_TYPES, default_targets

    if method == "none":
        try:
            users = parameter_users(model)
            after = modules_after(model, fo_layers, [m for ms in users.values() for m in ms])
        except Exception:  # noqa: BLE001  (the meta device cannot run the call-order probe)
            return top_count_by_structure(model, fo_layers)
        return sum(p.numel() for p in model.parameters() if all(id(m) in after for m in users[id(p)]))
    layers = tuner.matching_modules(model, targets or default_targets(model, method), LAYER_TYPES)
    after = modules_after(model, fo_layers, [m for _, m in layers])
    return peft_values(method, r, [layer_shape(m) for _, m in layers if id(m) in after])


def top_count_by_structure(model, fo_layers: int) -> int:
    """Full parameters of the top `fo_layers` blocks and of what is neither a block nor an embedding (the final
    norm, an untied LM head; a head tied to the embedding is used below, so it is not top): the call-order probe's
    answer for a decoder, from the module tree alone (a config planned on the meta device)."""
    import torch
    from slimtune.optim.hybrid import transformer_blocks

    blocks = transformer_blocks(model)
    inside = {id(p) for p in blocks.parameters()} | {id(p) for m in model.modules()
                                                       if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    top_blocks = sum(p.numel() for block in list(blocks)[-fo_layers:] for p in block.parameters())
    return top_blocks + sum(p.numel() for p in model.parameters() if id(p) not in inside)


def available_mb(device: str) -> float:
    """Memory this process may still use plus what it already holds: free GPU memory, or MemAvailable + own RSS."""
    import torch
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return (free + torch.cuda.memory_allocated()) / MB
    from slimtune.train.metrics import process_memory_mb
    with open("/proc/meminfo") as f:
        meminfo = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    return int(meminfo["MemAvailable"].split()[0]) / 1024 + process_memory_mb("VmRSS")


def budget_mb(device: str, processes: int = 1) -> float:
    """HEADROOM of what one of `processes` data-parallel ranks on this machine (this process among them) may use: on
    CPU the ranks share MemAvailable plus what they hold now (each rank's memory is already missing from
    MemAvailable), an equal share each."""
    available = available_mb(device)
    if processes == 1 or str(device).startswith("cuda"):
        return available * HEADROOM
    from slimtune.train.metrics import process_memory_mb
    own = process_memory_mb("VmRSS")
    return (available - own + ranks_rss_mb(processes, own)) / processes * HEADROOM


def ranks_rss_mb(processes: int, own: float) -> float:
    """What this machine's `processes` data-parallel ranks hold now: the VmRSS of this process and its siblings
    (torchrun's agent starts the ranks as its children); `processes` x this one's where they cannot be read."""
    import os
    try:
        parent = os.getppid()
        with open(f"/proc/{parent}/task/{parent}/children") as children:
            pids = children.read().split()
        if len(pids) != processes or str(os.getpid()) not in pids:
            return processes * own
        total = 0.0
        for pid in pids:
            with open(f"/proc/{pid}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
        return total
    except (OSError, StopIteration, ValueError):
        return processes * own


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes' import on top of RUNTIME_MB_CPU (its CPU library and ops; measured +117 MB RSS): runs on a quantized
# base import it, and so does `import peft` (LoRA, PiSSA) whenever the extra "quant" is installed
RUNTIME_MB_BNB = 117.0
# what a run touches after its imports and the memory check (the libraries' code pages its forward and backward
# passes run, the progress display, small allocations): measured +23 to +31 MB RSS in a fresh venv on tiny-llama for
# MeZO, LOZO, HiZOO, AdamW, the hybrid and DP-AdamW (+12 to +21 MB in an older venv of the same files); planned 64
RUNTIME_MB_RUN = 64.0


def runtime_mb(model, device: str, base_quant: str | None = None, held: float | None = None) -> float:
    """The process baseline of a run in this process: 0 for CUDA allocated memory; on CPU, what this process holds
    beyond the model's own resident tensors (`held`, default held_mb: interpreter and libraries as this machine maps
    them, tokenizer, data rows, anything else a Python session keeps), at least the library baseline measured when the
    model was written (RUNTIME_MB_CPU, + bitsandbytes' import), plus what a run touches after the check
    (RUNTIME_MB_RUN). A constant alone is not an upper bound: the libraries' resident pages differ between machines and
    installs (a fresh venv's torch maps ~55 MB more here than an older one of the same files)."""
    if str(device).startswith("cuda"):
        return 0.0
    library = RUNTIME_MB_CPU + (RUNTIME_MB_BNB if imports_bitsandbytes(base_quant) else 0.0)
    return max(library, held_mb(model, device) if held is None else held) + RUNTIME_MB_RUN


def held_mb(model, device: str) -> float:
    """What this process holds now beyond `model`'s resident tensors (CPU; 0 on CUDA)."""
    if str(device).startswith("cuda"):
        return 0.0
    from slimtune.train.metrics import process_memory_mb
    return process_memory_mb("VmRSS") - resident_tensor_mb(model)


def resident_tensor_mb(model) -> float:
    """MB of the model's parameters and buffers resident in this process (each storage once; meta tensors hold none):
    the part of its RSS the prediction counts as weights, not as runtime. Each storage counts the pages of its own
    address range that are present in this process (/proc/self/pagemap's present bit): a checkpoint's memory-mapped
    weights are not resident until a forward pass touches them. Without pagemap, every storage counts in full."""
    import itertools
    storages = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.device.type == "cpu":
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    present = _present_bytes(storages.items())
    return (sum(storages.values()) if present is None else present) / MB


def _present_bytes(ranges) -> float | None:
    """Bytes of the address ranges [(start, length)] whose pages are present in this process's memory (bit 63 of
    each page's /proc/self/pagemap entry; pages at a range's ends count in proportion); None where pagemap cannot be
    read (not Linux)."""
    import os

    import numpy as np
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0.0
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            for start, length in ranges:
                if length <= 0:
                    continue
                first, last = start // page, (start + length - 1) // page
                pagemap.seek(first * 8)
                entries = np.frombuffer(pagemap.read((last - first + 1) * 8), dtype="<u8")
                if len(entries) != last - first + 1:
                    return None
                present = (entries >> np.uint64(63)).astype(bool)
                total += present.sum() * page
                # the ends: only the range's own bytes of its first and last page
                total -= present[0] * (start - first * page) + present[-1] * ((last + 1) * page - (start + length))
    except (OSError, ValueError):
        return None
    return total


def imports_bitsandbytes(base_quant: str | None) -> bool:
    import importlib.util
    # every run imports peft (the adapter checks), and peft imports bitsandbytes wherever it is installed
    return base_quant is not None or importlib.util.find_spec("bitsandbytes") is not None


def trainable_bytes(method: str, dtype: str) -> int:
    """Bytes per trainable value: LoRA / PiSSA adapters are fp32 on any base (peft casts them up), the rest in dtype."""
    return 4 if method in ("lora", "pissa") else DTYPE_BYTES[dtype]


def predict_run_mb(model, optimizer: str, method: str, r: int, batch: int, seq_len: int, device: str,
                   targets: list[str] | None = None, fo_layers: int = FO_LAYERS, dtype: str = "float32",
                   base_quant: str | None = None, runtime: float | None = None, momentum: float = 0.0,
                   lozo_rank: int = 2) -> tuple[float, int]:
    """(predicted peak MB, trainable params) of `optimizer` + `method` on `model` (the base model, before PEFT: dense,
    quantized or on the meta device) with weights in `dtype` and the linear layers in `base_quant`;
    `fo_layers`: the hybrid's blocks trained by backprop; `runtime`: the process baseline (default runtime_mb);
    `momentum`: SGD's (a buffer when > 0); `lozo_rank`: LOZO-M's."""
    trainable = trainable_count(model, method, r, targets)
    cuda = str(device).startswith("cuda")
    if runtime is None:
        runtime = runtime_mb(model, device, base_quant)
    top = None
    if optimizer in HYBRIDS:
        try:
            top = top_trainable_count(model, method, r, targets, fo_layers)
        except Exception:  # a model on the meta device cannot run the call-order probe: the blocks' share
            top = None
    from slimtune.zo.mezo import default_chunk_size
    shape = ModelShape.from_model(model)
    if method != "none":  # the adapter's own values sit beside the base's (`plan --r 10**11` fitted in 548 MB)
        shape = replace(shape, total_params=shape.total_params + trainable)
    peak = predict_peak_mb(shape, optimizer, trainable, batch, seq_len, runtime,
                           zo_chunk=default_chunk_size("cuda" if cuda else "cpu"),
                           bytes_per_value=DTYPE_BYTES[dtype], fo_layers=fo_layers, fo_trainable=top,
                           base_quant=base_quant, trainable_bytes=trainable_bytes(method, dtype),
                           sgd_momentum=bool(momentum), lozo_rank=lozo_rank)["peak_mb"]
    return peak, trainable


def plan_rows(model, batch: int, seq_len: int, device: str, r: int = 8, dtype: str = "float32",
              base_quant: str | None = None, fo_layers: int = FO_LAYERS, targets: list[str] | None = None,
              held: float | None = None) -> list[dict]:
    """Predicted peak (MB) for every optimizer x PEFT pair of the planner, and whether it fits here (a quantized base
    takes LoRA only: the other PEFT methods are left out then). `held`: runtime_mb's measured part, if read."""
    from slimtune.models.quantize import check_quantizable
    from slimtune.optim.first_order import dtype_refusal  # train's refusal of backprop on 16-bit weights
    if base_quant is not None:
        check_quantizable(model, base_quant)  # train refuses it too
    budget = budget_mb(device)
    runtime = runtime_mb(model, device, base_quant, held)  # read once: every row from the same process baseline
    rows = []
    for method in PLAN_PEFT if base_quant is None else ("lora",):
        rank_refusal = peft_refusal(model, method, r)
        for optimizer in PLAN_OPTIMIZERS:
            refused = rank_refusal or dtype_refusal(optimizer, method, dtype)
            refused_by = "--r" if rank_refusal else "--dtype" if refused else None
            peak, trainable = predict_run_mb(model, optimizer, method, r, batch, seq_len, device, targets,
                                             dtype=dtype, base_quant=base_quant, fo_layers=fo_layers, runtime=runtime)
            rows.append({"optimizer": optimizer, "peft": method, "trainable_params": trainable, "peak_mb": peak,
                         "fits": peak <= budget and refused is None, "budget_mb": budget, "dtype": dtype,
                         "base_quant": base_quant,
                         **({"refused": refused, "refused_by": refused_by} if refused else {}),
                         **({"fo_layers": fo_layers} if optimizer in HYBRIDS else {})})
    return rows


def peft_refusal(model, method: str, r: int) -> str | None:
    """Why `slimtune train` would refuse this PEFT method at rank r on this model (registry.check_rank_fits: PiSSA's r
    singular vectors per layer), or None: the planner never says a run fits that train refuses."""
    from slimtune import SlimtuneError
    from slimtune.peft import PeftSettings
    from slimtune.peft.registry import check_rank_fits

    try:
        check_rank_fits(model, PeftSettings(method, r=r))
    except SlimtuneError as exc:
        return str(exc)
    return None


# Methods in the order of the quality they are expected to reach (best first): backprop before forward-only
# (MeZO trails fine-tuning by a few points in its paper and in this repo's Defaults table), full-parameter before
# LoRA within a family, the hybrid between them, a dense base before int8 before int4 (QLoRA-style bases lose a little
# with each halving). Each is tried in the run's dtype, then (from fp32) in bf16.
QUALITY_ORDER = (("adamw", "none", None), ("adamw", "lora", None), ("hybrid", "lora", None), ("mezo", "none", None),
                 ("mezo", "lora", None), ("adamw", "lora", "int8"), ("mezo", "lora", "int8"),
                 ("adamw", "lora", "int4"), ("mezo", "lora", "int4"))
# A private run is offered private methods only, in the same order: each family's DP counterpart (the same
# accountant and sampler; dropping --epsilon is never the planner's advice).
PRIVATE_COUNTERPART = {"adamw": "dp-adamw", "hybrid": "dphybrid", "mezo": "dpzero"}


def quality_order(private: bool = False) -> tuple:
    """QUALITY_ORDER, or its private counterparts for a private run."""
    if not private:
        return QUALITY_ORDER
    return tuple((PRIVATE_COUNTERPART[o], m, q) for o, m, q in QUALITY_ORDER)


def ranked_methods(model, batch: int, seq_len: int, device: str, r: int = 8, dtype: str = "float32",
                   fo_layers: int = FO_LAYERS, targets: list[str] | None = None,
                   held: float | None = None, private: bool = False) -> list[dict]:
    """Every candidate of QUALITY_ORDER x {dtype, bf16}, in quality order, with its predicted peak and whether it
    fits; the first that fits is the planner's choice. fp16 is a CUDA dtype: never proposed on CPU. `held`:
    runtime_mb's measured part, if read; `private`: the private counterparts only (quality_order)."""
    from slimtune.optim.first_order import dtype_refusal  # train's refusal of backprop on 16-bit weights
    budget = budget_mb(device)
    held = held_mb(model, device) if held is None else held
    dtypes = [dtype] + (["bfloat16"] if dtype == "float32" else [])
    from slimtune.models.quantize import quantizable
    order = quality_order(private)
    if not quantizable(model):  # nothing a quantized base would quantize (GPT-2's Conv1D): dense rows only
        order = tuple(row for row in order if row[2] is None)
    runtimes = {quant: runtime_mb(model, device, quant, held) for quant in {q for _, _, q in order}}
    rows = []
    for optimizer, method, quant in order:
        for dt in dtypes:
            if dtype_refusal(optimizer, method, dt):
                continue  # backprop trains float32 weights: train refuses it
            peak, trainable = predict_run_mb(model, optimizer, method, r, batch, seq_len, device, targets, dtype=dt,
                                             base_quant=quant, fo_layers=fo_layers, runtime=runtimes[quant])
            rows.append({"optimizer": optimizer, "peft": method, "dtype": dt, "base_quant": quant, "peak_mb": peak,
                         "trainable_params": trainable, "fits": peak <= budget, "budget_mb": budget,
                         **({"fo_layers": fo_layers} if optimizer in HYBRIDS else {})})
    return rows


def as_flags(row: dict, batch_size: int | None = None, max_length: int | None = None, r: int | None = None) -> str:
    """The `slimtune train` flags of a planner row; with the shape it was planned at (`slimtune plan`'s --batch-size,
    --max-length, --r), those too: train's own defaults differ (--max-length 256 against plan's 128), and a row
    copied without them trains another shape than the one that was found to fit."""
    flags = f"--optimizer {row['optimizer']} --peft {row['peft']}"
    if r is not None and row["peft"] != "none":  # train takes --r for every PEFT method but none
        flags += f" --r {r}"
    if batch_size is not None:
        flags += f" --batch-size {batch_size}"
    if max_length is not None:
        flags += f" --max-length {max_length}"
    if row.get("dtype", "float32") != "float32":
        flags += f" --dtype {row['dtype']}"
    if row.get("base_quant"):
        flags += f" --base-quant {row['base_quant']}"
    if row.get("fo_layers", FO_LAYERS) != FO_LAYERS:
        flags += f" --fo-layers {row['fo_layers']}"
    return flags


SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "max_position_embeddings", "head_dim")


def model_for_planning(name_or_path: str):
    """The model `slimtune plan` sizes: a config.json file or a checkpoint directory is built on the meta device from
    its config (no weights read, any size); names (smollm2, gemma3-270m, tiny models) are loaded as for training."""
    from pathlib import Path

    p = Path(name_or_path)
    config_file = p if p.is_file() else p / "config.json"
    if p.exists() and config_file.is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from slimtune import SlimtuneError
        from slimtune.models.loading import first_line
        from slimtune.settings.rules import check_not_prequantized, is_whole
        check_not_prequantized(config_file, f"--model {name_or_path}")
        try:
            config = AutoConfig.from_pretrained(str(config_file))
        except Exception as exc:  # unreadable, unknown model_type, or refused by transformers' validators
            raise SlimtuneError(f"--model {name_or_path}: not a usable transformers config ({first_line(exc)})") \
                from None
        for field in SIZE_FIELDS:  # transformers builds a model of -2 layers; every size must be a whole number >= 1
            value = getattr(config, field, None)
            if value is not None and not is_whole(value):
                raise SlimtuneError(f"--model {config_file}: field {field!r} is {value!r}; must be a whole number "
                                    ">= 1")
        try:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
        except Exception as exc:  # an encoder-decoder's config (T5), or sizes transformers refuses
            raise SlimtuneError(f"--model {name_or_path}: its config cannot be built as a causal LM "
                                f"({first_line(exc)})") from None
    from slimtune.models import load_model_and_tokenizer
    return load_model_and_tokenizer(name_or_path, texts=["plan"])[0]


def check_fits(model, optimizer: str, method: str, r: int, batch: int, seq_len: int, device: str,
               targets: list[str] | None = None, fo_layers: int = FO_LAYERS, dtype: str = "float32",
               base_quant: str | None = None, processes: int = 1, momentum: float = 0.0, lozo_rank: int = 2) -> None:
    """Raise a one-line SlimtuneError when the run is predicted not to fit here, naming the best method that does
    (ranked_methods: expected quality first, with its dtype and base) and the optimizer x PEFT pairs that fit at the
    run's own dtype and base (for a private optimizer, private ones only). `processes`: data-parallel ranks sharing
    this machine's memory, each at `batch`; `momentum`, `lozo_rank`: the run's SGD momentum and LOZO-M rank."""
    from slimtune import SlimtuneError

    held = held_mb(model, device)  # read once: the run and every alternative from the same process baseline
    peak, _ = predict_run_mb(model, optimizer, method, r, batch, seq_len, device, targets, fo_layers, dtype, base_quant,
                             runtime=runtime_mb(model, device, base_quant, held), momentum=momentum,
                             lozo_rank=lozo_rank)  # the run's own optimizer state
    budget = budget_mb(device, processes)
    if peak <= budget:
        return
    private = METHODS[optimizer].private  # a private run is offered private methods only
    best = next((row for row in ranked_methods(model, batch, seq_len, device, r, dtype, fo_layers, targets, held,
                                               private) if row["peak_mb"] <= budget), None)  # at this process's share
    fitting = [f"{row['optimizer']}+{row['peft']} ({row['peak_mb']:,.0f} MB)"
               for row in plan_rows(model, batch, seq_len, device, r, dtype, base_quant, fo_layers, targets, held)
               if row["peak_mb"] <= budget and "refused" not in row and METHODS[row["optimizer"]].private == private]
    suggestion = f"best that fits: {as_flags(best)} ({best['peak_mb']:,.0f} MB); " if best else ""
    ranks = f" (each of {processes} data-parallel ranks on this machine)" if processes > 1 else ""
    raise SlimtuneError(f"{optimizer}+{method} at batch {batch} x {seq_len} tokens is predicted to peak at "
                        f"{peak:,.0f} MB{ranks}, over the {budget:,.0f} MB available here; {suggestion}"
                        f"what fits: {', '.join(fitting) or 'nothing (lower --batch-size or --max-length)'}; "
                        "--force to try anyway")
