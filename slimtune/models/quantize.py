"""A quantized, frozen base (`--base-quant int8|int4`): the transformer blocks' linear layers stored in 8 or 4 bits,
LoRA (fp32 on any base dtype: peft casts adapters up) trained on top, every forward pass through the quantized weights.

Library: bitsandbytes (`pip install "slimtune[quant]"`). Why it and not the others:
- it is maintained for CPU and GPU from one wheel: the bitsandbytes foundation's releases ship a CPU backend
  (libbitsandbytes_cpu.so, AVX-512 int8 matmul through torch._int_mm, fused 4-bit kernels) beside the CUDA/ROCm/XPU
  ones, so `--base-quant` runs the same layers on both;
- peft wraps its Linear8bitLt / Linear4bit with LoRA natively (QLoRA), and transformers never imports it unless asked:
  a run without `--base-quant` prints and loads nothing of it (its one import-time notice, about an optional
  kernels-hub package, is silenced here);
- torchao (PyTorch's) was the other maintained candidate, but 0.18's compiled extensions do not load with torch 2.13
  (it prints library-load failures and torch warnings on import) and transformers imports torchao whenever it is
  installed, i.e. on every run; optimum-quanto is in maintenance mode since November 2025.

Formats: int8 = LLM.int8()'s per-row absmax int8 weights (threshold 0: no fp16 outlier columns; the matmul quantizes
activations per row too), 1 byte per weight + one fp32 scale per row; int4 = NF4 (4-bit NormalFloat, QLoRA's format:
16 levels at the quantiles of N(0, 1), one absmax per block of 64 weights), 0.5 byte + 4/64 byte per weight. The LM
head and embeddings stay in the model's dtype (as in QLoRA). Quantization is per layer, in place, from the dense
weights: the dense layer is freed once its quantized copy exists.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from slimtune import SlimtuneError

BASE_QUANTS = ("int8", "int4")
BLOCK_4BIT = 64
SKIPPED = ("lm_head",)  # kept in the model's dtype (and tied embeddings with it)


def bytes_per_weight(kind: str | None, dtype_bytes: int) -> float:
    """Bytes one quantized linear weight takes, scales included (None: the dense dtype)."""
    if kind is None:
        return float(dtype_bytes)
    if kind == "int8":
        return 1.0  # + one fp32 scale per row (counted per layer by the planner as negligible)
    return 0.5 + 4 / BLOCK_4BIT


def import_bitsandbytes():
    """bitsandbytes, imported quietly (its CPU backend logs a notice when the optional `kernels` hub package is
    missing; slimtune never downloads kernels), or a one-line error naming the extra to install."""
    # also silences its per-call notice that int8 matmuls cast bf16 inputs to fp16 (documented above)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise SlimtuneError('--base-quant needs bitsandbytes: pip install "slimtune[quant]"') from None
    return bitsandbytes


def check_base_quant(kind: str | None, peft: str) -> None:
    """One-line errors before anything is loaded."""
    if kind is None:
        return
    if kind not in BASE_QUANTS:
        raise SlimtuneError(f"--base-quant {kind!r}: choose int8 or int4")
    if peft != "lora":
        raise SlimtuneError(f"--base-quant {kind} trains LoRA on top of a frozen quantized base: use --peft lora "
                            f"(not {peft})")
    import_bitsandbytes()


def quantizable(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers that get quantized: all but the LM head."""
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and name.split(".")[-1] not in SKIPPED]


def check_quantizable(model: nn.Module, kind: str) -> None:
    """Refuse --base-quant for a model with no layer it would quantize (GPT-2's blocks are transformers' Conv1D): the
    base would stay dense while the run recorded it quantized (train, and the planner's --base-quant table)."""
    if not quantizable(model):
        raise SlimtuneError(f"--base-quant {kind}: {type(model).__name__} has no nn.Linear layers in its blocks to "
                            "quantize (GPT-2-family blocks are Conv1D); the base would stay dense: leave --base-quant "
                            "out")


def quantize_base(model: nn.Module, kind: str, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the blocks' linear layers by bitsandbytes' int8 / NF4 layers, one at a time, and freeze the model."""
    bnb = import_bitsandbytes()
    check_quantizable(model, kind)
    for name, layer in quantizable(model):
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], quantized_linear(bnb, layer, kind, compute_dtype))
        release_freed_memory()
    for p in model.parameters():
        p.requires_grad_(False)
    model.slimtune_base_quant = kind
    return model


def quantized_linear(bnb, layer: nn.Linear, kind: str, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """The bitsandbytes copy of `layer` (quantized on its device; the dense weight is released)."""
    device = layer.weight.device
    weight = layer.weight.data
    bias = layer.bias is not None
    compute = compute_dtype or weight.dtype
    with torch.device("meta"):
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=0.0)
        else:
            q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, compute_dtype=compute,
                                  quant_type="nf4", quant_storage=torch.uint8)
    if kind == "int8":
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=block_size(layer))
    if bias:
        q.bias = nn.Parameter(layer.bias.data.to(compute), requires_grad=False)
    if kind == "int4" and (layer.out_features % 32 or layer.in_features % BLOCK_4BIT):
        q.support_avx512bf16_for_cpu = False  # the fused CPU kernel needs whole 32-row and 64-column tiles
    q = q.to(device)  # bitsandbytes quantizes on the move to a real device
    layer.weight = None
    if kind == "int4" and device.type == "cpu":
        trim_after_first_forward(q)
    return q


def trim_after_first_forward(layer: nn.Module) -> None:
    """bitsandbytes' CPU NF4 layer repacks its weight for the fused kernel on its first no-grad forward, through
    int32 temporaries of 8 bytes per weight; freed, they stay in the heap (glibc's mmap threshold has risen), so the
    first forward would leave every layer's temporaries resident (measured: +13% of the dense bf16 model's size at
    1B and 3B, Llama-shaped). Trimming once after each layer's first forward keeps the peak at the planner's
    prediction."""
    def hook(module, args, output):
        release_freed_memory()
        handle.remove()

    handle = layer.register_forward_hook(hook)


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the OS (glibc's malloc_trim). Freed dense layers of a few MB are otherwise
    kept by the allocator (its mmap threshold rises after the first frees), and a quantized model built layer by
    layer would keep the dense model's high-water mark as resident memory."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def block_size(layer: nn.Linear) -> int:
    """NF4's absmax block: 64 (QLoRA's), or 32 for layers narrower than that (tiny test models): bitsandbytes' CPU
    kernels need whole blocks per row."""
    return BLOCK_4BIT if layer.in_features % BLOCK_4BIT == 0 else 32


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers a quantized base stores in int8 / int4: bitsandbytes' layers once quantized, the quantizable
    nn.Linear layers of a dense model otherwise (what --base-quant would quantize)."""
    found = [(name, m) for name, m in model.named_modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")]
    return found or quantizable(model)


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, dense or quantized (a packed 4-bit weight does not have the layer's shape)."""
    if hasattr(layer, "out_features") and hasattr(layer, "in_features"):
        return layer.out_features, layer.in_features
    from slimtune.peft.svfit import dense_weight
    return tuple(dense_weight(layer).shape)
