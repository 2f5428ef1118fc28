"""Split a labelled dataset across clients: IID, or non-IID with Dirichlet(alpha) label proportions."""

from __future__ import annotations

import numpy as np


def dirichlet_partition(labels: list[int], num_clients: int, alpha: float, seed: int = 0,
                        min_size: int = 1) -> list[list[int]]:
    """Indices per client. Small alpha: each client sees mostly one label; alpha -> inf: IID.

    Re-draws (up to 100 times) until every client has at least `min_size` examples.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels_arr):
            idx = rng.permutation(np.flatnonzero(labels_arr == label))
            proportions = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(f"could not give every one of {num_clients} clients {min_size} examples (alpha={alpha})")
