"""A worker: one training rank (or rank group) that plays the round's clients assigned to it.

For each client in its row of the round's assignment table, one after another, a worker

1. takes the client's encoded data from a bounded LRU cache (encoding it the first time it plays it:
   at SD scale, encoding every client up front is the wrong default);
2. trains it from the same global adapter with its own seed and a fresh optimizer (``LocalTrainer``;
   the torch or DeepSpeed engine is built once per worker and reused for every client);
3. encodes the delta with the client's own codec state (error-feedback residual, warm starts), loaded
   from and saved to the ``ClientStateStore``, and appends the message to its uplink. With
   ``personal.mode=split`` the client's personal adapter is loaded from and saved to the same state file
   and trained alongside; it is never in the message.

``Worker.handle`` is the transport's handler, so the same class serves torchrun ranks (through
``CollectiveTransport``) and in-process runs (``InMemoryTransport``: compare, tests, benchmarks).
With several ranks per worker every rank trains every client on its slice of each batch; only the
leader encodes, keeps state and sends.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch

from fed_ddp.client import LocalTrainer
from fed_ddp.compression import ChainState
from fed_ddp.data.encoded import EncodedSet
from fed_ddp.data.federated import FederatedData
from fed_ddp.diffusion.families import denoiser
from fed_ddp.diffusion.lora import clear_personal, init_personal, personal_state, set_personal
from fed_ddp.diffusion.models import encode_set
from fed_ddp.population import ClientStateStore
from fed_ddp.protocol import ROUND, ControlWire, Wire, client_codec_state
from fed_ddp.seeds import client_personal
from fed_ddp.strategies import REGISTRY, RoundPlan
from fed_ddp.strategies.scaffold import CLIENT_CONTROL, corrected_gradients

log = logging.getLogger("fed_ddp.worker")
PERSONAL_KEY = "personal|"  # prefix of the personal adapter's tensors in a client's state file


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
        self.personal = cfg.personal.mode == "split"  # each client's personal adapter lives in its state files
        from fed_ddp.privacy.engine import resolve

        self.setup = resolve(cfg, calibrate=False)  # workers get the clip and noise std from each downlink
        self.masked = None
        if self.setup is not None and self.setup.secagg:
            from fed_ddp.privacy.masked import MaskedWorker

            self.masked = MaskedWorker(self)

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
            state.load_tensors({k: v for k, v in tensors.items()
                                if not k.startswith(PERSONAL_KEY) and k != CLIENT_CONTROL}, meta)
        state.step = rnd - 1  # random streams advance with the round, whether or not the client took part
        return state

    def saved_state(self, client: int, state_round: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        saved = self.store.load_round(client, state_round)
        if saved is None:
            raise RuntimeError(
                f"client {client}: its state of round {state_round} is missing under {self.store.root}; "
                "every worker must see the run directory (run.output_dir on storage shared by all nodes)")
        return saved

    def load_personal(self, client: int, state_round: int) -> None:
        """personal.mode=split: put the client's personal adapter as of its round ``state_round`` into the model
        (-1: it never played, so peft's initialisation from its own seed)."""
        if state_round < 0:
            init_personal(denoiser(self.pipe), client_personal(self.cfg.run.seed, client))
            return
        tensors, _ = self.saved_state(client, state_round)
        set_personal(denoiser(self.pipe), {k[len(PERSONAL_KEY):]: v for k, v in tensors.items() if k.startswith(PERSONAL_KEY)})

    def client_control(self, client: int, state_round: int, like: torch.Tensor) -> torch.Tensor:
        """scaffold: the client's control variate c_i as of its round ``state_round`` (-1: zero, it never played)."""
        if state_round < 0:
            return torch.zeros_like(like)
        c_i = self.saved_state(client, state_round)[0].get(CLIENT_CONTROL)
        if c_i is None or c_i.shape != like.shape:
            raise RuntimeError(f"client {client}: its state of round {state_round} holds no control variate of "
                               f"{like.numel()} values (a run started with another fed.strategy?)")
        return c_i

    def fit_scaffold(self, client: int, plan: RoundPlan, global_flat: torch.Tensor, control: torch.Tensor,
                     state_round: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """scaffold: train with every gradient corrected by c - c_i; ([Δx_i, Δc_i], metrics, c_i+ = the mean raw
        gradient over the K local steps)."""
        c_i = self.client_control(client, state_round, control)
        params = self.trainer(client).engine.params
        with corrected_gradients(params, control - c_i, self.cfg.train.gradient_accumulation_steps) as raw:
            delta, metrics = self.fit(client, plan, global_flat)
        c_new = (raw.cpu() / plan.local_steps).to(control.dtype)
        return torch.cat([delta, c_new - c_i]), metrics, c_new

    def fit(self, client: int, plan: RoundPlan, global_flat: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Train ``client`` for one round: (its delta, its metrics)."""
        delta, metrics = self.trainer(client).fit(global_flat, plan)
        self.played += 1
        return delta, metrics

    def play(self, client: int, plan: RoundPlan, global_flat: torch.Tensor, state_round: int = -1,
             privacy: tuple[float, float] | None = None, control: torch.Tensor | None = None) -> torch.Tensor:
        """Train ``client`` for one round; its uplink message (empty on a non-leader rank). ``privacy``:
        (clip, noise std): the delta is clipped, and noised in distributed mode, before it is encoded.
        ``control``: scaffold's server control variate c (the message then carries Δc_i; c_i+ is kept)."""
        t0 = time.perf_counter()
        if self.personal:
            self.load_personal(client, state_round)
        # lora.client_ranks: the client trains its own components only (those beyond its rank start, and stay, zero)
        c_new = None
        if control is not None:
            delta, metrics, c_new = self.fit_scaffold(client, plan, global_flat, control, state_round)
        else:
            delta, metrics = self.fit(client, plan, self.wire.start_of(client, global_flat))
        personal = None
        if self.personal:  # kept in the client's state file, never in the message; the model is left without it
            personal = personal_state(denoiser(self.pipe))
            clear_personal(denoiser(self.pipe))
        if not self.leader:
            return torch.empty(0, dtype=torch.uint8)
        if privacy is not None:
            from fed_ddp.privacy.engine import client_side

            delta = client_side(delta, *privacy, self.cfg.privacy.dp.noise_seed, plan.round, client)
        state = self.codec_state(client, plan.round, state_round)
        msg = self.wire.encode_delta(delta, state, client)  # lora.client_ranks: its own components only
        if self.wire.keeps_state or self.personal:  # the same rule by which the server names each client's state round
            tensors, meta = state.to_tensors() if self.wire.keeps_state else ({}, {})
            if self.personal:  # kept on the client, never in the message
                tensors.update({PERSONAL_KEY + k: v for k, v in personal.items()})
            if c_new is not None:  # scaffold: c_i+, kept on the client
                tensors[CLIENT_CONTROL] = c_new
            # scaffold: the server points at the file this state came from until its update is applied
            self.store.save(client, plan.round, tensors, meta, keep=state_round if c_new is not None else None)
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
        privacy = None  # central mode (or no privacy): the server clips what it decodes
        if self.setup is not None and self.setup.client_clips:
            from fed_ddp.privacy.engine import unpack_fields

            privacy = unpack_fields(self.wire.body_fields(body, h.slots))
        kw = {}
        if isinstance(self.wire, ControlWire):  # scaffold: [global, c]
            global_flat, kw["control"] = self.wire.split(global_flat)
        msgs = [self.play(c, h.plan, global_flat, rounds[c], privacy, **kw) for c in table[self.index]]
        up = torch.cat(msgs) if msgs else torch.empty(0, dtype=torch.uint8)
        return up, self.wire.up_sizes(table)
