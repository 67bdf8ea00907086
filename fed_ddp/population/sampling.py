"""Which clients take part in a round (pure functions, deterministic from the run seed and the round).

    reachable = available(rnd, seed, N, fed.availability)      # probability, or a per-client trace
    picked    = sample(fed.sampling, rnd, seed, reachable, m=..., q=..., sizes=...)
    lost      = dropouts(rnd, seed, picked, fed.dropout_rate)  # sampled, but never reported

Samplers (``fed.sampling``, a registered name or ``package.module:Name``): ``all`` (every reachable client),
``uniform`` (m without replacement), ``poisson`` (each reachable client joins independently with probability q:
the round size varies, which is the form privacy accounting needs), ``weighted`` (m without replacement,
probability proportional to data size), and the simulated cell's ``best_channel`` and ``age``
(``fed_ddp.wireless.samplers``, registered through ``register`` like a plug-in's when ``fed_ddp.population`` is
imported). A user's sampler subclasses
``Sampler`` and gets the round, its seeded random stream, the reachable ids and the population's public facts
(examples per client), plus ``self.context`` (``Context``: the round each client was last sampled, and the
simulated cell when ``wireless.enabled``); what it returns is checked (unique ids among the reachable) before the
round uses it. Each decision has its own random stream (``fed_ddp.seeds``), so changing the dropout rate does not
change who is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fed_ddp import seeds


@dataclass(frozen=True)
class Context:
    """What the run knows beside the round's reachable ids, the same for every sampler (``Sampler.context``)."""

    last_sampled: np.ndarray  # per client id: the last round it was sampled in, -1 if never (read-only; checkpointed)
    cell: Any = None  # the simulated wireless cell (fed_ddp.wireless.Cell: cell.gains(rnd), device classes) when
    #                   wireless.enabled, else None


class Sampler:
    """Chooses the round's clients among the reachable ones. ``uses``: which of ``fed.clients_per_round`` (m) and
    ``fed.sample_rate`` (q) it reads (the config refuses the other one); ``num_clients``, ``m`` and ``q`` are the
    config's. ``needs_cell``: it reads ``context.cell`` (the config then needs ``wireless.enabled`` and m).
    ``context``: set before each ``sample`` call. Differential privacy accepts only ``all`` and ``poisson`` (its
    accountant assumes their draw)."""

    uses: str | None = "clients_per_round"  # "clients_per_round", "sample_rate" or None
    needs_cell: bool = False
    context: Context | None = None

    def __init__(self, num_clients: int, clients_per_round: int | None = None, sample_rate: float | None = None):
        self.num_clients, self.m, self.q = num_clients, clients_per_round, sample_rate

    def sample(self, rnd: int, rng: np.random.Generator, reachable: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The ids sampled in round ``rnd`` from ``reachable`` (ascending int64); ``rng``: the round's sampling
        stream (from the run seed, or privacy's secret seed); ``sizes``: examples per client id."""
        raise NotImplementedError

    def expected_size(self) -> float:
        """Clients sampled per round on average (before availability and dropouts)."""
        return float(self.m or self.num_clients)


class All(Sampler):
    uses = None

    def sample(self, rnd, rng, reachable, sizes):
        return reachable


class Uniform(Sampler):
    weighted = False

    def sample(self, rnd, rng, reachable, sizes):
        if self.m is None or self.m >= len(reachable):
            return reachable
        p = None
        if self.weighted:
            w = np.asarray(sizes, dtype=np.float64)[reachable]
            p = w / w.sum()
        return np.sort(rng.choice(reachable, size=self.m, replace=False, p=p))


class Weighted(Uniform):
    weighted = True


class Poisson(Sampler):
    uses = "sample_rate"

    def sample(self, rnd, rng, reachable, sizes):
        return reachable[rng.random(len(reachable)) < self.q]

    def expected_size(self) -> float:
        return self.q * self.num_clients


REGISTRY: dict[str, type[Sampler]] = {}


def register(name: str, cls: type[Sampler]) -> None:
    if name in REGISTRY:
        raise ValueError(f"sampler {name!r} is already registered")
    REGISTRY[name] = cls


for _name, _cls in (("all", All), ("uniform", Uniform), ("poisson", Poisson), ("weighted", Weighted)):
    register(_name, _cls)


def lookup(name: str, key: str = "fed.sampling") -> type[Sampler]:
    from fed_ddp.plugins import lookup as find

    return find(REGISTRY, name, key, Sampler, " or package.module:Name")


def sampler_of(fed) -> Sampler:
    """The ``fed`` section's sampler."""
    return lookup(fed.sampling)(fed.num_clients, fed.clients_per_round, fed.sample_rate)


def read_trace(path: str | Path, num_clients: int) -> np.ndarray:
    """An availability trace: one line per client (line i = client i), one character per round, ``1``
    reachable / ``0`` not; round t reads column (t - 1) mod the line's length. Returns a bool matrix
    padded by repetition to the longest line. Raises ValueError naming the line that is wrong."""
    lines = [ln.strip() for ln in Path(path).expanduser().read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    if len(lines) != num_clients:
        raise ValueError(f"{path}: {len(lines)} client lines, fed.num_clients={num_clients} needs one per client")
    for i, ln in enumerate(lines):
        if set(ln) - {"0", "1"}:
            raise ValueError(f"{path}: line of client {i} must be only 0 and 1 (one per round), got {ln[:20]!r}")
    width = max(len(ln) for ln in lines)
    return np.array([[ln[t % len(ln)] == "1" for t in range(width)] for ln in lines], dtype=bool)


def available(rnd: int, seed: int, num_clients: int, availability: float | np.ndarray = 1.0) -> np.ndarray:
    """Ids of the clients reachable in round ``rnd`` (ascending)."""
    if isinstance(availability, np.ndarray):
        return np.flatnonzero(availability[:, (rnd - 1) % availability.shape[1]])
    if availability >= 1:
        return np.arange(num_clients)
    draw = seeds.round_rng(seed, rnd, seeds.AVAILABILITY).random(num_clients)
    return np.flatnonzero(draw < availability)


def sample(mode: str, rnd: int, seed: int, candidates: np.ndarray, m: int | None = None, q: float | None = None,
           sizes: np.ndarray | None = None, num_clients: int | None = None,
           context: Context | None = None) -> np.ndarray:
    """The clients the sampler ``mode`` picks from ``candidates`` (ascending ids), checked. ``sizes``: examples per
    client id (``weighted``); ``num_clients``: N (default: one past the largest candidate); ``context``: what the
    sampler finds in ``self.context`` (None: nobody sampled yet, no cell). With fewer candidates than m, uniform
    and weighted take them all."""
    candidates = np.asarray(candidates, dtype=np.int64)
    n = num_clients if num_clients is not None else int(candidates.max()) + 1 if len(candidates) else 0
    sampler = lookup(mode)(n, m, q)
    sampler.context = context if context is not None else Context(np.full(n, -1, dtype=np.int64))
    ids = sampler.sample(rnd, seeds.round_rng(seed, rnd, seeds.SAMPLING), candidates, sizes)
    return checked(ids, candidates, mode)


def checked(ids, candidates: np.ndarray, name: str) -> np.ndarray:
    """A sampler's answer as ascending unique int64 ids among ``candidates``; a ValueError naming it otherwise."""
    try:
        out = np.asarray(ids).astype(np.int64, casting="safe").reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"fed.sampling={name}: returned {type(ids).__name__}, not an array of client ids") from None
    out = np.sort(out)
    if len(np.unique(out)) != len(out) or not np.isin(out, candidates).all():
        raise ValueError(f"fed.sampling={name}: returned ids that are repeated or not among the reachable clients "
                         f"(first: {out[:5].tolist()})")
    return out


def dropouts(rnd: int, seed: int, sampled: np.ndarray, rate: float) -> np.ndarray:
    """The sampled clients that fail to report this round (ascending)."""
    sampled = np.asarray(sampled, dtype=np.int64)
    if rate <= 0 or len(sampled) == 0:
        return sampled[:0]
    # one draw per client id (not per position), so a client's fate does not depend on who else was sampled
    draw = seeds.round_rng(seed, rnd, seeds.DROPOUT).random(int(sampled.max()) + 1)
    return sampled[draw[sampled] < rate]


@dataclass(frozen=True)
class RoundClients:
    sampled: list[int]  # chosen by the sampler among the reachable clients
    dropped: list[int]  # sampled, but fail to report (simulated: fed.dropout_rate)
    reachable: int  # how many clients were reachable
    late: tuple[int, ...] = ()  # sampled, would miss the simulated deadline (wireless.deadline_s): not played

    @property
    def playing(self) -> list[int]:
        lost = set(self.dropped) | set(self.late)
        return [c for c in self.sampled if c not in lost]

    def with_late(self, late) -> RoundClients:
        """The same round with the stragglers ``late`` left out too (those that did not fail anyway)."""
        failed = set(self.dropped)
        return replace(self, late=tuple(sorted(int(c) for c in late if c not in failed)))


def select_round(fed, rnd: int, seed: int, sizes: np.ndarray, trace: np.ndarray | None = None,
                 sample_seed: int | None = None, context: Context | None = None) -> RoundClients:
    """The whole decision of round ``rnd`` from the ``fed`` config section. ``sample_seed``: the sampling
    stream's own seed (differential privacy keeps it secret: amplification by sampling needs an
    adversary who does not know who was sampled); None = ``seed``. ``context``: the sampler's ``self.context``."""
    n = fed.num_clients
    reach = available(rnd, seed, n, trace if trace is not None else float(fed.availability))
    picked = sample(fed.sampling, rnd, seed if sample_seed is None else sample_seed, reach,
                    m=fed.clients_per_round, q=fed.sample_rate, sizes=sizes, num_clients=fed.num_clients,
                    context=context)
    lost = dropouts(rnd, seed, picked, fed.dropout_rate)
    return RoundClients([int(c) for c in picked], [int(c) for c in lost], len(reach))
