"""Split a labelled dataset across clients: IID, or non-IID with Dirichlet(alpha) label proportions.

Each row is placed on its own: label y's client proportions p_y ~ Dirichlet(alpha) are drawn from the seed and the
label alone, for every label of the task (redrawn, on a condition that reads no row, until no client is left with
almost no mass), and a row with key k (its text, `objective.row_keys`) goes to the client whose interval of the
cumulative p_y holds u(seed, k), a keyed hash of the row mapped to [0, 1). So one row added to or removed from the
file moves no other row between clients: a client's share of a neighbouring file is a neighbouring share, and a
private client's per-row guarantee is one of the file's rows, not of a group of rows reshuffled around it.
"""

from __future__ import annotations

import hashlib

import numpy as np


def dirichlet_partition(labels: list[int], keys: list[str], num_clients: int, alpha: float, seed: int = 0, *,
                        num_labels: int) -> list[list[int]]:
    """Indices per client (a client may still get none: callers refuse that). Small alpha: each client sees mostly
    one label; alpha -> inf: IID. `keys[i]`: row i's text (equal rows go to the same client); `num_labels`: the
    task's classes (labels 0..num_labels-1), not the ones the file happens to hold, which one row could change."""
    if len(keys) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(keys)} row keys")
    if any(not 0 <= y < num_labels for y in labels):
        raise ValueError(f"labels outside 0..{num_labels - 1}")
    proportions = client_proportions(list(range(num_labels)), num_clients, alpha, seed)
    cumulative = {label: np.cumsum(p) for label, p in proportions.items()}
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for i, (label, key) in enumerate(zip(labels, keys)):
        client = int(np.searchsorted(cumulative[label], row_point(key, seed), side="right"))
        parts[min(client, num_clients - 1)].append(i)  # min: a cumulative sum that rounds to just below 1
    return parts


def client_proportions(labels: list[int], num_clients: int, alpha: float, seed: int,
                       attempts: int = 100) -> dict[int, np.ndarray]:
    """{label y: p_y}, p_y ~ Dirichlet(alpha, ..., alpha) from (seed, y, attempt) only, redrawn until every client's
    mean share over the labels is at least 1 / (2 K) (else the draw that comes closest): a client left with almost
    no mass would get no rows. The condition reads no row, so whether a draw is kept never depends on the data."""
    best, best_share = None, -1.0
    for attempt in range(attempts):
        draw = {y: np.random.default_rng([seed, int(y), attempt]).dirichlet([alpha] * num_clients) for y in labels}
        share = float(np.mean(list(draw.values()), axis=0).min()) if draw else 1.0
        if share >= 1 / (2 * num_clients):
            return draw
        if share > best_share:
            best, best_share = draw, share
    return best


def row_point(key: str, seed: int) -> float:
    """u(seed, key) in [0, 1): BLAKE2b of the row's key under the seed, its first 53 bits."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=str(seed).encode()[:64]).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)
