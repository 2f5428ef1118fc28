"""Block-wise absmax quantization to b bits with normal-float levels (NF4 generalised to 1..8 bits).

Each block of `block_size` values is scaled by its absolute maximum into [-1, 1] and rounded to the nearest of 2^b
levels placed at quantiles of N(0, 1) (QLoRA's construction: an exact zero, 2^(b-1) positive and 2^(b-1)-1 negative
levels, normalised so the extremes are +-1). Codes are bit-packed, scales kept in fp16 with only `bits` significant
bits (`coarse_scales`, rounded up so every scaled value stays within [-1, 1]). Error per element <= scale * (largest
gap between adjacent levels) / 2, scale < absmax (1 + 2^-bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NF_OFFSET = 0.9677  # QLoRA's offset: the outermost quantile used


def nf_levels(bits: int) -> torch.Tensor:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits == 1:
        return torch.tensor([-1.0, 1.0])
    normal = torch.distributions.Normal(0.0, 1.0)
    half = 2 ** (bits - 1)
    pos = normal.icdf(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1].double())
    neg = -normal.icdf(torch.linspace(NF_OFFSET, 0.5, half)[:-1].double())
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    levels = levels / levels.abs().max()
    return levels.sort().values.float()


def max_gap(bits: int) -> float:
    return float(nf_levels(bits).diff().max())


@dataclass
class QuantizedTensor:
    packed: np.ndarray  # uint8, bit-packed codes
    scales: np.ndarray  # float16, one per block
    shape: tuple[int, ...]
    bits: int
    block_size: int

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scales.nbytes)


def quantize(x: torch.Tensor, bits: int, block_size: int = 64, dither: torch.Tensor | None = None) -> QuantizedTensor:
    """dither (same shape as x, in the normalised units of [-1, 1]): an offset added before rounding that the receiver
    does not know, so it dequantizes Q(x/s + dither) * s; a fixed secret dither is a bias that averaging copies
    cannot remove (see FedLPP's broadcast)."""
    levels = nf_levels(bits)
    flat = x.detach().float().flatten().cpu()
    block_size = min(block_size, max(flat.numel(), 1))  # a tensor smaller than a block is one block, unpadded
    pad = (-flat.numel()) % block_size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size)
    scales = blocks.abs().amax(dim=1).clamp(min=1e-12)
    scales16 = coarse_scales(scales, bits).half()
    scales16 = torch.where(scales16.float() < scales, torch.nextafter(scales16, torch.tensor(float("inf"), dtype=torch.float16)), scales16)
    normalized = blocks / scales16.float()[:, None]
    if dither is not None:  # not on an all-zero block (LoRA's B starts at 0): its codes would be Q(dither) itself
        offset = dither.detach().float().flatten().cpu()
        nonzero = blocks.abs().amax(dim=1, keepdim=True) > 0
        normalized = normalized + torch.cat([offset, offset.new_zeros(pad)]).view(-1, block_size) * nonzero
    normalized = normalized.clamp(-1, 1)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(normalized, midpoints).to(torch.uint8).flatten()[:flat.numel()]
    return QuantizedTensor(pack_bits(codes.numpy(), bits), scales16.numpy(), tuple(x.shape), bits, block_size)


def coarse_scales(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Each block's absmax rounded up to `bits` significant bits after the leading one: s = ceil(a / u) u with
    u = 2^(floor(log2 a) - bits), so a <= s < a (1 + 2^-bits). An fp16 absmax (11 bits) told the receiver the block's
    largest value, whose code is the top level, at fp16 precision: one coordinate per block far beyond the broadcast's
    bit width (all of theta at --block-size 1). Now no scale says more than a code does; the price is a step up to
    2^-bits larger. A block whose absmax fits float16 keeps a scale that fits it too: rounding up past 65504 (58000
    at 1 or 2 bits rounds to 65536) sent the scale as inf, and every receiver decoded the block as NaN or -inf."""
    unit = torch.exp2(torch.floor(torch.log2(absmax)) - bits)
    scales = torch.ceil(absmax / unit) * unit
    top = torch.finfo(torch.float16).max
    return torch.where(absmax <= top, scales.clamp(max=top), scales)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    n = int(np.prod(q.shape)) if q.shape else 1
    codes = torch.from_numpy(unpack_bits(q.packed, q.bits, n).astype(np.int64))
    block = min(q.block_size, max(n, 1))  # as quantize: never padded beyond the tensor (a block size a hostile
    pad = (-n) % block  # server names cannot make a node allocate more than the tensor's own size)
    values = torch.cat([nf_levels(q.bits)[codes], torch.zeros(pad)]).view(-1, block)
    values = values * torch.from_numpy(q.scales).float()[:, None]
    return values.flatten()[:n].view(q.shape)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Keep the low `bits` bits of each uint8 code, packed densely."""
    as_bits = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(as_bits.flatten())


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    as_bits = np.unpackbits(packed)[:count * bits].reshape(count, bits)
    full = np.concatenate([np.zeros((count, 8 - bits), dtype=np.uint8), as_bits], axis=1)
    return np.packbits(full, axis=1).flatten()
