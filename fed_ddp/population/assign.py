"""Assignment of a round's clients to workers, balanced by expected work (pure)."""

from __future__ import annotations

import heapq


def assign(clients: list[int], num_workers: int, work: dict[int, float] | None = None) -> list[list[int]]:
    """Longest-processing-time-first: each client (heaviest first, ties by id) goes to the least loaded
    worker (ties by worker index). Returns one list per worker, each in ascending client order.

    ``work`` maps a client to its expected cost (default 1 each, as when every client runs the same
    number of local steps); the largest load is then at most 4/3 of the optimum (Graham 1969), and with
    equal work the counts differ by at most one.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: must be >= 1")
    cost = {c: (1.0 if work is None else float(work[c])) for c in clients}
    heap = [(0.0, w) for w in range(num_workers)]
    out: list[list[int]] = [[] for _ in range(num_workers)]
    for c in sorted(clients, key=lambda c: (-cost[c], c)):
        load, w = heapq.heappop(heap)
        out[w].append(c)
        heapq.heappush(heap, (load + cost[c], w))
    return [sorted(x) for x in out]
