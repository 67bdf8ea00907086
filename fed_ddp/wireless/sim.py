"""One round in the simulated cell: who is scheduled, how long each client takes, who misses the deadline.

Per scheduled client k (FDMA, the band split equally among the round's scheduled clients):

    download_k = bits_down / r_down     r_down = B log2(1 + g_min P_bs / (N0 B))   one broadcast, worst client's rate
    compute_k  = FLOPs of its local steps / its device class's sustained FLOP/s
    upload_k   = bits_up / r_k          r_k = (B / m) log2(1 + g_k p / (N0 B / m))
    energy_k   = watts_k x compute_k + p x upload_k                                (receiving is not counted)

A client whose download + compute + upload exceeds ``wireless.deadline_s`` is a straggler: it is dropped
for the round (the population's dropout path: it is not aggregated) and the energy it would have spent
until the deadline is counted as wasted. The synchronous round lasts until the slowest kept client
reports, or until the deadline when a client is missing (the server cannot know it will not come), plus
the server's aggregation. Every figure here is simulated and named ``sim_...``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fed_ddp.wireless.cell import TIEBREAK, Cell, dbm_to_watts, shannon_rate


@dataclass
class RoundSim:
    clients: list[int]  # scheduled this round (ascending)
    gain: np.ndarray  # linear channel gain of each
    rate_up: np.ndarray  # bits/s
    rate_down: float  # bits/s (the broadcast)
    download_s: float
    compute_s: np.ndarray
    upload_s: np.ndarray
    watts: np.ndarray  # each one's power draw while training (its device class)
    tx_watts: float  # transmit power p
    late: list[int]  # stragglers: total > deadline

    @property
    def energy_j(self) -> np.ndarray:
        """What each spends if it completes the round: watts x compute + p x upload."""
        return self.watts * self.compute_s + self.tx_watts * self.upload_s

    @property
    def total_s(self) -> np.ndarray:
        return self.download_s + self.compute_s + self.upload_s


def simulate(cell: Cell, w, rnd: int, clients: list[int], bits_up: float, bits_down: float,
             flops: float) -> RoundSim:
    """The round's clocks for the scheduled ``clients`` (each sends ``bits_up``, all receive ``bits_down``)."""
    ids = np.asarray(sorted(clients), dtype=np.int64)
    n0 = dbm_to_watts(w.noise_dbm_hz)
    g = cell.gains(rnd)[ids]
    b = w.bandwidth_hz / max(len(ids), 1)
    rate_up = shannon_rate(b, g, dbm_to_watts(w.tx_power_dbm), n0)
    rate_down = float(shannon_rate(w.bandwidth_hz, g.min(), dbm_to_watts(w.bs_power_dbm), n0)) if len(ids) else 0.0
    kinds = [w.devices[cell.class_of(c)] for c in ids]
    compute = np.array([flops / (k["tflops"] * 1e12) for k in kinds])
    upload = bits_up / rate_up
    download = bits_down / rate_down if len(ids) else 0.0
    watts = np.array([float(k["watts"]) for k in kinds])
    sim = RoundSim([int(c) for c in ids], g, rate_up, rate_down, download, compute, upload, watts,
                   float(dbm_to_watts(w.tx_power_dbm)), [])
    if w.deadline_s is not None:
        sim.late = [c for c, t in zip(sim.clients, sim.total_s) if t > w.deadline_s]
    return sim


def energy_until(sim: RoundSim, i: int, deadline_s: float) -> float:
    """Energy client ``sim.clients[i]`` spends before ``deadline_s`` cuts it off: it downloads, computes, then
    transmits until the deadline."""
    left = max(0.0, deadline_s - sim.download_s)
    compute = min(float(sim.compute_s[i]), left)
    upload = max(0.0, min(float(sim.upload_s[i]), left - compute))
    return float(sim.watts[i] * compute + sim.tx_watts * upload)


def schedule(mode: str, cell: Cell, rnd: int, candidates: np.ndarray, m: int, last_played: np.ndarray) -> np.ndarray:
    """``best_channel``: the m reachable clients with the strongest channel this round; ``age``: the m that
    were served longest ago (never first), ties broken by a seeded draw. Ascending ids."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if m >= len(candidates):
        return candidates
    if mode == "best_channel":
        order = np.argsort(-cell.gains(rnd)[candidates], kind="stable")
    elif mode == "age":
        tie = np.random.default_rng([cell.seed, TIEBREAK, rnd]).random(len(candidates))
        order = np.lexsort((tie, last_played[candidates]))  # oldest last round first, then the draw
    else:
        raise ValueError(f"wireless.scheduler={mode!r}: schedule() handles best_channel and age")
    return np.sort(candidates[order[:m]])
