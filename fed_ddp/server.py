"""The server's round loop: sample, assign, exchange, aggregate, evaluate, checkpoint, log.

It talks to workers only through a transport (collectives or in-memory), so the same loop runs under
torchrun and in one process. Each round:

    clients = select_round(fed, round)          who is reachable, sampled, and fails to report (simulated)
    table   = assign(clients.playing, workers)  balanced; travels in the downlink body
    ups     = transport.exchange(head, body)    every worker plays its row, one message per client
    global  = strategy.aggregate(arrived updates, weights renormalised over them)

Bytes are reported two ways and never mixed: ``comm.air`` (per client: what each would receive from
and send to the base station) and ``comm.cluster`` (what the collectives moved between ranks).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fed_ddp.checkpoint import latest_checkpoint, load_state, save_checkpoint
from fed_ddp.compression import ChainState, layout_of
from fed_ddp.config import RunConfig
from fed_ddp.data.federated import FederatedData
from fed_ddp.diffusion.families import denoiser, family_of
from fed_ddp.distributed.collectives import GatherTimeout
from fed_ddp.evaluation import Evaluator, cached_base_eval, reference_classifier
from fed_ddp.files import read_text, write_text
from fed_ddp.lora_names import is_lora_name
from fed_ddp.population import WorkerCaches, assign, read_trace, select_round
from fed_ddp.privacy.engine import ServerPrivacy, pack_fields, round_trip
from fed_ddp.privacy.engine import resolve as resolve_privacy
from fed_ddp.privacy.masked import MaskedServer
from fed_ddp.protocol import ControlWire, Wire, wire_for
from fed_ddp.rundir import clear
from fed_ddp.seeds import server_codec
from fed_ddp.strategies import ClientUpdate, Strategy, lora_pairs, product_error, screen
from fed_ddp.strategies.robust import lower_median

log = logging.getLogger("fed_ddp.server")


class Server:
    def __init__(self, cfg: RunConfig, pipe, scheduler, data: FederatedData, strategy: Strategy, transport,
                 tracker, base_model: str, engine=None, wire: Wire | None = None):
        from fed_ddp.engines import TorchEngine

        self.cfg, self.pipe, self.scheduler, self.data = cfg, pipe, scheduler, data
        self.engine = engine or TorchEngine(denoiser(pipe), cfg.train)  # reads/writes the adapter (ZeRO-3 aware)
        self.strategy, self.transport, self.tracker = strategy, transport, tracker
        self.run_dir = cfg.run.dir
        self.workers = transport.num_workers
        self.wire = wire or wire_for(cfg, layout_of(denoiser(pipe)), self.workers)
        if self.wire.workers != self.workers:
            raise ValueError(f"wire built for {self.wire.workers} workers, transport has {self.workers}")
        if strategy.controls != isinstance(self.wire, ControlWire):
            raise ValueError(f"fed.strategy={cfg.fed.strategy}: build the wire with protocol.wire_for")
        self.down_state = ChainState(seed=server_codec(cfg.run.seed))  # downlink stochastic rounding
        self.unet_parameters = sum(getattr(p, "ds_numel", p.numel()) for n, p in denoiser(pipe).named_parameters()
                                   if not is_lora_name(n))  # the frozen base (ZeRO-3: full sizes, not shards)
        self.info = {"base_model": base_model, "family": cfg.model.family, "method": cfg.train.method,
                     "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets),
                              **({"client_ranks": list(cfg.lora.client_ranks)} if cfg.lora.client_ranks else {})}}
        self.sizes = np.array([len(c) for c in data.clients])
        if len(self.sizes) != cfg.fed.num_clients:
            raise ValueError(f"data has {len(self.sizes)} clients, fed.num_clients={cfg.fed.num_clients}")
        a = cfg.fed.availability
        self.trace = read_trace(a, cfg.fed.num_clients) if isinstance(a, str) else None
        self.evaluate = Evaluator(cfg, pipe, scheduler, data, tracker)
        self.last_played = np.full(cfg.fed.num_clients, -1, dtype=np.int32)  # round each client last played
        self.caches = WorkerCaches(self.workers, cfg.fed.client_cache)  # who still holds whose encoded data
        self.bad_rounds = 0  # rounds in a row that produced no usable adapter
        self.per_client_s: float | None = None  # derived deadline: 10x the first exchange's time per client slot
        self.norm_ref: float | None = None  # median update norm of the last round with two or more kept updates
        self.setup = resolve_privacy(cfg)  # None: the plain path; z is calibrated here (before round 1)
        self.privacy = ServerPrivacy(self.setup, self.wire.num_params, self.run_dir) if self.setup else None
        self.masked = None
        if self.setup is not None and self.setup.secagg:
            self.masked = MaskedServer(self.wire, self.setup, self.wire.num_params,
                                       self._exchange)
        if self.setup is not None:
            log.info("privacy: %s", self.setup.describe())
        self.stopped_at: int | None = None  # the last round run when the privacy budget stopped training
        self.wireless = self._wireless() if cfg.wireless.enabled else None
        self.pairs = lora_pairs(self.wire.layout)  # LoRA (A, B) layers: the aggregation error is reported per round
        self.frozen = _frozen_digest(denoiser(pipe))  # FFA-LoRA: the A factors every client holds, never sent

    def _wireless(self):
        """The simulated cell, with one local step's FLOPs counted on a meta copy of this UNet at the shapes of
        this run's latents and text states."""
        from fed_ddp.wireless import Wireless, unet_step_flops

        val = self.evaluate.val_sets["val_loss"]
        model = denoiser(self.pipe)
        flops = unet_step_flops(self.cfg, dict(model.config), tuple(val.latents.shape[1:]), tuple(val.embeds.shape[1:]),
                                {k: tuple(v.shape[1:]) for k, v in val.cond.items() if k != "embeds"},
                                family_of(self.pipe))
        ws = Wireless(self.cfg, flops, self.wire.up_nbytes, self.wire.down_bytes.total, self.wire.num_params)
        log.info(ws.describe())
        if warning := ws.deadline_warning(self.cfg.fed.local_steps):
            log.warning(warning)
        return ws

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, w = self.cfg, self.wire
        global_flat = self.engine.read_adapter()
        num_params = global_flat.numel()
        start = 1
        ckpt = self._resume_point() if cfg.run.resume else None
        if ckpt is not None:
            state = load_state(ckpt)
            global_flat, start = state["global"], state["round"] + 1
            if state.get("frozen_lora", self.frozen) != self.frozen:
                raise RuntimeError(f"{ckpt}: the frozen LoRA factors differ from this run's (FFA-LoRA's A comes from "
                                   "run.seed and the lora section: were they changed?); resume with the original config")
            self.strategy.load_state_dict(state["strategy"])
            self.engine.write_adapter(global_flat)
            self.down_state.step = start - 1
            if "last_played" in state:
                self.last_played = state["last_played"].numpy().astype(np.int32).copy()
            self.norm_ref = state.get("norm_ref")
            if self.wireless is not None and "wireless" in state:  # simulated time, energy, schedule go on
                self.wireless.load_state_dict(state["wireless"])
            if self.privacy is not None and state.get("privacy"):
                self.privacy.load_state_dict(json.loads(state["privacy"]))
            log.info("resuming from %s (round %d done)", ckpt, state["round"])
        elif self.privacy is not None and not cfg.run.resume:
            self.privacy.start_fresh()
        elif self.privacy is not None:  # a resume before any checkpoint: rounds computed before the crash count
            self.privacy.load_state_dict({})
        if ckpt is None and (self.run_dir / "clients").exists():  # a fresh start: no client inherits older state
            clear(self.run_dir, only=("clients",))
            log.warning("fresh start: removed the client states of an earlier run in %s", self.run_dir / "clients")
        f = cfg.fed
        who = (f"all {f.num_clients}" if f.sampling == "all" else f"q={f.sample_rate} of {f.num_clients}"
               if f.sampling == "poisson" else f"{f.clients_per_round or f.num_clients} of {f.num_clients} ({f.sampling})")
        log.info("%s: %d trained parameters (%.1f KiB fp32 per adapter); clients per round: %s on %d workers; "
                 "rounds %d..%d", "full denoiser" if cfg.train.method == "full" else "LoRA", num_params, num_params * 4 / 1024,
                 who, self.workers, start, f.rounds)
        log.info("per client per round: up %s = %d B, down %s = %d B (dense fp32 LoRA: %d B)",
                 w.up.describe(), w.up_nbytes, w.down.describe(), w.down_bytes.total, 4 * num_params)
        if w.client_ranks:
            log.info("LoRA ranks per client: client c trains rank %s[c %% %d] (global rank %d); up per client per round "
                     "by rank: %s", w.client_ranks, len(w.client_ranks), cfg.lora.rank,
                     ", ".join(f"r={r}: {b.total} B" for r, b in w.up_bytes_by_rank.items()))
        if warning := f.idle_workers_warning():
            log.warning(warning)
        history, base_eval = self._history_before(start)  # a resume's summary covers the whole run
        if start == 1:
            t0, started = time.perf_counter(), time.time()
            base_eval, cached = cached_base_eval(self.evaluate, cfg, self.info["base_model"])
            base_eval["seconds"] = {"evaluation": time.perf_counter() - t0}
            self.tracker.log({"round": 0, "started_at": started, **base_eval, "base_eval_cached": cached}, step=0)
            history.append({"round": 0, **base_eval})
            log.info("base model%s: %s", " (its evaluation reused from an earlier run with the same base and "
                     "settings: eval.cache_base)" if cached else "", _brief(base_eval))
        bar = tqdm(range(start, f.rounds + 1), desc="rounds", disable=not cfg.tracking.progress, dynamic_ncols=True)
        for rnd in bar:
            over = self.privacy.over_budget(cfg.privacy.dp.max_epsilon) if self.privacy else None
            if over is not None:
                self.stopped_at = rnd - 1
                log.warning("round %d would take epsilon to %.4g > privacy.dp.max_epsilon=%g: training stops after "
                            "round %d", rnd, over, cfg.privacy.dp.max_epsilon, rnd - 1)
                break
            row = self.round(rnd, global_flat)
            global_flat = row.pop("_global")
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss_mean'] or float('nan'):.4f}",
                            val=f"{row.get('val_loss', float('nan')):.4f}")
        bar.close()
        self.transport.stop(w.pack_head(self.strategy.configure_round(f.rounds + 1), 0, stop=True))
        return self.finish(global_flat, base_eval, history)

    def _logged_rows(self) -> dict[int, dict]:
        """Complete round rows already in metrics.jsonl (a resumed run; the last line of a round wins)."""
        path = self.run_dir / "metrics.jsonl"
        rows: dict[int, dict] = {}
        if not path.is_file():
            return rows
        for n, line in enumerate(read_text(path).splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line an older version glued to a cut one: skipped, said
                log.warning("%s:%d is not a JSON line: skipped", path, n)
                continue
            if isinstance(row, dict) and isinstance(row.get("seconds"), dict) and isinstance(row.get("round"), int):
                rows[row["round"]] = row
        return rows

    def _history_before(self, start: int) -> tuple[list[dict], dict | None]:
        """Rows of rounds 0 .. start - 1 already in metrics.jsonl (a resumed run)."""
        if start == 1:
            return [], None
        rows = {r: row for r, row in self._logged_rows().items() if r < start}
        base = rows.get(0)
        bookkeeping = ("round", "started_at", "base_eval_cached")  # of the row, not of the base's evaluation
        return [rows[r] for r in sorted(rows)], ({k: v for k, v in base.items() if k not in bookkeeping} if base else None)

    def _resume_point(self) -> Path | None:
        """The checkpoint a resume continues from: the newest whose round's row reached metrics.jsonl whole. A
        row cut by a crash after its checkpoint was written makes the resume compute that round again (from the
        checkpoint before it, bit for bit), so no round's row is lost."""
        newest = latest_checkpoint(self.run_dir)
        if newest is None or not (self.run_dir / "metrics.jsonl").is_file():
            return newest
        logged = set(self._logged_rows())
        ckpt = latest_checkpoint(self.run_dir, logged=logged)
        if ckpt != newest:
            log.warning("%s: the metrics row of %s is missing (cut by a crash): resuming from %s to compute it "
                        "again", self.run_dir / "metrics.jsonl", newest.name, ckpt.name if ckpt else "the start")
        return ckpt

    def round(self, rnd: int, global_flat: torch.Tensor) -> dict:
        """One round, start to checkpoint; returns its metrics row (and the new global under ``_global``)."""
        cfg, w = self.cfg, self.wire
        t_round = time.perf_counter()
        started = time.time()  # wall clock (Unix seconds): start-up = launch to round 1's start (benchmarks/round_floor.py)
        plan = self.strategy.configure_round(rnd)
        chosen = select_round(cfg.fed, rnd, cfg.run.seed, self.sizes, self.trace,
                              self.privacy.sample_seed if self.privacy else None,
                              pick=self.wireless.picker(rnd) if self.wireless else None)
        sim = None
        if self.wireless is not None:  # the simulated clocks of the scheduled clients; stragglers are not played
            sim = self.wireless.simulate(rnd, chosen.sampled, plan.local_steps, chosen.dropped)
            chosen = chosen.with_late(sim.late)
            if sim.late:
                log.info("round %d: %d client(s) would miss wireless.deadline_s=%g (simulated): %s", rnd,
                         len(sim.late), cfg.wireless.deadline_s, sim.late)
        # secure aggregation: the simulated dropouts take part in the key exchange, then never send (the
        # protocol's hard case); otherwise they are left out of the table
        players = chosen.sampled if self.masked else chosen.playing
        table = assign(players, self.workers, home=self.caches.home(players))  # a client back where it is encoded
        trains = set(chosen.playing)  # secure aggregation's table also holds the dropouts, which never train
        self.caches.played([[c for c in row if c in trains] for row in table])
        slots = max(len(r) for r in table)
        head = w.pack_head(plan, slots)
        keeps = w.keeps_state or cfg.personal.mode == "split"  # codec state or a personal adapter in the store
        rounds = {c: int(self.last_played[c]) for c in players if keeps and self.last_played[c] > 0}
        clip = self.privacy.clip if self.privacy else 0.0
        noise_std = self.setup.client_noise_std(clip) if self.setup else 0.0
        fields = pack_fields(clip, noise_std) if w.fields_bytes else None
        if fields is not None:  # exactly what the clients read (fp32): the fixed-point range follows from it
            clip, noise_std = round_trip(clip, noise_std)
        body = w.pack_body(table, self.strategy.downlink(global_flat), self.down_state, rounds, fields)
        updates: list[ClientUpdate] = []
        per_worker: list[list[ClientUpdate]] = []
        rejected: dict[int, str] = {}
        outcome = None
        if self.masked:
            outcome = self.masked.run(plan, table, body, clip, noise_std)
            stats = outcome.stats
            rejected.update(outcome.rejected)
            per_worker = [[ClientUpdate(c, torch.empty(0), 0, {"train_seconds": ts, "client_seconds": cs})
                           for c, ts, cs in mine] for mine in outcome.timing]
        else:
            ups, stats = self._exchange(head, body, w.up_sizes(table), slots, training=True)
            for row, buf in zip(table, ups):
                mine = []
                for cid, msg in zip(row, w.split_uplink(buf, row)):
                    try:  # a message is untrusted: a decoder error excludes its client, never ends the run
                        u = w.unpack_uplink(msg, cid, global_flat)  # lora.client_ranks: expanded to full size
                    except (ValueError, RuntimeError, IndexError, ArithmeticError) as e:
                        rejected[cid] = f"undecodable message: {' '.join(str(e).split())[:200]}"
                        continue
                    if u.client_id != cid:
                        rejected[cid] = f"message in client {cid}'s slot says client {u.client_id}"
                        continue
                    mine.append(u)
                per_worker.append(mine)
                updates.extend(mine)
        if not self.strategy.controls:  # scaffold: only once the client's update is applied (below)
            self.last_played[chosen.playing] = rnd
        updates.sort(key=lambda u: u.client_id)  # aggregation order: by client id, whoever played it
        f = cfg.fed
        private: dict = {}
        if self.privacy is None:
            kept, why = screen(updates, w.num_params, self.sizes, f.max_update_norm, f.norm_factor, self.norm_ref)
            if len(kept) >= 2:  # the yardstick for rounds with a single update left
                self.norm_ref = lower_median([float(u.delta.double().norm()) for u in kept])
            rejected.update(why)
            inputs = kept
        else:  # clipping replaces screening (a screen by the round's median norm would select by others' data)
            inputs, kept, private = self._private_inputs(rnd, chosen, updates, outcome, rejected)
        for cid, reason in sorted(rejected.items()):
            log.warning("round %d: client %d rejected: %s", rnd, cid, reason)
        t_agg = time.perf_counter()
        agg_metrics: dict = {}
        agg_error = {}
        if self.pairs and self.privacy is None and len(inputs) >= 2:  # how far FedAvg of A and B is from B·A's
            agg_error = {"lora_agg_error": product_error(self.pairs, global_flat, inputs)}
        if inputs:
            before = _copy_state(self.strategy.state_dict())
            new_global, agg_metrics = self.strategy.aggregate(rnd, global_flat, inputs)
            state = self.strategy.state_dict().values()  # server moments, control variates: as final as the adapter
            if bool(torch.isfinite(new_global).all()) and all(
                    bool(torch.isfinite(v).all()) for v in state if isinstance(v, torch.Tensor)):
                global_flat, self.bad_rounds = new_global, 0
                self.engine.write_adapter(global_flat)
                if self.strategy.controls:  # a client's saved c_i counts once its Δc_i is in c; else its older one
                    self.last_played[[u.client_id for u in inputs]] = rnd
            else:  # keep the previous adapter (and the strategy's state): a bad round never reaches a checkpoint
                self.strategy.load_state_dict(before)
                agg_metrics = {"round_rejected": True}
                log.warning("round %d: the new global adapter (or the strategy's state) is not finite: round rejected, "
                            "previous adapter kept "
                            "(%d in a row, fed.max_bad_rounds=%d)", rnd, self.bad_rounds + 1, f.max_bad_rounds)
                self._bad_round("gave a non-finite global adapter", ": lower train.lr or use a robust fed.aggregator")
        else:
            agg_metrics = {"empty_round": True}
            log.warning("round %d: no usable update (%d sampled, %d dropped, %d rejected): the global adapter is kept",
                        rnd, len(chosen.sampled), len(chosen.dropped), len(rejected))
            if rejected and not private.get("bad_round"):  # every update was bad: as suspicious as a non-finite adapter
                self._bad_round("without a usable update")
        agg_metrics.update(agg_error)
        sim_row = self.wireless.row(sim, chosen.playing, chosen.dropped) if sim is not None else {}  # before the save
        t_eval = time.perf_counter()
        last = rnd == cfg.fed.rounds
        e = cfg.eval
        every = last or rnd % e.every == 0
        acc = e.accuracy_every > 0 and rnd % e.accuracy_every == 0 and not last
        ev = self.evaluate(rnd, losses=every, grid=every, accuracy=acc)
        t_ckpt = time.perf_counter()
        self._save(f"round_{rnd:04d}", global_flat, rnd)
        t_end = time.perf_counter()
        # the exchange's critical path: workers run in parallel (in memory: one after another), each plays its
        # clients back to back; split the busiest worker's time into training and the rest of playing a client
        # (encoding its data on a cache miss, loading and saving its state, encoding its message)
        ok = {u.client_id for u in kept}  # a rejected client's clocks are as untrusted as its delta
        if outcome is not None:
            ok = set(outcome.survivors) if outcome.total is not None else set()
        busy = [sum(u.metrics["client_seconds"] for u in m if u.client_id in ok) for m in per_worker] or [0.0]
        train = [sum(u.metrics["train_seconds"] for u in m if u.client_id in ok) for m in per_worker] or [0.0]
        if stats.parallel:
            k = int(np.argmax(busy))
            busy_s, train_s = busy[k], train[k]
        else:
            busy_s, train_s = sum(busy), sum(train)
        seconds = {"local_training": train_s, "client_overhead": max(0.0, busy_s - train_s),
                   "communication": max(0.0, stats.seconds - busy_s),
                   "aggregation": t_eval - t_agg, "evaluation": t_ckpt - t_eval}
        seconds["other"] = max(0.0, (t_end - t_round) - sum(seconds.values()))
        seconds["round"] = t_end - t_round
        shown = [u for u in kept if "train_loss" in u.metrics]  # secure aggregation: no client reports its own
        arrived = [u.client_id for u in updates] if outcome is None else list(outcome.survivors)
        row = {"round": rnd,
               "clients": {"reachable": chosen.reachable, "sampled": chosen.sampled, "dropped": chosen.dropped,
                           **({"late": list(chosen.late)} if sim is not None else {}), "arrived": arrived, "rejected": {str(c): r for c, r in rejected.items()},
                           "per_worker": [len(r) for r in table]},
               "train_loss": {str(u.client_id): u.metrics["train_loss"] for u in shown},
               "train_loss_mean": float(np.average([u.metrics["train_loss"] for u in shown],
                                                   weights=[u.num_examples for u in shown])) if shown else None,
               "num_examples": {str(u.client_id): u.num_examples for u in shown},
               "train_seconds": {str(u.client_id): u.metrics["train_seconds"] for u in shown},
               **ev, "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
               "comm": self._comm(stats, len(chosen.sampled), [u.client_id for u in updates], outcome),
               "seconds": seconds, "started_at": started, **agg_metrics, **({"privacy": private} if private else {})}
        row.update(sim_row)
        self.tracker.log(row, step=rnd)
        log.info("round %d: %s", rnd, _brief(row))
        if stats.parallel and stats.seconds > 0.5 * cfg.fed.timeout_s:
            log.warning("round %d: the exchange took %.0f s, over half of fed.timeout_s=%g (one gather waits for the "
                        "busiest worker's %d clients): raise fed.timeout_s or fed.workers", rnd, stats.seconds,
                        cfg.fed.timeout_s, slots)
        return {**row, "_global": global_flat}

    def _exchange(self, head: torch.Tensor, body: torch.Tensor, sizes: list[int], slots: int, training: bool):
        """One transport exchange under the round's deadline; the training exchange of round 1 sets the
        derived deadline."""
        try:
            ups, stats = self.transport.exchange(head, body, sizes, self._deadline(slots))
        except GatherTimeout as e:
            which = "" if self.cfg.comm.gather == "p2p" else " (one of them; comm.gather=p2p names exactly which)"
            raise RuntimeError(f"round {self.wire.unpack_head(head).plan.round}: worker rank(s) {e.missing}{which} "
                               f"have not answered within {e.seconds:.0f} s (fed.round_timeout_s): hung or stopped; "
                               "every complete round is checkpointed") from None
        if training and self.cfg.fed.round_timeout_s is None and self.per_client_s is None and slots:
            self.per_client_s = 10 * stats.seconds / slots
            log.info("round deadline: 10 x %.1f s per client on the busiest worker, at least 60 s "
                     "(fed.round_timeout_s sets it)", stats.seconds / slots)
        return ups, stats

    def _private_inputs(self, rnd: int, chosen, updates: list[ClientUpdate], outcome, rejected: dict[int, str]
                        ) -> tuple[list[ClientUpdate], list[ClientUpdate], dict]:
        """Under ``privacy``: (what the strategy aggregates: one update holding the round's private mean
        delta, or nothing; the clients whose contribution is in it; the round's privacy metrics)."""
        expected = self.setup.q * chosen.reachable if self.setup.dp else None
        if outcome is None:  # the server sees each decoded update (non-finite ones are rejected there)
            mean, why, metrics = self.privacy.combine_updates({u.client_id: u.delta for u in updates}, expected, rnd)
            rejected.update(why)
            kept = [u for u in updates if u.client_id not in why]
        else:
            kept, metrics = [], {"clip": self.privacy.clip, "contributions": 0}
            mean = None
            if outcome.failure:
                log.warning("round %d: secure aggregation: %s: round not applied", rnd, outcome.failure)
                metrics["not_applied"] = outcome.failure
                if outcome.failure.startswith("unmasking failed"):  # a lying client, not a shortage of clients
                    metrics["bad_round"] = True
                    self._bad_round("whose secure aggregation could not be unmasked")
            else:
                norm, bound = float(outcome.total.norm()), self.privacy.sum_bound(outcome.used, outcome.step)
                if norm > bound:  # a client masked something it should not have: the sum is all the server has
                    if self.setup.dp and self.setup.mode == "distributed":  # the server saw a noised sum: spent
                        self.privacy.record(rnd)
                    metrics["not_applied"] = f"unmasked sum's norm {norm:.4g} > {bound:.4g} ({outcome.used} clipped updates)"
                    log.warning("round %d: secure aggregation: %s: round not applied", rnd, metrics["not_applied"])
                    metrics["bad_round"] = True
                    self._bad_round("whose unmasked sum was out of bounds")
                else:
                    mean, metrics = self.privacy.combine_sum(outcome.total, outcome.used, expected, rnd)
                    kept = [ClientUpdate(c, torch.empty(0), 0) for c in outcome.survivors]
            metrics["secagg"] = {"roster": len(outcome.roster), "survivors": len(outcome.survivors),
                                 "recovered_dropouts": len(outcome.roster) - len(outcome.survivors),
                                 "steps": outcome.steps}
        if "epsilon" in metrics:
            log.info("round %d: epsilon = %.4g (delta = %g) after %d noised rounds", rnd, metrics["epsilon"],
                     self.setup.delta, len(self.privacy.accountant.steps))
        inputs = [ClientUpdate(-1, mean, 1)] if mean is not None else []
        return inputs, kept, metrics

    def _deadline(self, slots: int) -> float | None:
        """Seconds every worker has to answer this round: fed.round_timeout_s, or (null) 10x the first exchange's
        time per client slot times this round's slots, at least 60 s; None = no deadline (0, or before round 1)."""
        rt = self.cfg.fed.round_timeout_s
        if rt is not None:
            return rt or None
        return max(60.0, self.per_client_s * slots) if self.per_client_s else None

    def _bad_round(self, what: str, advice: str = "") -> None:
        """Count a round that produced no usable adapter; fed.max_bad_rounds in a row stop the run."""
        self.bad_rounds += 1
        limit = self.cfg.fed.max_bad_rounds
        if self.bad_rounds >= limit:
            raise RuntimeError(f"{self.bad_rounds} rounds in a row {what} (fed.max_bad_rounds={limit}); the last good "
                               f"adapter is in {latest_checkpoint(self.run_dir)}{advice}")

    def _save(self, name: str, global_flat: torch.Tensor, rnd: int) -> None:
        with self.engine.gathered():  # ZeRO-3: export full LoRA tensors, never empty shards
            save_checkpoint(self.run_dir / "checkpoints" / name, denoiser(self.pipe), global_flat, rnd,
                            self.strategy.state_dict(), self.info,
                            {"last_played": torch.from_numpy(self.last_played.copy()), "norm_ref": self.norm_ref,
                             "privacy": json.dumps(self.privacy.state_dict()) if self.privacy else None,
                             "frozen_lora": self.frozen,
                             **({"wireless": self.wireless.state_dict()} if self.wireless else {})})

    def _comm(self, stats, receivers: int, senders: list[int], outcome=None) -> dict:
        """Bytes of this round, two ways never mixed.

        air: per client, what the base station's link carries: every sampled client receives the plan
        and the global adapter, every client that reports (``senders``) sends one message (payload = codec
        values, metadata = codec side information + protocol fields; with ``lora.client_ranks`` its size
        follows its rank, and ``by_rank`` splits the messages by rank), with ratios against sending the same
        messages as dense fp32 LoRA and as the full UNet. cluster: what the collectives moved between
        ranks (downlink head + body to every worker; uplink gather, padding and size exchange included).
        """
        w = self.wire
        air = {}
        if outcome is None:
            for name, sent, n in (("up", w.up_bytes_for(senders), len(senders)),
                                  ("down", w.down_bytes * receivers, receivers)):
                air[name] = {"messages": n, "payload": sent.payload, "metadata": sent.metadata,
                             "total": sent.total, **(self._ratios(sent.total, n) if sent.total else {})}
            if w.client_ranks:
                ranks = [w.rank_of(c) for c in senders]
                air["up"]["by_rank"] = {str(r): {"messages": ranks.count(r), "total": ranks.count(r) * b.total}
                                        for r, b in w.up_bytes_by_rank.items()}
        else:  # secure aggregation: every step's messages, counted per client as they went
            for name, total, n in (("up", outcome.air_up, len(outcome.roster)), ("down", outcome.air_down, receivers)):
                air[name] = {"messages": n, "payload": total, "metadata": 0, "total": total,
                             **(self._ratios(total, n) if total and n else {})}
        cluster = {"up": {"moved": stats.bytes_up, "padding": stats.up_padding, "sizes": stats.up_sizes},
                   "down": {"moved": stats.bytes_down}, "collectives": stats.collectives}
        return {"air": air, "cluster": cluster}

    def _ratios(self, total: int, messages: int) -> dict:
        """How many times fewer bytes than ``messages`` adapters as dense fp32 LoRA, and as the full UNet."""
        return {"vs_dense_lora": 4 * self.wire.num_params * messages / total,
                "vs_full_unet": 4 * self.unet_parameters * messages / total}

    def _comm_summary(self, rounds: list[dict]) -> dict:
        w = self.wire
        out = {"uplink": w.up.describe(), "downlink": w.down.describe(), "lora_parameters": w.num_params,
               "unet_parameters": self.unet_parameters,
               "per_client_round": {"up": {"payload": w.up_bytes.payload, "metadata": w.up_bytes.metadata},
                                    "down": {"payload": w.down_bytes.payload, "metadata": w.down_bytes.metadata}},
               "air": {}, "cluster": {}}
        for d in ("up", "down"):
            tot = {k: sum(h["comm"]["air"][d][k] for h in rounds) for k in ("messages", "payload", "metadata", "total")}
            if tot["total"]:
                tot.update(self._ratios(tot["total"], tot["messages"]))
            out["air"][d] = tot
            out["cluster"][d] = {"moved": sum(h["comm"]["cluster"][d]["moved"] for h in rounds)}
        if w.client_ranks:  # bytes per rank class: one message, and all of the run's
            n = self.cfg.fed.num_clients
            out["client_ranks"] = w.client_ranks
            out["rank_classes"] = {
                str(r): {"clients": sum(1 for c in range(n) if w.rank_of(c) == r),
                         "up_per_client_round": {"payload": b.payload, "metadata": b.metadata, "total": b.total},
                         "messages": sum(h["comm"]["air"]["up"].get("by_rank", {}).get(str(r), {}).get("messages", 0)
                                         for h in rounds),
                         "up_total": sum(h["comm"]["air"]["up"].get("by_rank", {}).get(str(r), {}).get("total", 0)
                                         for h in rounds)}
                for r, b in w.up_bytes_by_rank.items()}
        return out

    def _privacy_summary(self, rounds: list[dict], last: int) -> dict:
        if self.setup is None:
            return {"guarantee": "no differential privacy"}
        s, p = self.setup, self.privacy
        out: dict = {"guarantee": s.guarantee(p.accountant, p.clip), "dp": s.dp, "secagg": s.secagg,
                     "clip_norm": p.clip, "clip_norm_start": s.clip}
        if s.dp:
            out.update({"epsilon": p.accountant.epsilon(), "delta": s.delta, "accountant": s.kind,
                        "noise_multiplier": s.z, "noise_multiplier_deltas": s.z_delta, "calibrated": s.calibrated,
                        "sample_rate": s.q, "mode": s.mode, "noised_rounds": len(p.accountant.steps)})
            if s.kind == "pld":  # the classic bound next to the tight one
                from fed_ddp.privacy.accountant import epsilon

                out["epsilon_rdp"] = epsilon("rdp", p.accountant.steps, s.delta)
        if s.secagg:
            steps = [h["privacy"]["secagg"]["steps"] for h in rounds if "secagg" in h.get("privacy", {})]
            per = {}
            for k in ("keys", "shares", "masked", "unmask"):
                got = [st[k] for st in steps if k in st]
                if got:
                    per[k] = {m: sum(g.get(m, 0) for g in got) / len(got)
                              for m in ("seconds", "air_up", "air_down", "cluster_up", "cluster_down")}
            out["secagg_per_round_mean"] = per
            out["bits"] = s.bits
        return out

    def finish(self, global_flat: torch.Tensor, base_eval: dict | None, history: list[dict]) -> dict:
        t0 = time.perf_counter()
        f = self.cfg.fed
        last = f.rounds if self.stopped_at is None else self.stopped_at
        # the last round's validation losses were computed on this same adapter: reuse them
        row = next((h for h in reversed(history) if h.get("round") == last), {})
        losses = {k: row[k] for k in self.evaluate.val_sets if row.get(k) is not None}  # a resumed NaN reads None
        final = {**losses, **self.evaluate(last, losses=len(losses) < len(self.evaluate.val_sets), grid=False,
                                           accuracy=True)}
        self._save("final", global_flat, last)
        rounds = [h for h in history if h["round"] > 0]
        summary = {
            "run": self.cfg.run.name, "rounds": last, "num_clients": f.num_clients, "workers": self.workers,
            "sampling": {"mode": f.sampling, "clients_per_round": f.clients_per_round, "sample_rate": f.sample_rate,
                         "dropout_rate": f.dropout_rate,
                         "clients_sampled": sum(len(h["clients"]["sampled"]) for h in rounds),
                         "clients_arrived": sum(len(h["clients"]["arrived"]) for h in rounds),
                         "distinct_clients": len({c for h in rounds for c in h["clients"]["arrived"]}),
                         "empty_rounds": sum(1 for h in rounds if h.get("empty_round")),
                         "rejected_updates": sum(len(h["clients"].get("rejected", {})) for h in rounds),
                         "rejected_rounds": sum(1 for h in rounds if h.get("round_rejected"))},
            "method": self.cfg.train.method,
            "lora_parameters": int(global_flat.numel()),  # the trained parameters (train.method=full: the whole UNet)
            "images_per_prompt": self.cfg.eval.images_per_prompt,
            "classifier_test_accuracy": reference_classifier().test_accuracy,
            "base": {k: v for k, v in (base_eval or {}).items() if k != "seconds"},
            "final": final,
            "bytes_up_total": sum(h["bytes_up"] for h in rounds),
            "bytes_down_total": sum(h["bytes_down"] for h in rounds),
            "comm": self._comm_summary(rounds),
            "seconds_total": {k: sum(h["seconds"][k] for h in rounds) for k in
                              ("local_training", "client_overhead", "communication", "aggregation", "evaluation",
                               "other", "round")},
            "final_eval_seconds": time.perf_counter() - t0,
            "privacy": self._privacy_summary(rounds, last),
        }
        if self.wireless is not None:
            summary["sim"] = self.wireless.summary(rounds)
        if self.cfg.personal.mode != "none":  # personal adapters next to the final checkpoint, global vs personal
            from fed_ddp.personal import personalize

            summary["personal"] = personalize(self, global_flat, final)
        if last < f.rounds:
            summary["stopped_early"] = f"privacy budget: privacy.dp.max_epsilon={self.cfg.privacy.dp.max_epsilon}"
        write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        self.tracker.log({"round": last, "final": final}, step=last)
        self.tracker.finish(summary)
        return summary


def run_server(cfg: RunConfig, pipe, scheduler, data: FederatedData, transport, base_model: str, engine=None,
               wire: Wire | None = None) -> dict:
    """Take the run directory (lock, checks, ``run.overwrite``), write its config and partition, track to
    metrics.jsonl (+ W&B), and run the server loop; the lock is held until the loop ends. Shared by the
    server rank (``fed_ddp.train``) and in-process runs (``fed_ddp.compare``, tests, benchmarks)."""
    from fed_ddp.config import save_config, to_dict
    from fed_ddp.rundir import open_run
    from fed_ddp.strategies import build_strategy
    from fed_ddp.tracking import JsonlLogger, MultiLogger, maybe_wandb

    run_dir = cfg.run.dir
    lock, warnings = open_run(cfg)
    try:
        for warning in warnings:
            log.warning(warning)
        save_config(cfg, run_dir / "config.yaml")
        write_text(run_dir / "partition.json", json.dumps(data.summary(), indent=2))
        tracker = MultiLogger(JsonlLogger(run_dir / "metrics.jsonl", append=cfg.run.resume),
                              maybe_wandb(cfg, run_dir, to_dict(cfg)))
        layout = wire.layout if wire is not None else layout_of(denoiser(pipe))
        server = Server(cfg, pipe, scheduler, data, build_strategy(cfg.fed, cfg.train, layout), transport, tracker,
                        base_model, engine=engine, wire=wire)
        return server.run()
    finally:
        lock.release()


def _frozen_digest(unet) -> str | None:
    """SHA-256 of the LoRA tensors that are frozen and never travel (FFA-LoRA's A), None when there are none."""
    import hashlib

    frozen = [(n, p) for n, p in unet.named_parameters() if is_lora_name(n) and not p.requires_grad]
    if not frozen:
        return None
    h = hashlib.sha256()
    for n, p in frozen:
        h.update(n.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _copy_state(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _brief(row: dict) -> str:
    keys = ("train_loss_mean", "val_loss", "val_loss_base", "gen_acc_clients", "gen_acc_base", "bytes_up", "sim_latency_s",
            "sim_energy_j")
    return ", ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float)))
