"""What one round puts on the wire, shared by server and workers.

Downlink (server -> every worker, two broadcasts)::

    head = [kind, round, local_steps, lr, proximal_mu, slots] (fp32; kind: ROUND, STOP, or one of secure
           aggregation's steps, whose bodies ``fed_ddp.privacy.masked`` defines)
           + the strategy's plan values (fp32, one per name in its ``plan_values``, in that order)
    body = assignment table int32 [workers x slots x 2]: (client id, round of the client's saved state;
           -1 = empty slot / no state yet) + [clip, client noise std] (fp32, only when privacy clipping is
           on) + downlink-chain message

Uplink (worker w -> server, one gather): worker w's clients' messages, one after another, in table order::

    message = uplink-chain message (the client's adapter delta)
              + [client_id] (int32) + [num_examples, train_loss, train_seconds, client_seconds] (fp32)

The state round tells the worker exactly which state file the client must continue from (the server
knows when each client last played), so a missing file is an error, never a silent fresh start, and a
file left by an interrupted round is never picked up. Every size is a function of the config, the
adapter layout and the head only, never of the data: the head's size follows from the strategy's
``plan_values`` (``fed.strategy``, looked up on both ends), the body's from ``slots``, and worker w's uplink is
exactly (clients in its row) x
``up_nbytes`` (with ``lora.client_ranks``: the sum of its clients' ``up_nbytes_of``, which follow each
client's rank), so both ends know every buffer's length before anything moves and no size travels.
Counts travel as fp32, exact up to 2**24 (16.7 M examples per client).

Byte accounting (``Wire``): per client and round, ``down_bytes`` = what a client needs over the air
(the plan fields and the strategy's plan values + the global adapter) and ``up_bytes`` = one client's message;
payload = the codec's values, metadata = the codec's scales, indices and seeds plus the protocol's fields. The assignment
table is cluster traffic only (a phone does not need to know who else plays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fed_ddp.compression import ByteCount, ChainState, CodecChain, downlink_chain, uplink_chain
from fed_ddp.lora_ranks import SubLayout, client_rank
from fed_ddp.seeds import client_codec
from fed_ddp.strategies import ClientUpdate, RoundPlan
from fed_ddp.strategies.scaffold import control_layout
from fed_ddp.strategies.updates import PLAN_FIELDS

HEAD_FIELDS = ("kind", *PLAN_FIELDS, "slots")  # then the strategy's plan values (Wire.head_nbytes)
ROUND, STOP = 0, 1  # head kinds; secure aggregation adds its steps (fed_ddp.privacy.masked: 2..5)
HEAD_BYTES = 4 * len(HEAD_FIELDS)  # the head of a strategy without plan values
PLAN_BYTES = 4 * 5  # the plan fields a client needs (all but slots), before the strategy's plan values
UP_FIELDS = ("num_examples", "train_loss", "train_seconds", "client_seconds")
UP_TAIL_BYTES = 4 + 4 * len(UP_FIELDS)  # int32 client id + fp32 fields


def plan_nbytes(plan_values=()) -> int:
    """What of the downlink head one client needs: the plan fields, then one fp32 per strategy plan value."""
    return PLAN_BYTES + 4 * len(plan_values)


def _f32_bytes(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(torch.uint8)


def _f32(buf: torch.Tensor) -> list[float]:
    return buf.clone().view(torch.float32).tolist()


def client_codec_state(run_seed: int, client_id: int) -> ChainState:
    """A client's uplink codec state (error feedback, warm starts), with random streams of its own."""
    return ChainState(seed=client_codec(run_seed, client_id))


@dataclass(frozen=True)
class Head:
    kind: int  # ROUND, STOP, or a secure-aggregation step
    plan: RoundPlan
    slots: int  # ROUND: the most clients any worker plays this round (columns of the table); else a count

    @property
    def stop(self) -> bool:
        return self.kind == STOP


class Wire:
    """Packs and unpacks the round's buffers with the configured codec chains.

    ``layout`` is the adapter's (name, shape) list in flat-vector order (``compression.layout_of``);
    ``workers`` the number of rows of the assignment table; ``plan_values`` the strategy's (``Strategy.plan_values``),
    sent after the head's own fields. ``client_ranks`` (``lora.client_ranks``; empty:
    every client sends the whole adapter): client c sends only its rank's sub-layout
    (``fed_ddp.lora_ranks``) through an uplink chain of its own size, so message sizes are per client.
    """

    def __init__(self, comm, layout, workers: int = 1, privacy_fields: bool = False, client_ranks=(),
                 up_metrics=(), plan_values=()):
        self.plan_values = tuple(plan_values)
        self.head_nbytes = HEAD_BYTES + 4 * len(self.plan_values)
        self.plan_bytes = plan_nbytes(self.plan_values)  # what of the head one client needs
        # the uplink's protocol fields: UP_FIELDS, then the objective's per-client metrics (one fp32 slot each)
        self.up_fields = UP_FIELDS + tuple(up_metrics)
        self.up_tail = 4 + 4 * len(self.up_fields)
        self.client_ranks = [int(r) for r in client_ranks or ()]
        self.subs = {r: SubLayout(layout, r) for r in sorted(set(self.client_ranks))}
        self.up_by_rank = {r: uplink_chain(comm, s.layout) for r, s in self.subs.items()}
        self.up_bytes_by_rank = {r: c.wire_bytes + ByteCount(0, self.up_tail) for r, c in self.up_by_rank.items()}
        self.up: CodecChain = uplink_chain(comm, layout)
        self.down: CodecChain = downlink_chain(comm, layout)
        self.layout, self.workers = list(layout), int(workers)
        self.num_params = self.up.numel
        self.up_bytes = self.up.wire_bytes + ByteCount(0, self.up_tail)  # one client's message
        # privacy (clipping on): the round's clip and the std of the noise each client adds travel in the body
        self.fields_bytes = 8 if privacy_fields else 0
        self.down_bytes = self.down.wire_bytes + ByteCount(0, self.plan_bytes + self.fields_bytes)  # one client's
        self.up_nbytes = self.up_bytes.total
        self.down_msg_nbytes = self.down.wire_bytes.total
        probe = ChainState()
        self.up.encode(torch.zeros(self.num_params), probe)
        self.keeps_state = bool(probe.residual or probe.slots)  # clients save codec state every round they play

    # -- server -> workers ------------------------------------------------------------------------
    def pack_head(self, plan: RoundPlan, slots: int, stop: bool = False, kind: int = ROUND) -> torch.Tensor:
        """``plan.values`` must hold every name in ``plan_values`` (the server checks: ``Strategy.check_plan``)."""
        return _f32_bytes([float(STOP if stop else kind), plan.round, plan.local_steps, plan.lr, plan.proximal_mu,
                           slots, *(float(plan.values[k]) for k in self.plan_values)])

    def unpack_head(self, buf: torch.Tensor) -> Head:
        self._check(buf, self.head_nbytes, "downlink head")
        kind, rnd, steps, lr, mu, slots, *values = _f32(buf)
        plan = RoundPlan(int(rnd), int(steps), float(lr), float(mu), dict(zip(self.plan_values, values)))
        return Head(int(kind), plan, int(slots))

    def body_nbytes(self, slots: int) -> int:
        return 8 * self.workers * slots + self.fields_bytes + self.down_msg_nbytes

    def pack_body(self, table: list[list[int]], global_flat: torch.Tensor, state: ChainState | None = None,
                  state_rounds: dict[int, int] | None = None, fields: torch.Tensor | None = None) -> torch.Tensor:
        """``state_rounds``: client -> round of its saved state (absent: none yet); ``fields``: the privacy
        fields (``fields_bytes`` bytes) when the wire carries them."""
        slots = max((len(row) for row in table), default=0)
        if len(table) != self.workers:
            raise ValueError(f"assignment table has {len(table)} rows, the wire has {self.workers} workers")
        ids = torch.full((self.workers, slots, 2), -1, dtype=torch.int32)
        for w, row in enumerate(table):
            for s, c in enumerate(row):
                ids[w, s, 0], ids[w, s, 1] = c, (state_rounds or {}).get(c, -1)
        msg = self.down.encode_bytes(global_flat.detach().float().cpu(), state)
        extra = fields if fields is not None else torch.empty(0, dtype=torch.uint8)
        if extra.numel() != self.fields_bytes:
            raise ValueError(f"privacy fields: {extra.numel()} bytes, the wire carries {self.fields_bytes}")
        return torch.cat([ids.reshape(-1).view(torch.uint8), extra, msg])

    def unpack_body(self, buf: torch.Tensor, slots: int) -> tuple[list[list[int]], torch.Tensor]:
        """(each worker's client ids, the global adapter as clients see it: decoded, fp32)."""
        table, _, flat = self.unpack_body_rounds(buf, slots)
        return table, flat

    def unpack_body_rounds(self, buf: torch.Tensor, slots: int
                           ) -> tuple[list[list[int]], dict[int, int], torch.Tensor]:
        """(each worker's client ids, each listed client's state round (-1: none), the decoded global)."""
        self._check(buf, self.body_nbytes(slots), "downlink body")
        cut = 8 * self.workers * slots
        ids = buf[:cut].clone().view(torch.int32).reshape(self.workers, slots, 2).tolist()
        table = [[c for c, _ in row if c >= 0] for row in ids]
        rounds = {c: r for row in ids for c, r in row if c >= 0}
        return table, rounds, self.down.decode_bytes(buf[cut + self.fields_bytes:])

    def body_fields(self, buf: torch.Tensor, slots: int) -> torch.Tensor:
        """The privacy fields of a body (empty when the wire carries none)."""
        cut = 8 * self.workers * slots
        return buf[cut:cut + self.fields_bytes]

    def up_sizes(self, table: list[list[int]]) -> list[int]:
        """Bytes each worker sends this round, by worker index."""
        if not self.client_ranks:
            return [len(row) * self.up_nbytes for row in table]
        return [sum(self.up_nbytes_of(c) for c in row) for row in table]

    # -- heterogeneous ranks: per-client sizes (the uniform ones when lora.client_ranks is empty) -------
    def rank_of(self, client: int) -> int | None:
        """Client ``client``'s LoRA rank (None: every client sends the whole adapter)."""
        return client_rank(self.client_ranks, client) if self.client_ranks else None

    def up_bytes_of(self, client: int) -> ByteCount:
        """One message of ``client``."""
        if not self.client_ranks:
            return self.up_bytes
        return self.up_bytes_by_rank[self.rank_of(client)]

    def up_nbytes_of(self, client: int) -> int:
        return self.up_bytes_of(client).total

    def up_bytes_for(self, clients: list[int]) -> ByteCount:
        """All of ``clients``' messages (one each)."""
        if not self.client_ranks:
            return self.up_bytes * len(clients)
        return sum((self.up_bytes_of(c) for c in clients), ByteCount())

    def start_of(self, client: int, global_flat: torch.Tensor) -> torch.Tensor:
        """The adapter ``client`` trains from: the global one, its components beyond the client's rank zeroed."""
        return global_flat if not self.client_ranks else self.subs[self.rank_of(client)].start(global_flat)

    # -- a client's message -----------------------------------------------------------------------
    def pack_uplink(self, client_id: int, delta: torch.Tensor, state: ChainState | None, num_examples: int,
                    metrics: dict[str, float]) -> torch.Tensor:
        """Encode ``delta`` (updating the client's error-feedback ``state``) and append its id and fields."""
        return self.with_fields(self.encode_delta(delta, state, client_id), client_id, num_examples, metrics)

    def encode_delta(self, delta: torch.Tensor, state: ChainState | None, client: int | None = None) -> torch.Tensor:
        """The codec message of a full-size ``delta``; heterogeneous ranks: of ``client``'s components only."""
        delta = delta.detach().float().cpu()
        if not self.client_ranks:
            return self.up.encode_bytes(delta, state)
        r = self.rank_of(client)
        return self.up_by_rank[r].encode_bytes(self.subs[r].take(delta), state)

    def with_fields(self, msg: torch.Tensor, client_id: int, num_examples: int, metrics: dict[str, float]
                    ) -> torch.Tensor:
        cid = torch.tensor([client_id], dtype=torch.int32).view(torch.uint8)
        return torch.cat([msg, cid, _f32_bytes([num_examples] + [metrics[k] for k in self.up_fields[1:]])])

    def unpack_uplink(self, buf: torch.Tensor, client: int | None = None,
                      global_flat: torch.Tensor | None = None) -> ClientUpdate:
        """A client's message -> its update. Heterogeneous ranks: ``client`` (whose slot the message came in)
        names its sub-layout, and its delta comes back full size against ``global_flat`` (``SubLayout.expand``)."""
        if self.client_ranks and (client is None or global_flat is None):
            raise ValueError("heterogeneous ranks: unpack_uplink needs the slot's client and the global adapter")
        self._check(buf, self.up_nbytes_of(client), "uplink message")
        tail = buf[-self.up_tail:]
        cid = int(tail[:4].clone().view(torch.int32).item())
        fields = dict(zip(self.up_fields, _f32(tail[4:])))
        n = fields.pop("num_examples")
        if not math.isfinite(n):  # round(inf) would raise OverflowError: refuse it as a bad message
            raise ValueError(f"uplink message: num_examples={n}")
        if not self.client_ranks:
            delta = self.up.decode_bytes(buf[:-self.up_tail])
        else:
            r = self.rank_of(client)
            chain = self.up_by_rank[r]
            delta = self.subs[r].expand(chain.decode_bytes(buf[:-self.up_tail]), global_flat.float().cpu())
        return ClientUpdate(cid, delta, round(n), fields)

    def split_uplink(self, buf: torch.Tensor, clients: int | list[int]) -> list[torch.Tensor]:
        """A worker's uplink buffer -> its clients' messages (``clients``: their ids in table order, or their
        count when every message has the same size)."""
        if isinstance(clients, int):
            if self.client_ranks:
                raise ValueError("heterogeneous ranks: split_uplink needs the clients' ids, not their count")
            clients = [0] * clients
        sizes = [self.up_nbytes_of(c) for c in clients]
        self._check(buf, sum(sizes), "worker uplink")
        return list(buf.split(sizes)) if sizes else []

    @staticmethod
    def _check(buf: torch.Tensor, want: int, what: str) -> None:
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != want:
            raise ValueError(f"{what} buffer: expected {want} uint8 bytes, got {buf.dtype} {tuple(buf.shape)}")


def wire_for(cfg, layout, workers: int, comm=None) -> Wire:
    """The wire a run of ``cfg`` uses (``comm``: its codec section, ``cfg.comm`` by default): scaffold's
    ``ControlWire`` (the control variates travel with the adapter), else the plain one with the privacy fields
    and per-client ranks the config asks for; either with the strategy's plan values in the head."""
    from fed_ddp.objectives import lookup as objective
    from fed_ddp.strategies import lookup

    comm = cfg.comm if comm is None else comm
    metrics = objective(cfg.train.objective).metrics  # each client's objective metrics travel with its message
    strategy = lookup(cfg.fed.strategy)
    if strategy.controls:
        return ControlWire(comm, layout, workers, up_metrics=metrics, plan_values=strategy.plan_values)
    return Wire(comm, layout, workers, privacy_fields=cfg.privacy.clips, client_ranks=cfg.lora.client_ranks,
                up_metrics=metrics, plan_values=strategy.plan_values)


class ControlWire(Wire):
    """The wire of ``fed.strategy=scaffold``: every message is one flat vector over the adapter's layout followed
    by the control variates' (``strategies.scaffold.control_layout``): downlink [global, c], uplink [Δx_i, Δc_i].
    The codec chains (and so every byte count) cover both halves; ``layout`` and ``num_params`` stay the
    adapter's, and clients keep state every round they play (their c_i)."""

    def __init__(self, comm, layout, workers: int = 1, up_metrics=(), plan_values=()):
        super().__init__(comm, control_layout(layout), workers, up_metrics=up_metrics, plan_values=plan_values)
        self.layout = list(layout)
        self.num_params = self.up.numel // 2
        self.keeps_state = True

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A message vector -> (its adapter half, its control half)."""
        return flat[:self.num_params], flat[self.num_params:]

    def unpack_uplink(self, buf: torch.Tensor, client: int | None = None,
                      global_flat: torch.Tensor | None = None) -> ClientUpdate:
        u = super().unpack_uplink(buf)
        u.delta, u.control = self.split(u.delta)
        return u
