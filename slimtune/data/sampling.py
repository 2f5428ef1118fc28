"""Batch samplers that are pure functions of (seed, step): resuming at step t replays exactly the same batches.

Private runs pass the run's secret key instead of a seed (privacy/secret.py): the subsampling amplification the
accountant counts on holds only if nobody can recompute which examples were in which batch. The batch of step t is
then drawn from K("sampling", attempt, t) (or the epoch's permutation from K("shuffle", attempt, epoch)).
"""

from __future__ import annotations

import random

import torch


def k_shot(examples: list, k: int, seed: int, num_labels: int) -> list:
    """k examples per class, drawn with `seed` (k <= 0 keeps everything)."""
    if k <= 0:
        return list(examples)
    rng = random.Random(seed)
    chosen = []
    for label in range(num_labels):
        pool = [e for e in examples if e.label == label]
        chosen += rng.sample(pool, min(k, len(pool)))
    rng.shuffle(chosen)
    return chosen


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


class EpochSampler:
    """Shuffle once per epoch, then take consecutive fixed-size batches."""

    poisson = False

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, key=None, attempt: int = 0, run: int = 0):
        if num_examples <= 0:
            raise ValueError("no examples to sample from")
        self.n, self.batch_size, self.seed = num_examples, min(batch_size, num_examples), seed
        self.key, self.attempt, self.run = key, attempt, run  # key: a private run's RunKey (the seed is then unused)
        self.batches_per_epoch = self.n // self.batch_size

    def indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.batches_per_epoch)
        if self.key is not None:
            from slimtune.privacy.secret import shuffle_generator
            perm = shuffle_generator(self.key, self.attempt, epoch, self.run).permutation(self.n).tolist()
            return perm[pos * self.batch_size:(pos + 1) * self.batch_size]
        perm = torch.randperm(self.n, generator=_generator(self.seed, epoch))
        return perm[pos * self.batch_size:(pos + 1) * self.batch_size].tolist()


class PoissonSampler:
    """Each example joins each batch independently with probability q (the DP accountant's assumption).

    Batches have a random size, possibly zero; DP estimators divide by the expected size q*N, never the realised one.
    """

    poisson = True

    def __init__(self, num_examples: int, expected_batch_size: int, seed: int = 0, key=None, attempt: int = 0,
                 run: int = 0, max_rate: float = 1.0):
        if num_examples <= 0:
            raise ValueError("no examples to sample from")
        self.n, self.seed = num_examples, seed
        self.key, self.attempt, self.run = key, attempt, run  # key: a private run's RunKey (the seed is then unused)
        # max_rate: a public cap on q (a federated client's B / --local-dp-min-examples, federated/local_privacy.py)
        self.sample_rate = min(max_rate, expected_batch_size / num_examples)
        self.batch_size = expected_batch_size

    def indices(self, step: int) -> list[int]:
        if self.key is not None:
            from slimtune.privacy.secret import sampling_generator
            mask = sampling_generator(self.key, self.attempt, step, self.run).random(self.n) < self.sample_rate
            return mask.nonzero()[0].tolist()
        mask = torch.rand(self.n, generator=_generator(self.seed, step)) < self.sample_rate
        return mask.nonzero().flatten().tolist()
