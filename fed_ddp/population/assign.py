"""Assignment of a round's clients to workers, balanced by expected work (pure), preferring the worker that
still holds a client's encoded data (``WorkerCaches``)."""

from __future__ import annotations

import heapq
from collections import OrderedDict


def assign(clients: list[int], num_workers: int, work: dict[int, float] | None = None,
           home: dict[int, int] | None = None) -> list[list[int]]:
    """Longest-processing-time-first: each client (heaviest first, ties by id) goes to the least loaded
    worker (ties: the client's ``home`` worker, then by worker index). Returns one list per worker, each in
    ascending client order.

    ``work`` maps a client to its expected cost (default 1 each, as when every client runs the same
    number of local steps); the largest load is then at most 4/3 of the optimum (Graham 1969), and with
    equal work the counts differ by at most one. ``home`` (client -> worker) only breaks ties between equally
    loaded workers, so it never changes the loads; with equal work it first seats every client it can on its
    home worker up to the same counts (each worker floor(m/W) or ceil(m/W) clients).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: must be >= 1")
    home = {c: w for c, w in (home or {}).items() if 0 <= w < num_workers}
    out: list[list[int]] = [[] for _ in range(num_workers)]
    if work is None:  # equal work: the balanced counts, home workers first
        base, extra = divmod(len(clients), num_workers)
        rest = []

        def room(w: int) -> bool:
            n = len(out[w])
            return n < base or (n == base and sum(len(x) > base for x in out) < extra)

        for c in sorted(clients):
            w = home.get(c)
            if w is not None and room(w):
                out[w].append(c)
            else:
                rest.append(c)
        for c in rest:
            w = min((w for w in range(num_workers) if room(w)), key=lambda w: (len(out[w]), w))
            out[w].append(c)
        return [sorted(x) for x in out]
    cost = {c: float(work[c]) for c in clients}
    heap = [(0.0, w) for w in range(num_workers)]
    for c in sorted(clients, key=lambda c: (-cost[c], c)):
        load, w = heapq.heappop(heap)
        h = home.get(c)
        if h is not None and h != w:
            tied = [(load, w)]
            while heap and heap[0][0] == load:
                tied.append(heapq.heappop(heap))
            pick = next(((lo, x) for lo, x in tied if x == h), tied[0])
            for t in tied:
                if t != pick:
                    heapq.heappush(heap, t)
            load, w = pick
        out[w].append(c)
        heapq.heappush(heap, (load + cost[c], w))
    return [sorted(x) for x in out]


class WorkerCaches:
    """The server's picture of each worker's client cache (``fed.client_cache``, LRU, as ``Worker.trainer``
    keeps it): which worker still holds a client's encoded data. A hint for ``assign``: a wrong one costs an
    encoding, never a result (a client's update does not depend on the worker that plays it)."""

    def __init__(self, num_workers: int, size: int):
        self.size = max(1, size)
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_workers)]

    def played(self, table: list[list[int]]) -> None:
        """Record a round's table: each worker played its row in order."""
        for lru, row in zip(self.lru, table):
            for c in row:
                lru[c] = None
                lru.move_to_end(c)
                while len(lru) > self.size:
                    lru.popitem(last=False)

    def home(self, clients: list[int]) -> dict[int, int]:
        return {c: w for w, lru in enumerate(self.lru) for c in clients if c in lru}
