"""A worker: one training rank (or rank group) that plays the round's clients assigned to it.

For each client in its row of the round's assignment table, one after another, a worker

1. takes the client's encoded data from a bounded LRU cache (encoding it the first time it plays it:
   at SD scale, encoding every client up front is the wrong default);
2. trains it from the same global adapter with its own seed and a fresh optimizer (``LocalTrainer``;
   the torch or DeepSpeed engine is built once per worker and reused for every client);
3. encodes the delta with the client's own codec state (error-feedback residual, warm starts), loaded
   from and saved to the ``ClientStateStore``, and appends the message to its uplink.

What a strategy or feature adds to that (SCAFFOLD's correction and c_i, a personal adapter, privacy's clip and
noise) comes in as ``hooks.ClientHook``s that the feature owns (``client_hooks``): ``Worker`` has no branch for any.

``Worker.handle`` is the transport's handler, so the same class serves torchrun ranks (through
``CollectiveTransport``) and in-process runs (``InMemoryTransport``: compare, tests, benchmarks).
With several ranks per worker every rank trains every client on its slice of each batch; only the
leader encodes, keeps state and sends.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict

import torch

from fed_ddp.client import LocalTrainer
from fed_ddp.compression import ChainState
from fed_ddp.data.encoded import EncodedSet
from fed_ddp.data.federated import FederatedData
from fed_ddp.diffusion.models import encode_set
from fed_ddp.hooks import ClientHook, ClientJob
from fed_ddp.personal import PersonalClient
from fed_ddp.population import ClientStateStore
from fed_ddp.privacy.engine import ClientClip, resolve
from fed_ddp.privacy.masked import MaskedWorker
from fed_ddp.protocol import ROUND, ControlWire, Wire, client_codec_state
from fed_ddp.strategies import REGISTRY, RoundPlan

log = logging.getLogger("fed_ddp.worker")


def client_hooks(cfg, setup) -> list[ClientHook]:
    """What the run's features add to every client's round, in the order they run: the personal adapter, the
    strategy's own (``Strategy.client_hook``: SCAFFOLD), then privacy's clip and noise, last before the codec."""
    hooks = [PersonalClient(cfg.run.seed)] if cfg.personal.mode == "split" else []
    if (own := REGISTRY[cfg.fed.strategy].client_hook(cfg)) is not None:
        hooks.append(own)
    if setup is not None and setup.client_clips:  # central mode (or no privacy): the server clips what it decodes
        hooks.append(ClientClip(cfg.privacy.dp.noise_seed))
    return hooks


class Worker:
    def __init__(self, index: int, cfg, pipe, scheduler, data: FederatedData, wire: Wire, engine=None,
                 store: ClientStateStore | None = None, replay: EncodedSet | None = None, leader: bool = True,
                 rank_in_client: int = 0, ranks_per_client: int = 1):
        self.index, self.cfg, self.pipe, self.scheduler, self.data = index, cfg, pipe, scheduler, data
        self.wire, self.engine, self.leader = wire, engine, leader
        if REGISTRY[cfg.fed.strategy].controls != isinstance(wire, ControlWire):
            raise ValueError(f"fed.strategy={cfg.fed.strategy}: build the wire with protocol.wire_for")
        self.store = store if store is not None else ClientStateStore(cfg.run.dir / "clients", cfg.fed.client_cache)
        self.rank_in_client, self.ranks_per_client = rank_in_client, ranks_per_client
        self.replay: EncodedSet | None = None  # shared by every client this worker plays
        if data.replay is not None and cfg.data.replay_fraction > 0:  # given: the server encoded it for every rank
            self.replay = replay if replay is not None else encode_set(pipe, data.replay)
        self._trainers: OrderedDict[int, LocalTrainer] = OrderedDict()
        self.cache_size = max(1, cfg.fed.client_cache)
        self.encoded = 0  # clients encoded so far (cache misses)
        self.played = 0
        self.setup = resolve(cfg, calibrate=False)  # workers get the clip and noise std from each downlink
        self.hooks = client_hooks(cfg, self.setup)
        self.masked = MaskedWorker(self) if self.setup is not None and self.setup.secagg else None

    # -- clients --------------------------------------------------------------------------------
    def trainer(self, client: int) -> LocalTrainer:
        t = self._trainers.get(client)
        if t is None:
            t = LocalTrainer(self.pipe, self.scheduler, self.data.clients[client], self.cfg.train, self.cfg.run.seed,
                             self.replay, self.cfg.data.replay_fraction, client_id=client, engine=self.engine,
                             rank_in_client=self.rank_in_client, ranks_per_client=self.ranks_per_client,
                             personal_lr=self.cfg.personal.lr)
            self.encoded += 1
            self._trainers[client] = t
            while len(self._trainers) > self.cache_size:
                self._trainers.popitem(last=False)
        self._trainers.move_to_end(client)
        return t

    def codec_state(self, client: int, rnd: int, state_round: int) -> ChainState:
        """The client's uplink codec state as of its round ``state_round`` (-1: it has none yet)."""
        state = client_codec_state(self.cfg.run.seed, client)
        if state_round >= 0 and self.wire.keeps_state:
            tensors, meta = self.saved_state(client, state_round)
            owned = tuple(h.prefix for h in self.hooks if h.prefix)  # the hooks' tensors, not the codec's
            state.load_tensors({k: v for k, v in tensors.items() if not k.startswith(owned)}, meta)
        state.step = rnd - 1  # random streams advance with the round, whether or not the client took part
        return state

    def saved_state(self, client: int, state_round: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        saved = self.store.load_round(client, state_round)
        if saved is None:
            raise RuntimeError(
                f"client {client}: its state of round {state_round} is missing under {self.store.root}; "
                "every worker must see the run directory (run.output_dir on storage shared by all nodes)")
        return saved

    def fit(self, client: int, plan: RoundPlan, start: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Train ``client`` for one round from ``start``: (its delta, its metrics)."""
        delta, metrics = self.trainer(client).fit(start, plan)
        self.played += 1
        return delta, metrics

    def play(self, client: int, plan: RoundPlan, global_flat: torch.Tensor, state_round: int = -1) -> torch.Tensor:
        """Train ``client`` for one round; its uplink message (empty on a non-leader rank). The hooks add what
        their feature needs (``fed_ddp.hooks``); what they keep goes to the client's state file, not the message."""
        t0 = time.perf_counter()
        # lora.client_ranks: the client trains its own components only (those beyond its rank start, and stay, zero)
        job = ClientJob(client, plan, state_round, self.wire.start_of(client, global_flat))
        for h in self.hooks:
            h.before_fit(self, job)
        with contextlib.ExitStack() as fitting:
            for h in self.hooks:
                fitting.enter_context(h.fitting(self, job))
            delta, metrics = self.fit(client, plan, job.start)
        for h in self.hooks:
            delta = h.after_fit(self, job, delta)
        if not self.leader:
            return torch.empty(0, dtype=torch.uint8)
        for h in self.hooks:
            delta = h.before_encode(self, job, delta)
        state = self.codec_state(client, plan.round, state_round)
        msg = self.wire.encode_delta(delta, state, client)  # lora.client_ranks: its own components only
        if self.wire.keeps_state or job.saved:  # the same rule by which the server names each client's state round
            tensors, meta = state.to_tensors() if self.wire.keeps_state else ({}, {})
            self.store.save(client, plan.round, {**tensors, **job.saved}, meta, keep=job.keep)
        metrics["client_seconds"] = time.perf_counter() - t0  # data, state, training, encoding, saving
        return self.wire.with_fields(msg, client, self.trainer(client).num_examples, metrics)

    # -- transport handlers -----------------------------------------------------------------------
    def body_nbytes(self, head: torch.Tensor) -> int | None:
        h = self.wire.unpack_head(head)
        if h.stop:
            return None
        if h.kind != ROUND:
            if self.masked is None:
                raise ValueError(f"downlink head kind {h.kind}: a secure-aggregation step, but privacy.secagg is off")
            return self.masked.body_nbytes(h)
        return self.wire.body_nbytes(h.slots)

    def handle(self, head: torch.Tensor, body: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """One exchange: play this worker's clients (or a secure-aggregation step); (its uplink buffer, every
        worker's uplink size)."""
        h = self.wire.unpack_head(head)
        if h.kind != ROUND:
            return self.masked.handle(h, body)
        table, rounds, global_flat = self.wire.unpack_body_rounds(body, h.slots)
        for hook in self.hooks:  # SCAFFOLD's c, the clip and noise std: each hook reads its part
            global_flat = hook.downlink(self.wire, body, h.slots, global_flat)
        msgs = [self.play(c, h.plan, global_flat, rounds[c]) for c in table[self.index]]
        up = torch.cat(msgs) if msgs else torch.empty(0, dtype=torch.uint8)
        return up, self.wire.up_sizes(table)
