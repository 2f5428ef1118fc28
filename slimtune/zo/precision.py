"""Zeroth-order steps on bf16 / fp16 weights: perturbations with one rounding, theta recovered exactly, updates with
stochastic rounding.

With the weights themselves in 16 bits (no fp32 master copy: that is the memory ZO saves), MeZO's in-place sweeps
would round at every sweep: w+ = rd(theta + eps z), then rd(w+ - 2 eps z), then rd(w- + eps z), and the restored
weight is theta + e1 + e2 + e3 with each |e| <= 1/2 ulp. In bf16 (8 significant bits) about a quarter of the weights
would then move by one ulp per step, a random walk of ~sqrt(t / 4) ulp after t steps (~22 ulp, ~10% of |theta|, after
2,000 steps), and updates lr g z smaller than half an ulp would be rounded away. Here, per chunk, in fp32 registers:

- perturb: every perturbed state is one rounding away from theta, w_s = rd(theta + s z) for the current multiple s
  of z (s = +eps, then -eps; FZOO: +eps then 0);
- recover: moving from s to s' first recovers theta = rd(w_s - s z) and then writes rd(theta + s' z). The recovery
  is exact whenever the grid at w_s is no coarser than the grid just below |theta|: the rounding error of w_s is then
  at most half of theta's spacing on either side, and rounding w_s - s z back to the 16-bit grid lands on theta.
  That holds when |theta + s z| stays in the binade of |theta| or below, unless |theta| is exactly a power of two
  (the grid below it is twice as fine). When the perturbation carries |theta + s z| into a coarser binade (or
  theta is a power of two) bits are lost and theta comes back within one ulp of |theta| + |s z|; exact ties
  (probability ~2^-16 per element) likewise. Measured on 2^20 weights ~ N(0, 0.02^2) with eps 1e-3 and lr 0, 200
  steps: 36% of the weights moved (26% of those with |w| > 4 eps), rms relative drift 1.1%, against 96% and 5.4%
  with plain in-place bf16 sweeps (both grow like sqrt(steps));
- update: theta' = SR(theta (1 - lr wd) - lr g z), rounded stochastically to one of its two 16-bit neighbours with
  probabilities that make it unbiased (E[theta'] = the fp32 value): updates far below an ulp still move the weights
  on average, as full-parameter ZO's lr ~ 1e-6 steps must. The random bits come from the step seed (a separate
  stream), so a step replays bit-identically (resume, data-parallel ranks).

"Restore exact to bf16 rounding" therefore means: after +eps z, -2 eps z, +eps z the weights are the very bf16 values
they started from, except elements whose perturbed magnitude crossed into a coarser binade, powers of two and exact
ties, which are within one ulp of |theta| + |eps z|. (Exact restore everywhere would need a bit per weight kept
through the step, or an fp32 master copy: the memory ZO is used to save.) fp32 weights keep the plain in-place sweeps of slimtune/zo/mezo.py (trajectories unchanged).
The finite differences are computed from fp32 losses (the objectives return fp32 per-example losses; the estimators
average in fp32 or fp64).
"""

from __future__ import annotations

import torch

from slimtune.optim.base import mix_seed

LOW_PRECISION = (torch.bfloat16, torch.float16)
ROUNDING_STREAM = 0x5_0E_5E_ED  # the stochastic-rounding bits of a step: mix_seed(step seed, ROUNDING_STREAM)


def is_low_precision(t: torch.Tensor) -> bool:
    return t.dtype in LOW_PRECISION


SIGNIFICANT_BITS = {torch.bfloat16: 8, torch.float16: 11}  # with the implicit leading one


def warn_if_eps_rounds_away(params: list[torch.Tensor], eps: float) -> None:
    """A 16-bit weight w moves under +-eps z (|z| ~ 1) only if eps is at least half its spacing, ~|w| 2^-bits: for
    |w| >= eps 2^bits, rd(w + eps z) == w and the two forwards see the same weight (bf16, eps 1e-3: every |w| >= 0.256,
    such as all RMSNorm weights at 1.0). Warned once, with the share of the trainable weights it concerns."""
    import warnings

    stuck, total, dtype = 0, 0, None
    for p in params:
        if p.dtype in SIGNIFICANT_BITS:
            dtype = p.dtype
            stuck += int((p.detach().abs() >= eps * 2 ** SIGNIFICANT_BITS[p.dtype]).sum())
        total += p.numel()
    if stuck:
        name = str(dtype).removeprefix("torch.")
        warnings.warn(f"--eps {eps:g} is below the {name} resolution of {stuck:,} of the {total:,} trainable weights "
                      f"(|w| >= {eps * 2 ** SIGNIFICANT_BITS[dtype]:.3g}): their perturbation rounds away and their "
                      "finite differences are 0 or a whole ulp; raise --eps or use --dtype float32", stacklevel=3)


def rounding_generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(seed, ROUNDING_STREAM))


class RoundingStreams:
    """The stochastic-rounding generator of the current direction seed, per device: one stream per seed, consumed in
    sweep order (a new seed starts fresh streams), so a step replays bit-identically."""

    def __init__(self):
        self.seed, self.generators = None, {}

    def get(self, seed: int, device) -> torch.Generator:
        if seed != self.seed:
            self.seed, self.generators = seed, {}
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = rounding_generator(seed, device)
        return gen


class Scratch:
    """fp32 (and int32) work buffers per device, grown to the largest chunk seen."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, n: int, device, dtype=torch.float32) -> torch.Tensor:
        key = (torch.device(device), dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = torch.empty(n, device=device, dtype=dtype)
        return buf[:n]


def _theta(part: torch.Tensor, direction: torch.Tensor, offset: float, scratch: Scratch) -> torch.Tensor:
    """theta in fp32 from w = rd(theta + offset d): rd(w - offset d) (see the module docstring)."""
    t = scratch.get(part.numel(), part.device).view(part.shape)
    t.copy_(part)
    if offset:
        t.sub_(direction, alpha=offset)
        t.copy_(t.to(part.dtype))  # back onto the 16-bit grid: theta
    return t


def move_(part: torch.Tensor, direction: torch.Tensor, offset: float, new_offset: float, scratch: Scratch) -> None:
    """`part` holds rd(theta + offset d); make it rd(theta + new_offset d) (one rounding from theta)."""
    t = _theta(part, direction, offset, scratch)
    if new_offset:
        t.add_(direction, alpha=new_offset)
    part.copy_(t)


def update_(part: torch.Tensor, direction: torch.Tensor, offset: float, decay: float, step: float,
            gen: torch.Generator, scratch: Scratch) -> None:
    """`part` holds rd(theta + offset d); make it SR(theta * decay + step * d)."""
    t = _theta(part, direction, offset, scratch)
    if decay != 1.0:
        t.mul_(decay)
    t.add_(direction, alpha=step)
    stochastic_round_(part, t, gen, scratch)


def stochastic_round_(out: torch.Tensor, t: torch.Tensor, gen: torch.Generator, scratch: Scratch) -> None:
    """out = t rounded to out's dtype up or down at random, P(up) = the fraction of the ulp t lies above the lower
    neighbour (so E[out] = t). bf16: add 16 random bits below bf16's last bit of fp32's bit pattern and truncate
    (sign-magnitude: it rounds the magnitude). fp16: between the two neighbours by a uniform draw."""
    if out.dtype == torch.bfloat16:
        bits = t.view(torch.int32)
        noise = scratch.get(t.numel(), t.device, torch.int32).view(t.shape)
        noise.random_(0, 1 << 16, generator=gen)
        bits.add_(noise).bitwise_and_(-(1 << 16))
        out.copy_(t)  # exact: the low 16 bits are zero
        return
    nearest = t.to(out.dtype)
    below = torch.where(nearest.float() > t, torch.nextafter(nearest, torch.full_like(nearest, -float("inf"))),
                        nearest)
    above = torch.nextafter(below, torch.full_like(below, float("inf")))
    gap = above.float() - below.float()
    frac = torch.where(gap > 0, (t - below.float()) / gap, torch.zeros_like(t))
    u = torch.rand(t.shape, generator=gen, device=t.device)
    out.copy_(torch.where(u < frac, above, below))
