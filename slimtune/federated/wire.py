"""The wire format: LoRA states as ArrayRecord entries (fp32, or block-wise quantized codes + fp16 scales), and the
bytes a message costs as Flower sends it."""

from __future__ import annotations

import numpy as np
import torch

from slimtune.federated.quantization import QuantizedTensor, dequantize, quantize

FP32 = 32  # "bits" value meaning: no quantization (the non-private baseline)


def encode_state(state: dict[str, torch.Tensor], bits: int, block_size: int,
                 dither: dict[str, torch.Tensor] | None = None) -> tuple[dict, int]:
    """Arrays to send for `state` (quantized unless bits == 32; `dither`: a per-entry offset in normalised units
    added before rounding, see quantize) and their payload byte count."""
    arrays, nbytes = {}, 0
    for name, tensor in state.items():
        if bits == FP32:
            arrays[name] = tensor.detach().float().cpu().numpy()
            nbytes += arrays[name].nbytes
            continue
        q = quantize(tensor, bits, block_size, None if dither is None else dither[name])
        arrays[f"{name}::codes"], arrays[f"{name}::scales"] = q.packed, q.scales
        nbytes += q.nbytes
    return arrays, nbytes


def decode_state(arrays: dict, shapes: dict[str, tuple], bits: int, block_size: int) -> dict[str, torch.Tensor]:
    """Inverse of encode_state; raises ValueError naming the entry when something is missing or mis-shaped."""
    out = {}
    for name, shape in shapes.items():
        if bits == FP32:
            if name not in arrays:
                raise ValueError(f"missing array {name!r}")
            if np.asarray(arrays[name]).dtype != np.float32:
                raise ValueError(f"array {name!r} is {np.asarray(arrays[name]).dtype}, expected float32")
            value = torch.as_tensor(arrays[name]).float()
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"array {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
            out[name] = value
            continue
        codes, scales = arrays.get(f"{name}::codes"), arrays.get(f"{name}::scales")
        if codes is None or scales is None:
            raise ValueError(f"missing quantized array for {name!r}")
        n = int(np.prod(shape, dtype=np.int64))
        want = {"codes": (-(-n * bits // 8),), "scales": (-(-n // block_size),)}  # 1-D, exactly what encode makes
        for part, value, dtype in (("codes", codes, np.uint8), ("scales", scales, np.float16)):
            if np.asarray(value).dtype != dtype:
                raise ValueError(f"quantized array {name!r}::{part} is {np.asarray(value).dtype}, expected "
                                 f"{np.dtype(dtype).name}")
            if tuple(np.shape(value)) != want[part]:
                raise ValueError(f"quantized array {name!r}::{part} has shape {tuple(np.shape(value))}, expected "
                                 f"{want[part]} for shape {tuple(shape)}")
        out[name] = dequantize(QuantizedTensor(codes, scales, tuple(shape), bits, block_size))
    return out


def expected_keys(shapes: dict, bits: int) -> dict[str, type]:
    """The exact arrays an upload of `bits` carries, with their dtypes."""
    if bits == FP32:
        return {name: np.float32 for name in shapes}
    return {f"{name}::{part}": dtype for name in shapes for part, dtype in (("codes", np.uint8), ("scales", np.float16))}


def expected_arrays(shapes: dict, bits: int, block_size: int) -> dict[str, tuple[type, tuple]]:
    """The exact arrays an upload of `bits` carries: {key: (dtype, shape)}, the shapes decode_state checks (a reply's
    declared arrays are compared with these before any is decoded)."""
    if bits == FP32:
        return {name: (np.float32, tuple(int(d) for d in shape)) for name, shape in shapes.items()}
    out = {}
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64))
        out[f"{name}::codes"] = (np.uint8, (-(-n * bits // 8),))
        out[f"{name}::scales"] = (np.float16, (-(-n // block_size),))
    return out


def as_array(value):
    from flwr.app import Array
    return Array(np.ascontiguousarray(value))


def wire_bytes(message) -> int:
    """Bytes of a message as Flower 1.41 transmits it: the message is split into content-addressed objects (Message,
    RecordDict, records, Arrays, ArrayChunks), each pushed or pulled as its deflated bytes (header + protobuf body);
    an object appearing twice in one message travels once. gRPC/HTTP framing is not counted."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    return int(sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values()))
