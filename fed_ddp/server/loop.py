"""The server's round loop. It talks to workers only through a transport (collectives or in-memory), so the
same loop runs under torchrun and in one process. A round is a handful of stages, each with its inputs and
outputs in the open:

    plan    = strategy.configure_round(round)     its plan values checked against its plan_values
    chosen  = select(round, plan)                 who is reachable, sampled, late or fails to report (simulated)
    job     = assign(round, plan, chosen, global) the table (balanced) and the downlink that carries it
    got     = exchange(job)                       every worker plays its row: one message per client, decoded
    inputs  = admit(round, chosen, got)           screened, or clipped and noised under privacy
    global  = aggregate(round, global, inputs)    the strategy, rolled back if the result is not finite
    ev      = evaluator.at_round(round)           it decides what to evaluate when
    checkpoint(round), record(round)              the resume state in one bundle; the metrics row
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fed_ddp.callbacks import CallbackError, Callbacks
from fed_ddp.checkpoint import load_state, save_checkpoint
from fed_ddp.compression import ChainState, layout_of
from fed_ddp.config import RunConfig
from fed_ddp.data.federated import FederatedData
from fed_ddp.diffusion.families import denoiser, family_of
from fed_ddp.evaluation import Evaluator, cached_base_eval, reference_classifier
from fed_ddp.files import write_text
from fed_ddp.lora_names import is_lora_name
from fed_ddp.population import WorkerCaches, assign, read_trace, select_round
from fed_ddp.population.sampling import Context
from fed_ddp.privacy.engine import ServerPrivacy, pack_fields, round_trip
from fed_ddp.privacy.engine import resolve as resolve_privacy
from fed_ddp.privacy.masked import MaskedServer
from fed_ddp.protocol import ControlWire, Wire, wire_for
from fed_ddp.results import RoundRecord, RunSummary
from fed_ddp.rundir import clear
from fed_ddp.seeds import server_codec
from fed_ddp.server import history, records
from fed_ddp.server.admit import Admission, BadRounds
from fed_ddp.server.exchange import Exchange, Uplinks, decode, masked
from fed_ddp.strategies import Strategy, lora_pairs, product_error
from fed_ddp.worker import client_hooks

log = logging.getLogger("fed_ddp.server")


@dataclass
class Job:
    """One round's assignment: the table (client ids per worker), the downlink, the clip and noise sent."""
    table: list[list[int]]
    slots: int
    head: torch.Tensor
    body: torch.Tensor
    clip: float
    noise_std: float


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
        unet_parameters = sum(getattr(p, "ds_numel", p.numel()) for n, p in denoiser(pipe).named_parameters()
                              if not is_lora_name(n))  # the frozen base (ZeRO-3: full sizes, not shards)
        self.bytes = records.Bytes(self.wire, unet_parameters, cfg.fed.num_clients)
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
        # round each client was last sampled (a sampler's context: age; a straggler cut by the deadline was
        # sampled too, or the slowest devices would take every round's slots forever)
        self.last_sampled = np.full(cfg.fed.num_clients, -1, dtype=np.int64)
        self.caches = WorkerCaches(self.workers, cfg.fed.client_cache)  # who still holds whose encoded data
        self.bad_rounds = BadRounds(cfg.fed.max_bad_rounds, self.run_dir)
        self.callbacks = Callbacks(cfg.run.callbacks)  # run.callbacks: user code on this rank (fed_ddp.callbacks)
        self.exchange = Exchange(transport, self.wire, cfg.fed, cfg.comm.gather)
        self.setup = resolve_privacy(cfg)  # None: the plain path; z is calibrated here (before round 1)
        # the clients' hooks keep state of their own (a personal adapter, c_i): the same rule as Worker.play's
        self.hooks_save = any(h.saves for h in client_hooks(cfg, self.setup))
        self.privacy = ServerPrivacy(self.setup, self.wire.num_params, self.run_dir) if self.setup else None
        self.admit = Admission(cfg.fed, self.wire.num_params, self.sizes, self.setup, self.privacy, self.bad_rounds)
        self.masked = None
        if self.setup is not None and self.setup.secagg:
            self.masked = MaskedServer(self.wire, self.setup, self.wire.num_params, self.exchange)
        if self.setup is not None:
            log.info("privacy: %s", self.setup.describe())
        self.stopped_at: int | None = None  # the last round run when the privacy budget stopped training
        self.wireless = self._wireless() if cfg.wireless.enabled else None
        self.pairs = lora_pairs(self.wire.layout)  # LoRA (A, B) layers: the aggregation error is reported per round
        self.frozen = frozen_digest(denoiser(pipe))  # FFA-LoRA: the A factors every client holds, never sent

    @property
    def unet_parameters(self) -> int:
        return self.bytes.unet_parameters

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

    # -- the resume state: every piece a checkpoint saves beside the adapter, here only ---------------------------
    def state_dict(self) -> dict:
        return {"last_played": torch.from_numpy(self.last_played.copy()),
                "last_sampled": torch.from_numpy(self.last_sampled.copy()), "norm_ref": self.admit.norm_ref,
                "privacy": json.dumps(self.privacy.state_dict()) if self.privacy else None,
                "frozen_lora": self.frozen, **({"wireless": self.wireless.state_dict()} if self.wireless else {})}

    def load_state_dict(self, state: dict, ckpt: Path) -> tuple[torch.Tensor, int]:
        """Restore a checkpoint's state; returns (its global adapter, the round to run next)."""
        if state.get("frozen_lora", self.frozen) != self.frozen:
            raise RuntimeError(f"{ckpt}: the frozen LoRA factors differ from this run's (FFA-LoRA's A comes from "
                               "run.seed and the lora section: were they changed?); resume with the original config")
        self.strategy.load_state_dict(state["strategy"])
        self.engine.write_adapter(state["global"])
        self.down_state.step = state["round"]
        if "last_played" in state:
            self.last_played = state["last_played"].numpy().astype(np.int32).copy()
        sampled = state.get("last_sampled", state.get("wireless", {}).get("last_scheduled"))  # older: the cell's
        if sampled is not None:
            self.last_sampled = sampled.numpy().astype(np.int64).copy()
        self.admit.norm_ref = state.get("norm_ref")
        if self.wireless is not None and "wireless" in state:  # simulated time, energy, schedule go on
            self.wireless.load_state_dict(state["wireless"])
        if self.privacy is not None and state.get("privacy"):
            self.privacy.load_state_dict(json.loads(state["privacy"]))
        return state["global"], state["round"] + 1

    def save(self, name: str, global_flat: torch.Tensor, rnd: int) -> None:
        with self.engine.gathered():  # ZeRO-3: export full LoRA tensors, never empty shards
            save_checkpoint(self.run_dir / "checkpoints" / name, denoiser(self.pipe), global_flat, rnd,
                            self.strategy.state_dict(), self.info, self.state_dict())

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        cfg = self.cfg
        global_flat, start = self.engine.read_adapter(), 1
        ckpt = history.resume_point(self.run_dir) if cfg.run.resume else None
        if ckpt is not None:
            state = load_state(ckpt)
            global_flat, start = self.load_state_dict(state, ckpt)
            log.info("resuming from %s (round %d done)", ckpt, state["round"])
        elif self.privacy is not None and not cfg.run.resume:
            self.privacy.start_fresh()
        elif self.privacy is not None:  # a resume before any checkpoint: rounds computed before the crash count
            self.privacy.load_state_dict({})
        if ckpt is None and (self.run_dir / "clients").exists():  # a fresh start: no client inherits older state
            clear(self.run_dir, only=("clients",))
            log.warning("fresh start: removed the client states of an earlier run in %s", self.run_dir / "clients")
        self._describe(global_flat.numel(), start)
        rows, base_eval = history.before(self.run_dir, start)  # a resume's summary covers the whole run
        if start == 1:
            base_eval = self._base_round(rows)
        bar = tqdm(range(start, cfg.fed.rounds + 1), desc="rounds", disable=not cfg.tracking.progress,
                   dynamic_ncols=True)
        for rnd in bar:
            over = self.privacy.over_budget(cfg.privacy.dp.max_epsilon) if self.privacy else None
            if over is not None:
                self.stopped_at = rnd - 1
                log.warning("round %d would take epsilon to %.4g > privacy.dp.max_epsilon=%g: training stops after "
                            "round %d", rnd, over, cfg.privacy.dp.max_epsilon, rnd - 1)
                break
            row, global_flat = self.round(rnd, global_flat)
            rows.append(row)
            bar.set_postfix(loss=f"{row.train_loss_mean or float('nan'):.4f}",
                            val=f"{row.metrics.get('val_loss', float('nan')):.4f}")
        bar.close()
        self.transport.stop(self.wire.pack_head(self.plan(cfg.fed.rounds + 1), 0, stop=True))
        return self.finish(global_flat, base_eval, rows)

    def _describe(self, num_params: int, start: int) -> None:
        cfg, w, f = self.cfg, self.wire, self.cfg.fed
        who = (f"all {f.num_clients}" if f.sampling == "all" else f"q={f.sample_rate} of {f.num_clients}"
               if f.sampling == "poisson" else f"{f.clients_per_round or f.num_clients} of {f.num_clients} ({f.sampling})")
        log.info("%s: %d trained parameters (%.1f KiB fp32 per adapter); clients per round: %s on %d workers; "
                 "rounds %d..%d", "full denoiser" if cfg.train.method == "full" else "LoRA", num_params,
                 num_params * 4 / 1024, who, self.workers, start, f.rounds)
        log.info("per client per round: up %s = %d B, down %s = %d B (dense fp32 LoRA: %d B)",
                 w.up.describe(), w.up_nbytes, w.down.describe(), w.down_bytes.total, 4 * num_params)
        if w.client_ranks:
            log.info("LoRA ranks per client: client c trains rank %s[c %% %d] (global rank %d); up per client per round "
                     "by rank: %s", w.client_ranks, len(w.client_ranks), cfg.lora.rank,
                     ", ".join(f"r={r}: {b.total} B" for r, b in w.up_bytes_by_rank.items()))
        if warning := f.idle_workers_warning():
            log.warning(warning)

    def _base_round(self, rows: list[RoundRecord]) -> dict:
        """Round 0: the base model's evaluation (reused from an earlier run with the same base and settings)."""
        t0, started = time.perf_counter(), time.time()
        base_eval, cached = cached_base_eval(self.evaluate, self.cfg, self.info["base_model"])
        seconds = {"evaluation": time.perf_counter() - t0}
        row = RoundRecord(round=0, seconds=seconds, started_at=started, metrics={**base_eval, "base_eval_cached": cached})
        self.tracker.log(row.to_json(), step=0)
        rows.append(row)
        log.info("base model%s: %s", " (its evaluation reused from an earlier run with the same base and "
                 "settings: eval.cache_base)" if cached else "", records.brief(row))
        base_eval["seconds"] = seconds
        return base_eval

    def round(self, rnd: int, global_flat: torch.Tensor) -> tuple[RoundRecord, torch.Tensor]:
        """One round, start to checkpoint: its record and the new global adapter."""
        clock = records.Clock()
        extra = self.callbacks.fire("on_round_start", rnd)
        plan = self.plan(rnd)
        chosen, sim = self.select(rnd, plan)
        job = self.assign(rnd, plan, chosen, global_flat)
        got = self.exchange_round(plan, job, global_flat)
        if not self.strategy.controls:  # scaffold: only once the client's update is applied (aggregate)
            self.last_played[chosen.playing] = rnd
        inputs, kept, private = self.admit(rnd, chosen, got)
        for cid, reason in sorted(got.rejected.items()):
            log.warning("round %d: client %d rejected: %s", rnd, cid, reason)
        clock.mark("agg")
        before = global_flat
        global_flat, agg = self.aggregate(rnd, global_flat, inputs, chosen, got, private)
        extra.update(self.callbacks.fire("on_aggregate", rnd, before, inputs, global_flat, taken=extra))
        sim_row = self.wireless.row(sim, chosen.playing, chosen.dropped) if sim is not None else {}  # before the save
        clock.mark("eval")
        ev = self.evaluate.at_round(rnd)
        clock.mark("ckpt")
        self.save(f"round_{rnd:04d}", global_flat, rnd)
        self.callbacks.fire("on_checkpoint", rnd, self.run_dir / "checkpoints" / f"round_{rnd:04d}")
        clock.mark("end")
        comm = self.bytes.row(got.stats, len(chosen.sampled), [u.client_id for u in got.updates], got.outcome)
        row = records.round_row(rnd, clock, chosen, job.table, got, kept, ev, comm, agg, private, sim, sim_row)
        if self.callbacks:  # what they return joins the record (never over a name it has)
            taken = set(row.to_json())
            if clash := sorted(taken & set(extra)):
                raise CallbackError(f"run.callbacks: a callback returned {clash[0]!r} at round {rnd}, a name the round "
                                    "already reports: choose another")
            row.metrics.update({**extra, **self.callbacks.fire("on_round_end", rnd, row, taken=taken | set(extra))})
        self.tracker.log(row.to_json(), step=rnd)
        log.info("round %d: %s", rnd, records.brief(row))
        if got.stats.parallel and got.stats.seconds > 0.5 * self.cfg.fed.timeout_s:
            log.warning("round %d: the exchange took %.0f s, over half of fed.timeout_s=%g (one gather waits for the "
                        "busiest worker's %d clients): raise fed.timeout_s or fed.workers", rnd, got.stats.seconds,
                        self.cfg.fed.timeout_s, job.slots)
        return row, global_flat

    # -- the stages --------------------------------------------------------------------------------------------
    def plan(self, rnd: int):
        """The strategy's plan of round ``rnd``, its values exactly the strategy's ``plan_values``."""
        plan = self.strategy.configure_round(rnd)
        self.strategy.check_plan(self.cfg.fed.strategy, plan)
        return plan

    def select(self, rnd: int, plan):
        """The round's clients, and the simulated cell's clocks of the scheduled ones (stragglers are not played)."""
        cfg = self.cfg
        seen = self.last_sampled.view()
        seen.flags.writeable = False  # a sampler reads it, never writes it
        context = Context(seen, self.wireless.cell if self.wireless else None)
        chosen = select_round(cfg.fed, rnd, cfg.run.seed, self.sizes, self.trace,
                              self.privacy.sample_seed if self.privacy else None, context)
        self.last_sampled[chosen.sampled] = rnd
        sim = None
        if self.wireless is not None:
            sim = self.wireless.simulate(rnd, chosen.sampled, plan.local_steps, chosen.dropped)
            chosen = chosen.with_late(sim.late)
            if sim.late:
                log.info("round %d: %d client(s) would miss wireless.deadline_s=%g (simulated): %s", rnd,
                         len(sim.late), cfg.wireless.deadline_s, sim.late)
        return chosen, sim

    def assign(self, rnd: int, plan, chosen, global_flat: torch.Tensor) -> Job:
        """The table (a client back on the worker where its data is encoded) and the downlink that carries it,
        the global adapter, the rounds whose state each client reloads, and the clip and noise it applies."""
        w = self.wire
        # secure aggregation: the simulated dropouts take part in the key exchange, then never send (the
        # protocol's hard case); otherwise they are left out of the table
        players = chosen.sampled if self.masked else chosen.playing
        table = assign(players, self.workers, home=self.caches.home(players))
        trains = set(chosen.playing)  # secure aggregation's table also holds the dropouts, which never train
        self.caches.played([[c for c in row if c in trains] for row in table])
        slots = max(len(r) for r in table)
        keeps = w.keeps_state or self.hooks_save  # codec state, or a hook's (a personal adapter) in the store
        rounds = {c: int(self.last_played[c]) for c in players if keeps and self.last_played[c] > 0}
        clip = self.privacy.clip if self.privacy else 0.0
        noise_std = self.setup.client_noise_std(clip) if self.setup else 0.0
        fields = pack_fields(clip, noise_std) if w.fields_bytes else None
        if fields is not None:  # exactly what the clients read (fp32): the fixed-point range follows from it
            clip, noise_std = round_trip(clip, noise_std)
        body = w.pack_body(table, self.strategy.downlink(global_flat), self.down_state, rounds, fields)
        return Job(table, slots, w.pack_head(plan, slots), body, clip, noise_std)

    def exchange_round(self, plan, job: Job, global_flat: torch.Tensor) -> Uplinks:
        """Every worker plays its row: plain collectives, or secure aggregation's four steps."""
        if self.masked:
            return masked(self.masked.run(plan, job.table, job.body, job.clip, job.noise_std))
        ups, stats = self.exchange(job.head, job.body, self.wire.up_sizes(job.table), job.slots, training=True)
        return decode(self.wire, job.table, ups, global_flat, stats)

    def aggregate(self, rnd: int, global_flat: torch.Tensor, inputs, chosen, got: Uplinks, private: dict):
        """The strategy's new global adapter, or the previous one (and the strategy's previous state) if the new
        one is not finite; returns it and the round's aggregation metrics."""
        agg: dict = {}
        agg_error = {}
        if self.pairs and self.privacy is None and len(inputs) >= 2:  # how far FedAvg of A and B is from B·A's
            agg_error = {"lora_agg_error": product_error(self.pairs, global_flat, inputs)}
        if inputs:
            before = _copy_state(self.strategy.state_dict())
            new_global, agg = self.strategy.aggregate(rnd, global_flat, inputs)
            state = self.strategy.state_dict().values()  # server moments, control variates: as final as the adapter
            if bool(torch.isfinite(new_global).all()) and all(
                    bool(torch.isfinite(v).all()) for v in state if isinstance(v, torch.Tensor)):
                global_flat = new_global
                self.bad_rounds.good()
                self.engine.write_adapter(global_flat)
                if self.strategy.controls:  # a client's saved c_i counts once its Δc_i is in c; else its older one
                    self.last_played[[u.client_id for u in inputs]] = rnd
            else:  # keep the previous adapter (and the strategy's state): a bad round never reaches a checkpoint
                self.strategy.load_state_dict(before)
                agg = {"round_rejected": True}
                log.warning("round %d: the new global adapter (or the strategy's state) is not finite: round rejected, "
                            "previous adapter kept (%d in a row, fed.max_bad_rounds=%d)", rnd,
                            self.bad_rounds.count + 1, self.cfg.fed.max_bad_rounds)
                self.bad_rounds.bad("gave a non-finite global adapter", ": lower train.lr or use a robust fed.aggregator")
        else:
            agg = {"empty_round": True}
            log.warning("round %d: no usable update (%d sampled, %d dropped, %d rejected): the global adapter is kept",
                        rnd, len(chosen.sampled), len(chosen.dropped), len(got.rejected))
            if got.rejected and not private.get("bad_round"):  # every update bad: as suspicious as a non-finite one
                self.bad_rounds.bad("without a usable update")
        agg.update(agg_error)
        return global_flat, agg

    # -- the end -------------------------------------------------------------------------------------
    def finish(self, global_flat: torch.Tensor, base_eval: dict | None, rows: list[RoundRecord]) -> RunSummary:
        t0 = time.perf_counter()
        f = self.cfg.fed
        last = f.rounds if self.stopped_at is None else self.stopped_at
        # the last round's validation losses were computed on this same adapter: reuse them
        row = next((h.metrics for h in reversed(rows) if h.round == last), {})
        losses = {k: row[k] for k in self.evaluate.val_sets if row.get(k) is not None}  # a resumed NaN reads None
        final = {**losses, **self.evaluate(last, losses=len(losses) < len(self.evaluate.val_sets), grid=False,
                                           accuracy=True, quality=True)}
        self.save("final", global_flat, last)
        rounds = [h for h in rows if h.round > 0]
        summary = RunSummary(
            run=self.cfg.run.name, rounds=last, num_clients=f.num_clients, workers=self.workers,
            sampling=records.sampling_totals(f, rounds), method=self.cfg.train.method,
            lora_parameters=int(global_flat.numel()),  # the trained parameters (train.method=full: the whole UNet)
            images_per_prompt=self.cfg.eval.images_per_prompt,
            classifier_test_accuracy=reference_classifier().test_accuracy,
            base={k: v for k, v in (base_eval or {}).items() if k != "seconds"},
            final=final,
            bytes_up_total=sum(h.bytes_up for h in rounds),
            bytes_down_total=sum(h.bytes_down for h in rounds),
            comm=self.bytes.summary(rounds),
            seconds_total={k: sum(h.seconds[k] for h in rounds) for k in records.SECONDS},
            final_eval_seconds=time.perf_counter() - t0,
            privacy=records.privacy_summary(self.setup, self.privacy, rounds))
        if self.wireless is not None:
            summary.sim = self.wireless.summary(rounds)
        if self.cfg.personal.mode != "none":  # personal adapters next to the final checkpoint, global vs personal
            from fed_ddp.personal import personalize

            summary.personal = personalize(self, global_flat, final)
        if last < f.rounds:
            summary.stopped_early = f"privacy budget: privacy.dp.max_epsilon={self.cfg.privacy.dp.max_epsilon}"
        self.callbacks.fire("on_finish", last, summary)
        write_text(self.run_dir / "summary.json", json.dumps(summary.to_json(), indent=2))
        self.tracker.finish(summary.to_json())  # W&B: the final evaluation in the run's summary (final/...)
        return summary


def run_server(cfg: RunConfig, pipe, scheduler, data: FederatedData, transport, base_model: str, engine=None,
               wire: Wire | None = None) -> RunSummary:
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


def frozen_digest(unet) -> str | None:
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
