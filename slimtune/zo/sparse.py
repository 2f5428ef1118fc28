"""Sparse MeZO: perturb and update only the small-magnitude weights of each tensor (Liu et al., 2024,
"Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM Fine-Tuning").

Per trainable tensor W the mask is m = 1[|W| <= h_W], h_W the (1 - s) quantile of |W| (s = `sparsity`: the fraction
of each tensor left alone, its largest-magnitude weights; values tied at h_W are kept only up to the asked count, so a
fresh LoRA B of zeros is perturbed at 1 - s, not whole: `pack_mask`). The step is MeZO's with z replaced by z * m:

    g = (L(theta + eps z*m) - L(theta - eps z*m)) / (2 eps),      theta <- theta - lr g z*m,

so E[g z*m] = m * grad L: the gradient restricted to the masked weights, estimated with the variance of a
(1 - s) d-dimensional problem instead of a d-dimensional one. z comes from any perturbation source (`gaussian`,
`rademacher`, `pool`) exactly as in MeZO; the mask multiplies what the source draws.

The mask must be the same for every sweep of a step (+eps, -2 eps, restore+update), but the perturbed weights cross
the threshold, so it cannot be recomputed from the weights inside a step. It is computed from the weights every
`mask_every` steps (h_W from a deterministic strided sample of at most 2^20 values of |W| when W is larger), kept
bit-packed (1 bit per weight: 1/32 of fp32 weights) and saved in the state, so resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.optim.methods import METHOD_CONSTANTS
from slimtune.zo.mezo import MeZO, MeZOConfig

QUANTILE_SAMPLE = 1 << 20
_SHIFTS: dict = {}


@dataclass
class SparseMeZOConfig(MeZOConfig):
    sparsity: float = METHOD_CONSTANTS["sparsity"]  # fraction of each tensor not perturbed: its largest |w|
    mask_every: int = METHOD_CONSTANTS["mask_every"]  # recompute the masks from the weights every this many steps


class SparseMeZO(MeZO):
    name = "sparse-mezo"

    def __init__(self, named_params, config: SparseMeZOConfig, estimator=None):
        if not 0 <= config.sparsity < 1:
            raise ValueError(f"sparse-mezo: sparsity must be in [0, 1), got {config.sparsity}")
        if config.mask_every < 1:
            raise ValueError(f"sparse-mezo: mask_every must be >= 1, got {config.mask_every}")
        if config.chunk_size is not None and config.chunk_size % 8:
            raise ValueError("sparse-mezo: chunk_size must be a multiple of 8 (masks are bit-packed)")
        super().__init__(named_params, config, estimator)
        self.masks: list[torch.Tensor] | None = None  # per parameter: ceil(numel / 8) uint8
        self.mask_step: int | None = None  # the step the masks were computed at
        self._mask_buffers: dict = {}

    def _begin_step(self) -> None:
        if self.masks is None or self.step_count % self.config.mask_every == 0 and self.mask_step != self.step_count:
            s = self.config.sparsity
            self.masks = [pack_mask(p.detach(), threshold(p.detach(), s), sparsity=s) for _, p, _ in self.params]
            self.mask_step = self.step_count

    def _direction(self, index: int, start: int, z: torch.Tensor) -> torch.Tensor:
        mask = unpack_mask(self.masks[index], start, z.numel())
        key = (z.device, z.dtype)
        buf = self._mask_buffers.get(key)
        if buf is None or buf.numel() < z.numel():
            buf = self._mask_buffers[key] = torch.empty(z.numel(), device=z.device, dtype=z.dtype)
        return torch.mul(z, mask, out=buf[:z.numel()])

    @property
    def perturbed_fraction(self) -> float:
        """Fraction of the trainable values the current masks perturb."""
        total = sum(p.numel() for _, p, _ in self.params)
        ones = sum(int(unpack_mask(m, 0, p.numel()).sum()) for m, (_, p, _) in zip(self.masks, self.params))
        return ones / total

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mask_step": self.mask_step,
                "masks": None if self.masks is None else [m.clone() for m in self.masks]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.mask_step = state.get("mask_step")
        masks = state.get("masks")
        self.masks = None if masks is None else [m.to(p.device) for m, (_, p, _) in zip(masks, self.params)]


def threshold(w: torch.Tensor, sparsity: float) -> float:
    """The (1 - sparsity) quantile of |w| (from an evenly strided sample of at most 2^20 values)."""
    flat = w.reshape(-1)
    stride = -(-flat.numel() // QUANTILE_SAMPLE)
    return torch.quantile(flat[::stride].abs().float(), 1 - sparsity).item()


def _shifts(device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_mask(w: torch.Tensor, h: float, chunk: int = 1 << 20, sparsity: float | None = None) -> torch.Tensor:
    """Bits of 1[|w| <= h], 8 per byte (element 8k + j is bit j of byte k), computed chunk by chunk.

    With `sparsity`, values tied at h are kept only up to the asked count k = round((1 - sparsity) n): a tensor with
    many equal values (a fresh LoRA B is all zeros, SVFit's relative scales all ones) would otherwise be perturbed
    whole. The kept ties are spread evenly over the tensor (tie j is kept when floor((j+1) q / T) > floor(j q / T),
    q = k - #(|w| < h) of T ties): deterministic, so the mask is a function of the weights as before."""
    flat = w.reshape(-1)
    out = torch.zeros(-(-flat.numel() // 8), dtype=torch.uint8, device=w.device)
    quota = ties = None
    if sparsity is not None:
        below = sum(int((flat[i:i + chunk].abs() < h).sum()) for i in range(0, flat.numel(), chunk))
        ties = sum(int((flat[i:i + chunk].abs() == h).sum()) for i in range(0, flat.numel(), chunk))
        quota = min(max(round((1 - sparsity) * flat.numel()) - below, 0), ties)
    seen = 0  # ties before this chunk
    for start in range(0, flat.numel(), chunk):
        magnitude = flat[start:start + chunk].abs()
        if quota is None or quota == ties:
            bits = (magnitude <= h).to(torch.uint8)
        else:
            tied = magnitude == h
            j = torch.cumsum(tied.to(torch.int64), 0) - 1 + seen  # each tie's index among all ties
            kept = tied & ((j + 1) * quota // ties > j * quota // ties)
            bits = ((magnitude < h) | kept).to(torch.uint8)
            seen += int(tied.sum())
        pad = -bits.numel() % 8
        if pad:
            bits = torch.cat([bits, bits.new_zeros(pad)])
        out[start // 8:start // 8 + bits.numel() // 8] = (bits.view(-1, 8) << _shifts(w.device)).sum(1, dtype=torch.uint8)
    return out


def unpack_mask(packed: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """The mask of elements start..start+n (start a multiple of 8) as uint8 0/1."""
    bytes_ = packed[start // 8:(start + n + 7) // 8]
    return ((bytes_[:, None] >> _shifts(packed.device)) & 1).view(-1)[:n]
