"""Split a labelled dataset across clients: IID, or non-IID with Dirichlet(alpha) label proportions.

Each row is placed on its own: label y's client proportions p_y ~ Dirichlet(alpha) are drawn from the seed and the
label alone, and a row with key k (its text, `objective.row_keys`) goes to the client whose interval of the
cumulative p_y holds u(seed, k), a keyed hash of the row mapped to [0, 1). So one row added to or removed from the
file moves no other row between clients: a client's share of a neighbouring file is a neighbouring share, and a
private client's per-row guarantee is one of the file's rows, not of a group of rows reshuffled around it.
"""

from __future__ import annotations

import hashlib

import numpy as np


def dirichlet_partition(labels: list[int], keys: list[str], num_clients: int, alpha: float,
                        seed: int = 0) -> list[list[int]]:
    """Indices per client (a client may get none: callers refuse that). Small alpha: each client sees mostly one
    label; alpha -> inf: IID. `keys[i]`: row i's text (equal rows go to the same client)."""
    if len(keys) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(keys)} row keys")
    cumulative = {label: np.cumsum(label_proportions(label, num_clients, alpha, seed)) for label in set(labels)}
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for i, (label, key) in enumerate(zip(labels, keys)):
        client = int(np.searchsorted(cumulative[label], row_point(key, seed), side="right"))
        parts[min(client, num_clients - 1)].append(i)  # min: a cumulative sum that rounds to just below 1
    return parts


def label_proportions(label: int, num_clients: int, alpha: float, seed: int) -> np.ndarray:
    """p_y ~ Dirichlet(alpha, ..., alpha), from (seed, label) only: the same whatever else the file holds."""
    return np.random.default_rng([seed, int(label)]).dirichlet([alpha] * num_clients)


def row_point(key: str, seed: int) -> float:
    """u(seed, key) in [0, 1): BLAKE2b of the row's key under the seed, its first 53 bits."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=str(seed).encode()[:64]).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)
