"""The record stage: what a round and a run report, built here only.

Bytes are reported two ways and never mixed: ``comm.air`` (per client: what each would receive from and send
to the base station) and ``comm.cluster`` (what the collectives moved between ranks). Seconds split the
round's wall time into local training, client overhead, communication, aggregation, evaluation and other.
"""

from __future__ import annotations

import time

import numpy as np

from fed_ddp.protocol import UP_FIELDS
from fed_ddp.results import SECONDS, RoundRecord

__all__ = ["SECONDS", "Bytes", "Clock", "brief", "privacy_summary", "round_row", "sampling_totals"]


class Clock:
    """The round's marks: start, aggregation, evaluation, checkpoint, end (``time.perf_counter``)."""

    def __init__(self):
        self.started = time.time()  # wall clock (Unix seconds): start-up = launch to round 1's start
        self.marks = {"start": time.perf_counter()}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def seconds(self, got, ok: set[int]) -> dict:
        """The split. The exchange's critical path: workers run in parallel (in memory: one after another), each
        plays its clients back to back; the busiest worker's time is split into training and the rest of playing
        a client (encoding its data on a cache miss, loading and saving its state, encoding its message). Only
        the clocks of clients in ``ok`` count: a rejected client's clocks are as untrusted as its delta."""
        m, stats = self.marks, got.stats
        busy = [sum(u.metrics["client_seconds"] for u in w if u.client_id in ok) for w in got.per_worker] or [0.0]
        train = [sum(u.metrics["train_seconds"] for u in w if u.client_id in ok) for w in got.per_worker] or [0.0]
        if stats.parallel:
            k = int(np.argmax(busy))
            busy_s, train_s = busy[k], train[k]
        else:
            busy_s, train_s = sum(busy), sum(train)
        out = {"local_training": train_s, "client_overhead": max(0.0, busy_s - train_s),
               "communication": max(0.0, stats.seconds - busy_s),
               "aggregation": m["eval"] - m["agg"], "evaluation": m["ckpt"] - m["eval"]}
        out["other"] = max(0.0, (m["end"] - m["start"]) - sum(out.values()))
        out["round"] = m["end"] - m["start"]
        return out


class Bytes:
    """Byte accounting of one run's wire: per round (``row``) and over the run (``summary``)."""

    def __init__(self, wire, unet_parameters: int, num_clients: int):
        self.wire, self.unet_parameters, self.num_clients = wire, unet_parameters, num_clients

    def ratios(self, total: int, messages: int) -> dict:
        """How many times fewer bytes than ``messages`` adapters as dense fp32 LoRA, and as the full UNet."""
        return {"vs_dense_lora": 4 * self.wire.num_params * messages / total,
                "vs_full_unet": 4 * self.unet_parameters * messages / total}

    def row(self, stats, receivers: int, senders: list[int], outcome=None) -> dict:
        """air: every sampled client receives the plan and the global adapter, every client that reports
        (``senders``) sends one message (payload = codec values, metadata = codec side information + protocol
        fields; with ``lora.client_ranks`` its size follows its rank, and ``by_rank`` splits the messages by
        rank), with ratios against dense fp32 LoRA and the full UNet. cluster: what the collectives moved
        (downlink head + body to every worker; uplink gather, padding and size exchange included)."""
        w = self.wire
        air = {}
        if outcome is None:
            for name, sent, n in (("up", w.up_bytes_for(senders), len(senders)),
                                  ("down", w.down_bytes * receivers, receivers)):
                air[name] = {"messages": n, "payload": sent.payload, "metadata": sent.metadata,
                             "total": sent.total, **(self.ratios(sent.total, n) if sent.total else {})}
            if w.client_ranks:
                ranks = [w.rank_of(c) for c in senders]
                air["up"]["by_rank"] = {str(r): {"messages": ranks.count(r), "total": ranks.count(r) * b.total}
                                        for r, b in w.up_bytes_by_rank.items()}
        else:  # secure aggregation: every step's messages, counted per client as they went
            for name, total, n in (("up", outcome.air_up, len(outcome.roster)), ("down", outcome.air_down, receivers)):
                air[name] = {"messages": n, "payload": total, "metadata": 0, "total": total,
                             **(self.ratios(total, n) if total and n else {})}
        cluster = {"up": {"moved": stats.bytes_up, "padding": stats.up_padding, "sizes": stats.up_sizes},
                   "down": {"moved": stats.bytes_down}, "collectives": stats.collectives}
        return {"air": air, "cluster": cluster}

    def summary(self, rounds: list[RoundRecord]) -> dict:
        w = self.wire
        out = {"uplink": w.up.describe(), "downlink": w.down.describe(), "lora_parameters": w.num_params,
               "unet_parameters": self.unet_parameters,
               "per_client_round": {"up": {"payload": w.up_bytes.payload, "metadata": w.up_bytes.metadata},
                                    "down": {"payload": w.down_bytes.payload, "metadata": w.down_bytes.metadata}},
               "air": {}, "cluster": {}}
        for d in ("up", "down"):
            tot = {k: sum(h.comm["air"][d][k] for h in rounds) for k in ("messages", "payload", "metadata", "total")}
            if tot["total"]:
                tot.update(self.ratios(tot["total"], tot["messages"]))
            out["air"][d] = tot
            out["cluster"][d] = {"moved": sum(h.comm["cluster"][d]["moved"] for h in rounds)}
        if w.client_ranks:  # bytes per rank class: one message, and all of the run's
            out["client_ranks"] = w.client_ranks
            out["rank_classes"] = {
                str(r): {"clients": sum(1 for c in range(self.num_clients) if w.rank_of(c) == r),
                         "up_per_client_round": {"payload": b.payload, "metadata": b.metadata, "total": b.total},
                         "messages": sum(h.air("up").get("by_rank", {}).get(str(r), {}).get("messages", 0)
                                         for h in rounds),
                         "up_total": sum(h.air("up").get("by_rank", {}).get(str(r), {}).get("total", 0)
                                         for h in rounds)}
                for r, b in w.up_bytes_by_rank.items()}
        return out


def round_row(rnd: int, clock: Clock, chosen, table, got, kept, ev: dict, comm: dict, agg: dict, private: dict,
              sim, sim_row: dict) -> RoundRecord:
    """One round's record (metrics.jsonl, W&B)."""
    ok = {u.client_id for u in kept}
    if got.outcome is not None:
        ok = set(got.outcome.survivors) if got.outcome.total is not None else set()
    shown = [u for u in kept if "train_loss" in u.metrics]  # secure aggregation: no client reports its own
    # train.objective's metrics, per client (the protocol's own fields have their places above)
    named = sorted({k for u in shown for k in u.metrics} - set(UP_FIELDS))
    objective = {k: {str(u.client_id): u.metrics[k] for u in shown if k in u.metrics} for k in named}
    others = {**ev, **agg, **sim_row, "privacy": None}
    if clash := sorted(set(objective) & set(others)):
        raise RuntimeError(f"round {rnd}: train.objective's metric {clash[0]!r} is a name the round already reports "
                           "(the strategy's or the simulated cell's): rename it")
    return RoundRecord(
        round=rnd,
        clients={"reachable": chosen.reachable, "sampled": chosen.sampled, "dropped": chosen.dropped,
                 **({"late": list(chosen.late)} if sim is not None else {}), "arrived": got.arrived,
                 "rejected": {str(c): r for c, r in got.rejected.items()}, "per_worker": [len(r) for r in table]},
        train_loss={str(u.client_id): u.metrics["train_loss"] for u in shown},
        train_loss_mean=float(np.average([u.metrics["train_loss"] for u in shown],
                                         weights=[u.num_examples for u in shown])) if shown else None,
        num_examples={str(u.client_id): u.num_examples for u in shown},
        train_seconds={str(u.client_id): u.metrics["train_seconds"] for u in shown},
        bytes_up=got.stats.bytes_up, bytes_down=got.stats.bytes_down, comm=comm,
        seconds=clock.seconds(got, ok), started_at=clock.started,
        metrics={**ev, **agg, **({"privacy": private} if private else {}), **sim_row, **objective})


def sampling_totals(fed, rounds: list[RoundRecord]) -> dict:
    return {"mode": fed.sampling, "clients_per_round": fed.clients_per_round, "sample_rate": fed.sample_rate,
            "dropout_rate": fed.dropout_rate,
            "clients_sampled": sum(len(h.clients["sampled"]) for h in rounds),
            "clients_arrived": sum(len(h.clients["arrived"]) for h in rounds),
            "distinct_clients": len({c for h in rounds for c in h.clients["arrived"]}),
            "empty_rounds": sum(1 for h in rounds if h.metrics.get("empty_round")),
            "rejected_updates": sum(len(h.clients.get("rejected", {})) for h in rounds),
            "rejected_rounds": sum(1 for h in rounds if h.metrics.get("round_rejected"))}


def privacy_summary(setup, privacy, rounds: list[RoundRecord]) -> dict:
    if setup is None:
        return {"guarantee": "no differential privacy"}
    s, p = setup, privacy
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
        steps = [h.metrics["privacy"]["secagg"]["steps"] for h in rounds if "secagg" in h.metrics.get("privacy", {})]
        per = {}
        for k in ("keys", "shares", "masked", "unmask"):
            got = [st[k] for st in steps if k in st]
            if got:
                per[k] = {m: sum(g.get(m, 0) for g in got) / len(got)
                          for m in ("seconds", "air_up", "air_down", "cluster_up", "cluster_down")}
        out["secagg_per_round_mean"] = per
        out["bits"] = s.bits
    return out


def brief(row: RoundRecord) -> str:
    keys = ("train_loss_mean", "val_loss", "val_loss_base", "gen_acc_clients", "gen_acc_base", "bytes_up",
            "sim_latency_s", "sim_energy_j")
    return ", ".join(f"{k}={v:.4g}" for k in keys if (v := row.value(k)) is not None)
