"""Split one dataset across clients: IID, Dirichlet(alpha) over a label, or label-sorted shards.

Every function is deterministic from its seed and returns one sorted index array per client.
"""

from __future__ import annotations

import numpy as np


def iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    if n < num_clients:
        raise ValueError(f"{n} samples cannot give {num_clients} clients 1 each")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Per label, split its samples across clients with proportions ~ Dirichlet(alpha).

    Redraws (up to 100 times) until every client holds at least ``min_size`` samples.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if len(labels) < num_clients * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {num_clients} clients {min_size} each")
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for y in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == y))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"dirichlet alpha={alpha}: could not give every client {min_size} samples in 100 draws")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """Sort by label, cut into num_clients*shards_per_client equal shards, deal them out at random."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    n_shards = num_clients * shards_per_client
    if len(labels) < n_shards:
        raise ValueError(f"{len(labels)} samples cannot fill {n_shards} shards")
    order = np.argsort(labels + rng.random(len(labels)) * 0.5, kind="stable")  # by label, shuffled within
    pieces = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards)
    return [np.sort(np.concatenate([pieces[s] for s in deal[c::num_clients]])) for c in range(num_clients)]


def partition(kind: str, labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5,
              shards_per_client: int = 2) -> list[np.ndarray]:
    if kind == "iid":
        return iid(len(labels), num_clients, seed)
    if kind == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed)
    if kind == "shards":
        return shards(labels, num_clients, shards_per_client, seed)
    raise ValueError(f"data.partition={kind!r}: must be one of ['dirichlet', 'iid', 'shards']")
