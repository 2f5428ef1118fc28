"""What comes up: every field of a client's reply is checked, and anything unexpected rejects the reply (ValueError,
logged by the strategy) before it can touch theta. Bounding what an accepted reply may do is bounds.py's job."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from slimtune.federated.model import uploaded
from slimtune.federated.wire import decode_state, expected_arrays, expected_keys

MAX_EXAMPLES = 1e9  # a client claiming more examples than this is lying or broken
MAX_PROJECTED_GRAD = 1e6


def metric(metrics: MetricRecord, key: str, required: bool) -> float | None:
    """One finite number from a MetricRecord (lists, NaN and infinities are rejected); None if absent."""
    if key not in metrics:
        if required:
            raise ValueError(f"metric {key!r} is missing")
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"metric {key!r} must be one finite number, got {value!r}")
    return float(value)


PROTOCOL_RECORDS = {"arrays": ArrayRecord, "metrics": MetricRecord}  # a reply's records, all of them
PROTOCOL_METRICS = ("num-examples", "train-loss")  # a reply's metric keys, all of them (a private client sends none)


def check_records(content: RecordDict) -> tuple[ArrayRecord, MetricRecord]:
    """Exactly the records the protocol defines (a ClientApp's reply: client_app.train), and in 'metrics' no key but
    PROTOCOL_METRICS: padding of any kind rejects the reply before anything in it is decoded or counted."""
    keys = list(content.keys())
    extra = [k for k in keys if k not in PROTOCOL_RECORDS]
    if extra:
        raise ValueError(f"unexpected record {extra[0]!r} in the reply (it may hold only 'arrays' and 'metrics')")
    for key, kind in PROTOCOL_RECORDS.items():
        if key not in keys or not isinstance(content[key], kind):
            raise ValueError(f"reply needs an ArrayRecord 'arrays' and a MetricRecord 'metrics' (record {key!r})")
    metrics = content["metrics"]
    unknown = [k for k in metrics.keys() if k not in PROTOCOL_METRICS]
    if unknown:
        raise ValueError(f"unexpected metric {unknown[0]!r} (a reply's metrics are {', '.join(PROTOCOL_METRICS)})")
    return content["arrays"], metrics


def decode_arrays(arrays: ArrayRecord, expected: dict[str, tuple[tuple, tuple | int]]) -> dict[str, np.ndarray]:
    """The record's arrays as numpy, decoded only after its keys, and every array's declared dtype and shape and the
    header of its .npy bytes (dtype, shape, and exactly that many bytes of values), match `expected`: {key: (allowed
    dtypes, shape, or an int L: 1-D of at most L entries)}. Nothing is allocated for a reply that does not match."""
    keys = list(arrays.keys())
    if set(keys) != set(expected):
        extra, missing = sorted(set(keys) - set(expected)), sorted(set(expected) - set(keys))
        raise ValueError(f"unexpected array {extra[0]!r}" if extra else f"missing array {missing[0]!r}")
    for key, (dtypes, shape) in expected.items():
        arr = arrays[key]
        names = [np.dtype(d).name for d in dtypes]
        if not isinstance(arr, Array) or arr.stype != SType.NUMPY:
            raise ValueError(f"array {key!r} is not a numpy array")
        if str(arr.dtype) not in names:
            raise ValueError(f"array {key!r} has dtype {str(arr.dtype)[:20]}, expected {' or '.join(names)}")
        declared = tuple(arr.shape)
        fits = (declared == shape if isinstance(shape, tuple)
                else len(declared) == 1 and isinstance(declared[0], int) and 0 <= declared[0] <= shape)
        if not fits:
            raise ValueError(f"array {key!r} has shape {declared[:8]}, expected "
                             f"{shape if isinstance(shape, tuple) else f'1-D of at most {shape} entries'}")
        header = _npy_header(arr.data)
        if header is None or header[0] != declared or header[1] != np.dtype(str(arr.dtype)) or header[2]:
            raise ValueError(f"array {key!r}: its bytes are not the {str(arr.dtype)} array of shape {declared} it "
                             f"declares")
        size = int(np.prod(declared, dtype=np.int64)) * header[1].itemsize
        if len(arr.data) != header[3] + size:
            raise ValueError(f"array {key!r} carries {len(arr.data) - header[3]} bytes for {size} bytes of values")
        if header[3] > _canonical_header_bytes(declared, header[1], header[4]):  # padding a client's upload counts
            raise ValueError(f"array {key!r}: its .npy header is padded beyond what numpy writes")
    return {key: arrays[key].numpy() for key in expected}


def _canonical_header_bytes(shape: tuple, dtype: np.dtype, version: tuple) -> int:
    """The length of the .npy header (magic included) numpy writes for an array of this dtype and shape."""
    from io import BytesIO

    from numpy.lib import format as npy
    header = {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    stream = BytesIO()
    (npy.write_array_header_1_0 if version == (1, 0) else npy.write_array_header_2_0)(stream, header)
    return stream.tell()


def _npy_header(data: bytes) -> tuple[tuple, np.dtype, bool, int, tuple] | None:
    """(shape, dtype, fortran order, header length, format version) of .npy bytes as numpy writes them (format 1.0 or
    2.0), or None."""
    from io import BytesIO

    from numpy.lib import format as npy
    stream = BytesIO(data)
    try:
        version = npy.read_magic(stream)
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read is None:
            return None
        shape, fortran, dtype = read(stream)
    except (ValueError, TypeError, SyntaxError, OverflowError):
        return None
    return tuple(shape), dtype, bool(fortran), stream.tell(), version


def parse_reply(content: RecordDict, cfg, shapes: dict[str, tuple]) -> dict:
    """The reply as {"claimed": n or None, "loss": float or None, "bytes_up", and
    "delta" (LoRA) or "seeds"/"grads" (zo-seeds)}.

    records: exactly an ArrayRecord 'arrays' and a MetricRecord 'metrics'; metrics: no key but num-examples and
    train-loss. num-examples: absent, or a finite whole number in [1, MAX_EXAMPLES] (required only under --weighting
    examples); train-loss: absent or one finite number >= 0 (a private client sends none); arrays: exactly the
    expected keys with the expected dtypes and shapes, checked as declared before any is decoded; a delta must be
    finite and, if --max-update-norm > 0, of at most that L2 norm; zo-seeds: at most local_steps pairs of finite
    scalars with |g| <= MAX_PROJECTED_GRAD."""
    arrays, metrics = check_records(content)
    claimed = metric(metrics, "num-examples", required=cfg.weighting == "examples")
    if claimed is not None and not (1 <= claimed <= MAX_EXAMPLES and claimed == int(claimed)):
        raise ValueError(f"num-examples must be a whole number in [1, {MAX_EXAMPLES:.0e}], got {claimed}")
    loss = metric(metrics, "train-loss", required=False)
    if loss is not None and loss < 0:  # a cross-entropy is never negative
        raise ValueError(f"train-loss must be >= 0, got {loss}")
    if cfg.mode == "zo-seeds":
        raw = decode_arrays(arrays, {"seeds": ((np.int64,), cfg.local_steps),
                                     "grads": ((np.float32, np.float64), cfg.local_steps)})
        parsed = _parse_seeds(raw, cfg)
    else:
        sent = uploaded(shapes, cfg)  # FFA: B only
        raw = decode_arrays(arrays, {k: ((dtype,), shape)
                                     for k, (dtype, shape) in expected_arrays(sent, cfg.upload_bits,
                                                                             cfg.block_size).items()})
        parsed = {"delta": _parse_delta(raw, cfg, shapes)}
    return {"claimed": claimed, "loss": loss, "bytes_up": float(sum(v.nbytes for v in raw.values())), **parsed}


def _parse_seeds(raw: dict, cfg) -> dict:
    seeds, grads = raw.get("seeds"), raw.get("grads")
    if set(raw) != {"seeds", "grads"} or seeds.shape != grads.shape or seeds.ndim != 1:
        raise ValueError("zo-seeds reply needs exactly 1-D 'seeds' and 'grads' of equal length")
    if seeds.dtype != np.int64 or grads.dtype not in (np.float32, np.float64):
        raise ValueError(f"zo-seeds reply has dtypes {seeds.dtype}/{grads.dtype}, expected int64/float")
    if len(seeds) > cfg.local_steps:
        raise ValueError(f"{len(seeds)} (seed, scalar) pairs for {cfg.local_steps} local steps")
    if not np.isfinite(grads).all() or np.abs(grads).max(initial=0) > MAX_PROJECTED_GRAD:
        raise ValueError(f"non-finite or out-of-range projected gradient (|g| > {MAX_PROJECTED_GRAD:g})")
    return {"seeds": seeds.astype(np.int64), "grads": grads.astype(np.float64)}


def _parse_delta(raw: dict, cfg, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    sent = uploaded(shapes, cfg)  # FFA: B only
    expected = expected_keys(sent, cfg.upload_bits)
    if set(raw) != set(expected):
        extra, missing = sorted(set(raw) - set(expected)), sorted(set(expected) - set(raw))
        raise ValueError(f"unexpected array {extra[0]!r}" if extra else f"missing array {missing[0]!r}")
    for key, dtype in expected.items():
        if raw[key].dtype != dtype:
            raise ValueError(f"array {key!r} has dtype {raw[key].dtype}, expected {np.dtype(dtype)}")
    delta = decode_state(raw, sent, cfg.upload_bits, cfg.block_size)
    delta.update({k: torch.zeros(shape) for k, shape in shapes.items() if k not in sent})  # frozen: 0
    if not all(torch.isfinite(d).all() for d in delta.values()):
        raise ValueError("non-finite values in the update")
    if cfg.max_update_norm > 0:
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())).item()
        if norm > cfg.max_update_norm:
            raise ValueError(f"update norm {norm:.3g} exceeds --max-update-norm {cfg.max_update_norm:g}")
    return delta
