"""Secret randomness for private runs: what the DP guarantee depends on must not be derivable from public settings.

Public: the model, `--seed` and everything derived from it (initialisation, ZO directions z, data order of
non-private runs). Secret: the DP noise and the Poisson batches. Both come from one 63-bit seed drawn from the
operating system's entropy (`os.urandom`) when a private run starts; it is stored only in the run's checkpoint
(`checkpoint/secret.json`, mode 0600), never in config.json, metrics.jsonl or summary.json, so a resumed run replays
the same noise and batches bit for bit while two runs with the same settings draw different ones.

Each consumer gets an independent stream: seed_for(secret, NOISE) seeds torch's generator for the noise,
seed_for(secret, SAMPLING) the Poisson sampler. (torch's Mersenne Twister is not a cryptographic generator; its
outputs never leave the process except through the noised releases, which is the standard DP-library assumption.)
"""

from __future__ import annotations

import os

from slimtune.optim.base import mix_seed

NOISE = 0xD9
SAMPLING = 0x5A


def fresh_secret() -> int:
    """A new 63-bit secret from OS entropy."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def seed_for(secret: int, stream: int) -> int:
    return mix_seed(secret, stream)
