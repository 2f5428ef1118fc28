"""Where MeZO's direction z comes from, chunk by chunk, always as a function of the step seed (the seed trick).

- `gaussian` (default): z ~ N(0, I), drawn with `normal_` into a reusable buffer. Exact, but on CPU the RNG is the
  bottleneck of full-parameter ZO (~150M values/s on 2 cores, against ~1G values/s for adding a stored tensor).
- `rademacher`: z_i = +-1 with probability 1/2 (E[z z^T] = I exactly); drawn with `random_`, so it is still RNG-bound.
- `pool`: the shared-noise-table idea of evolution strategies (Salimans et al., 2017). A pool of P Gaussian numbers is
  generated once from the run seed (never stored: rebuilt on resume and by anyone who replays seeds), and each chunk
  of z is a slice of it, z_chunk = s * pool[o : o + n], with offset o uniform and sign s = +-1 drawn from the step
  seed. Cost: one tiny draw per chunk and a read of the pool instead of n Gaussian draws.
  What it gives up: z is no longer i.i.d. Different chunks have independent random signs, so E[z_i z_j] = 0 across
  chunks; within a chunk E[z_i z_j] is the pool's empirical autocorrelation at lag |i - j|, O(1/sqrt(P)), and E[z_i^2]
  is the pool's empirical second moment, 1 + O(1/sqrt(P)). So E[z z^T] = I up to O(1/sqrt(P)) entries, and two steps
  reuse the same numbers at different offsets: directions are dependent across steps (not independent draws).
  Memory: P values per (device, dtype), 4 Mi by default (16 MB in fp32); P must hold at least one chunk.
"""

from __future__ import annotations

import torch

from slimtune import SlimtuneError
from slimtune.optim.base import mix_seed
from slimtune.optim.methods import SOURCES, perturbation_refusal
POOL_STREAM = 0x9001


class GaussianSource:
    name = "gaussian"

    def generator(self, seed: int, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    def draw(self, gen: torch.Generator, buf: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        """(z for the next n elements, its sign); z may be a view of `buf` or of the pool."""
        return buf[:n].normal_(generator=gen), 1.0


class RademacherSource(GaussianSource):
    name = "rademacher"

    def draw(self, gen, buf, n):
        return buf[:n].random_(0, 2, generator=gen).mul_(2).sub_(1), 1.0


class PoolSource:
    name = "pool"

    def __init__(self, seed: int, size: int = 1 << 22):
        self.seed, self.size = seed, size
        self.pools: dict = {}

    def generator(self, seed: int, device) -> torch.Generator:
        return torch.Generator().manual_seed(seed)  # offsets and signs: a few CPU draws per chunk, on any device

    def pool(self, device, dtype) -> torch.Tensor:
        key = (torch.device(device), dtype)
        if key not in self.pools:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, POOL_STREAM))
            self.pools[key] = torch.randn(self.size, generator=gen).to(device=device, dtype=dtype)
        return self.pools[key]

    def draw(self, gen, buf, n):
        if n > self.size:
            raise SlimtuneError(f"perturbation pool of {self.size} values is smaller than a chunk of {n}")
        pool = self.pool(buf.device, buf.dtype)
        offset = int(torch.randint(0, self.size - n + 1, (1,), generator=gen))
        sign = 1.0 if int(torch.randint(0, 2, (1,), generator=gen)) else -1.0
        return pool[offset:offset + n], sign


def check_perturbation(name: str | None, optimizer: str) -> None:
    """One-line errors for a source that does not exist or that `optimizer` cannot use (optim/methods.py)."""
    refusal = perturbation_refusal(name, optimizer)
    if refusal:
        raise SlimtuneError(refusal)


def make_source(name: str, seed: int, pool_size: int = 1 << 22):
    if name not in SOURCES:
        raise SlimtuneError(f"--perturbation {name!r}: choose one of {', '.join(SOURCES)}")
    if name == "pool":
        return PoolSource(seed, pool_size)
    return RademacherSource() if name == "rademacher" else GaussianSource()
