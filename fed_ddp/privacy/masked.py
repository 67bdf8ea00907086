"""The secure-aggregation round over the transport: four exchanges instead of one.

    KEYS    down: head + the round's body (table, privacy fields, global)   up: one key advert per client
    SHARES  down: the roster (valid adverts)                                  up: encrypted shares, per client
    MASKED  down: the shares routed to their recipients                       up: masked fixed-point updates
    UNMASK  down: who sent a masked input (one byte per roster client)        up: shares to unmask with

Every exchange is the transport's usual broadcast + gather with sizes both ends know (the head's
``slots`` says how many roster entries the body holds), so key and share traffic moves and is
counted like everything else. Clients train in the MASKED step. A client the simulation drops
(``fed.dropout_rate``) takes part in KEYS and SHARES and then sends no masked input: the protocol's
hard case, recovered from the survivors' shares of its mask key.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fed_ddp.population.sampling import dropouts
from fed_ddp.privacy import secagg as sa
from fed_ddp.privacy.engine import client_side, fixed_range, secagg_threshold, signal_clip, unpack_fields
from fed_ddp.transport import ExchangeStats

log = logging.getLogger("fed_ddp.secagg")

KEYS, SHARES, MASKED, UNMASK = 2, 3, 4, 5
STEPS = {KEYS: "keys", SHARES: "shares", MASKED: "masked", UNMASK: "unmask"}


def masked_nbytes(numel: int, ring: int) -> int:
    """One client's masked message: id, present flag, train and client seconds (fp32), packed values."""
    return sa.MASKED_HEAD + 8 + sa.packed_bytes(numel, ring)


def rounding_generator(run_seed: int, rnd: int, client: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([run_seed, rnd, client, 4]).generate_state(1, np.uint64)[0] >> 1))
    return g


def _rows(table: list[list[int]], members) -> list[list[int]]:
    keep = set(members)
    return [[c for c in row if c in keep] for row in table]


def up_each(kind: int, roster: int, numel: int = 0, ring: int = 0) -> int:
    """Bytes one client sends in a step of a round whose roster has ``roster`` clients. The server and the
    workers derive every uplink size from this one rule, so they cannot disagree on a gather's sizes."""
    return {KEYS: sa.ADVERT_BYTES, SHARES: (roster - 1) * sa.CIPHER_BYTES, MASKED: masked_nbytes(numel, ring),
            UNMASK: roster * sa.REVEAL_BYTES}[kind]


def up_sizes(table: list[list[int]], members, each: int) -> list[int]:
    """Each worker's uplink in a step: ``each`` bytes per client of its row that is among ``members``."""
    return [len(row) * each for row in _rows(table, members)]


@dataclass
class MaskedOutcome:
    total: torch.Tensor | None = None  # the unmasked sum (fp64, values), None if the round cannot be used
    used: int = 0  # clients in the sum
    step: float = 0.0  # fixed-point step (value of one unit)
    roster: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    failure: str | None = None
    stats: ExchangeStats = field(default_factory=ExchangeStats)
    timing: list[list[tuple[int, float, float]]] = field(default_factory=list)  # per worker: (client, train s, client s)
    air_up: int = 0  # over-the-air bytes, all clients of the round
    air_down: int = 0
    steps: dict = field(default_factory=dict)  # per step: seconds, cluster bytes up/down, air bytes up/down


class _Round:
    """One secure-aggregation round on the server: its table, outcome and exchanges, and what each step leaves
    for the next (roster, threshold, ring, the protocol's server, rows, share size, masked inputs)."""

    def __init__(self, ms, plan, table):
        self.ms, self.plan, self.table, self.out, self.stats = ms, plan, table, MaskedOutcome(), []
        self.slots = max((len(r) for r in table), default=0)

    def step(self, kind, body, sizes, air_down_each, count_down, training=False, slots_=None):
        """One exchange of the protocol: every worker's uplink, its stats and bytes recorded under the step."""
        t0 = time.perf_counter()
        head = self.ms.wire.pack_head(self.plan, self.slots if slots_ is None else slots_, kind=kind)
        ups, st = self.ms.exchange(head, body, sizes, self.slots, training)
        self.stats.append(st)
        self.out.steps[STEPS[kind]] = {"seconds": time.perf_counter() - t0, "cluster_up": st.bytes_up,
                                       "cluster_down": st.bytes_down, "air_down": air_down_each * count_down}
        return ups


class MaskedServer:
    """The server's side. ``exchange(head, body, sizes, slots, training)`` -> (per-worker uplinks, stats), where
    ``slots`` is the most clients any worker plays (the round deadline scales with it)."""

    def __init__(self, wire, setup, numel: int, exchange):
        self.wire, self.setup, self.numel, self.exchange = wire, setup, numel, exchange

    def run(self, plan, table, body: torch.Tensor, clip: float, noise_std: float) -> MaskedOutcome:
        """The round's four exchanges: keys, shares, masked inputs (the clients train here), unmask."""
        rd = _Round(self, plan, table)
        if self._keys(rd, body) and self._masked(rd, self._shares(rd)):
            self._unmask(rd, clip, noise_std)
        return self._done(rd.out, rd.stats)

    def _keys(self, rd: _Round, body: torch.Tensor) -> bool:
        """1. Every client's key advert (the round's body: table, fields, global); False: too few valid keys."""
        out, table = rd.out, rd.table
        everyone = [c for row in table for c in row]
        ups = rd.step(KEYS, body, up_sizes(table, everyone, up_each(KEYS, 0)), self.wire.down_bytes.total,
                      len(everyone))
        adverts = {c: _raw(m) for row, buf in zip(table, ups) for c, m in zip(row, _cut(buf, sa.ADVERT_BYTES, len(row)))}
        out.steps["keys"]["air_up"] = sa.ADVERT_BYTES * len(adverts)
        rd.roster, bad = sa.collect_adverts(adverts)
        out.rejected.update(bad)
        out.roster = [a.client for a in rd.roster]
        rd.r = r = len(rd.roster)
        rd.t = secagg_threshold(self.setup, r)
        rd.ring = sa.ring_bits(self.setup.bits, r)
        rd.server = sa.Server(rd.plan.round, rd.t, self.numel, rd.ring, rd.roster)
        if r < max(2, rd.t):
            out.failure = f"{r} clients with valid keys < threshold {max(2, rd.t)}"
            return False
        return True

    def _shares(self, rd: _Round) -> bytes:
        """2. The roster out, every client's encrypted shares back; routed to their recipients (the matrix)."""
        out, r = rd.out, rd.r
        rd.rows = _rows(rd.table, out.roster)
        rd.per = per = up_each(SHARES, r)
        body2 = torch.frombuffer(bytearray(b"".join(a.to_bytes() for a in rd.roster)), dtype=torch.uint8)
        ups = rd.step(SHARES, body2, up_sizes(rd.table, out.roster, per), r * sa.ADVERT_BYTES, r, slots_=r)
        out.steps["shares"]["air_up"] = per * r
        routed = {}  # (sender, recipient) -> ciphertext
        for row, buf in zip(rd.rows, ups):
            for c, m in zip(row, _cut(buf, per, len(row))):
                for ct in _cut(m, sa.CIPHER_BYTES, r - 1):
                    frm, to = struct.unpack("<ii", _raw(ct[:8]))
                    if frm == c and to in out.roster and to != c:
                        routed[(frm, to)] = _raw(ct)
        zero = bytes(sa.CIPHER_BYTES)
        return b"".join(routed.get((u, v), zero) for v in out.roster for u in out.roster if u != v)

    def _masked(self, rd: _Round, matrix: bytes) -> bool:
        """3. The shares to their recipients; every client trains and sends its masked input. False: too few."""
        out, r = rd.out, rd.r
        size = up_each(MASKED, r, self.numel, rd.ring)
        ups = rd.step(MASKED, torch.frombuffer(bytearray(matrix), dtype=torch.uint8), up_sizes(rd.table, out.roster, size),
                      rd.per, r, training=True, slots_=r)
        masked, timing = {}, []
        for row, buf in zip(rd.rows, ups):
            mine = []
            for c, m in zip(row, _cut(buf, size, len(row))):
                cid, present = struct.unpack("<ii", _raw(m[:8]))
                train_s, client_s = (v if math.isfinite(v) and v >= 0 else 0.0  # a client's clock is untrusted
                                     for v in m[8:16].clone().view(torch.float32).tolist())
                if cid != c or present not in (0, 1):
                    out.rejected[c] = f"masked message in client {c}'s slot says client {cid} (present={present})"
                    continue
                if present:
                    masked[c] = sa.unpack(_raw(m[16:]), self.numel, rd.ring)
                    mine.append((c, float(train_s), float(client_s)))
            timing.append(mine)
        out.timing = timing
        out.survivors = sorted(masked)
        out.steps["masked"]["air_up"] = size * len(masked)
        rd.masked = masked
        if len(masked) < rd.t:
            out.failure = f"{len(masked)} masked inputs < threshold {rd.t}"
            return False
        return True

    def _unmask(self, rd: _Round, clip: float, noise_std: float) -> None:
        """4. Who survived out, the reveals back; the sum unmasked and decoded from fixed point."""
        out, r, masked = rd.out, rd.r, rd.masked
        flags = torch.tensor([c in masked for c in out.roster], dtype=torch.uint8)
        per4 = up_each(UNMASK, r)
        srows = _rows(rd.table, out.survivors)
        ups = rd.step(UNMASK, flags, up_sizes(rd.table, out.survivors, per4), r, len(masked), slots_=r)
        out.steps["unmask"]["air_up"] = per4 * len(masked)
        reveals = {c: _raw(m) for row, buf in zip(srows, ups) for c, m in zip(row, _cut(buf, per4, len(row)))}
        t0 = time.perf_counter()
        try:
            total = rd.server.unmask(masked, reveals)
        except ValueError as e:
            out.failure = f"unmasking failed: {e}"
            return
        out.steps["unmask"]["server_seconds"] = time.perf_counter() - t0
        bits = self.setup.bits
        vr = fixed_range(self.setup.value_range, clip, noise_std, self.numel)
        out.step = vr / (2 ** (bits - 1) - 1)
        out.total, out.used = sa.decode_fixed(total, vr, bits), len(masked)

    @staticmethod
    def _done(out: MaskedOutcome, stats: list[ExchangeStats]) -> MaskedOutcome:
        s = out.stats
        for st in stats:
            s.bytes_down += st.bytes_down
            s.bytes_up += st.bytes_up
            s.seconds += st.seconds
            s.up_padding += st.up_padding
            s.up_sizes += st.up_sizes
            s.collectives += st.collectives
            s.parallel = st.parallel
        out.air_up = sum(v.get("air_up", 0) for v in out.steps.values())
        out.air_down = sum(v.get("air_down", 0) for v in out.steps.values())
        return out


def _cut(buf: torch.Tensor, size: int, count: int) -> list[torch.Tensor]:
    if buf.numel() != size * count:
        raise ValueError(f"uplink of {buf.numel()} bytes, expected {count} x {size}")
    return [buf[i * size:(i + 1) * size] for i in range(count)]


class MaskedWorker:
    """A worker's side: its clients' secagg state between the round's four exchanges."""

    def __init__(self, worker):
        self.worker = worker
        self.clients: dict[int, sa.Client] = {}
        self.row: list[int] = []
        self.roster: list[sa.Advert] = []

    def body_nbytes(self, h) -> int:
        w = self.worker.wire
        r = h.slots
        return {KEYS: w.body_nbytes(h.slots), SHARES: r * sa.ADVERT_BYTES,
                MASKED: r * (r - 1) * sa.CIPHER_BYTES, UNMASK: r}[h.kind]

    def handle(self, h, body: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """One step: (this worker's uplink, every worker's uplink size: the server's rule, from the same facts)."""
        wk = self.worker
        w, rnd = wk.wire, h.plan.round
        if h.kind == KEYS:
            self.table, self.rounds, self.global_flat = w.unpack_body_rounds(body, h.slots)
            self.clip, self.noise_std = unpack_fields(w.body_fields(body, h.slots))
            self.row = self.table[wk.index]
            self.clients = {c: sa.Client(c, rnd) for c in self.row}
            return (_cat([self.clients[c].advert() for c in self.row]),
                    up_sizes(self.table, [c for row in self.table for c in row], up_each(KEYS, 0)))
        if h.kind == SHARES:
            self.roster = [sa.Advert.from_bytes(_raw(body[i * sa.ADVERT_BYTES:(i + 1) * sa.ADVERT_BYTES]))
                           for i in range(h.slots)]
            ids = [a.client for a in self.roster]
            self.mine = [c for c in self.row if c in ids]
            t = secagg_threshold(wk.setup, len(ids))
            sizes = up_sizes(self.table, ids, up_each(SHARES, len(ids)))
            return _cat([b"".join(self.clients[c].share(self.roster, t)) for c in self.mine]), sizes
        if h.kind == MASKED:
            ids = [a.client for a in self.roster]
            r = len(ids)
            ring = sa.ring_bits(wk.setup.bits, r)
            numel = w.num_params
            vr = fixed_range(wk.setup.value_range, self.clip, self.noise_std, numel)
            lost = set(dropouts(rnd, wk.cfg.run.seed, self.mine, wk.cfg.fed.dropout_rate).tolist())
            msgs = []
            for c in self.mine:
                v = ids.index(c)
                block = body[v * (r - 1) * sa.CIPHER_BYTES:(v + 1) * (r - 1) * sa.CIPHER_BYTES]
                self.clients[c].receive([_raw(block[i * sa.CIPHER_BYTES:(i + 1) * sa.CIPHER_BYTES])
                                         for i in range(r - 1)])
                if c in lost:  # simulated: shared its keys, then never sends its masked input
                    msgs.append(struct.pack("<ii", c, 0) + bytes(up_each(MASKED, r, numel, ring) - 8))
                    continue
                t0 = time.perf_counter()
                delta, fit_metrics = wk.fit(c, h.plan, self.global_flat)
                train_s = fit_metrics["train_seconds"]
                if not wk.leader:
                    continue
                x = client_side(delta, signal_clip(self.clip, vr, self.noise_std, numel, wk.setup.bits), self.noise_std,
                                wk.cfg.privacy.dp.noise_seed, rnd, c)
                q = sa.encode_fixed(x, vr, wk.setup.bits, rounding_generator(wk.cfg.run.seed, rnd, c))
                y = self.clients[c].mask(q, ring)
                head = struct.pack("<ii", c, 1) + np.array([train_s, time.perf_counter() - t0], np.float32).tobytes()
                msgs.append(head + sa.pack(y, ring))
            sizes = up_sizes(self.table, ids, up_each(MASKED, r, numel, ring))
            return (_cat(msgs) if wk.leader else torch.empty(0, dtype=torch.uint8)), sizes
        if h.kind == UNMASK:
            ids = [a.client for a in self.roster]
            survivors = {c for c, f in zip(ids, body.tolist()) if f}
            sizes = up_sizes(self.table, survivors, up_each(UNMASK, len(ids)))
            return _cat([self.clients[c].reveal(survivors) for c in self.mine if c in survivors]), sizes
        raise ValueError(f"unknown head kind {h.kind}")


def _raw(t: torch.Tensor) -> bytes:
    """A uint8 tensor's bytes in one copy (``bytes(tensor)`` would go value by value through Python)."""
    return t.numpy().tobytes()


def _cat(parts: list[bytes]) -> torch.Tensor:
    data = b"".join(parts)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
