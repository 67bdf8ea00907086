"""The wireless edge, simulated: a cell around the base station, device classes, per-round clocks and energy.

Driven by what really happens in the run: the bytes of each client's real codec message and the FLOPs
of its local steps counted on the real model and batch. Everything it reports is simulated and named
``sim_...``; measured wall time (``seconds``) is never mixed with it.

    ws  = Wireless(cfg, step_flops, up_bytes, down_bytes)   # the server builds one (wireless.enabled)
    Context(last_sampled, ws.cell)                          # what the samplers best_channel / age read (samplers.py)
    sim = ws.simulate(rnd, scheduled, local_steps, failed)  # clocks; sim.late = stragglers past the deadline
    row.update(ws.row(sim, reported, lost))                 # sim_* metrics of the round
"""

from __future__ import annotations

import numpy as np

from fed_ddp.wireless.cell import Cell, dbm_to_watts, path_loss_db, shannon_rate
from fed_ddp.wireless.config import SCHEDULERS, WirelessSection
from fed_ddp.wireless.flops import count_step_flops, unet_step_flops
from fed_ddp.wireless.sim import RoundSim, energy_until, schedule, simulate

__all__ = ["SCHEDULERS", "Cell", "RoundSim", "Wireless", "WirelessSection", "count_step_flops",
           "dbm_to_watts", "energy_until", "path_loss_db", "schedule", "shannon_rate", "simulate",
           "unet_step_flops"]


class Wireless:
    def __init__(self, cfg, step_flops: int, up_bytes: int, down_bytes: int, num_params: int):
        self.cfg, self.w = cfg, cfg.wireless
        self.seed = cfg.run.seed if self.w.seed is None else self.w.seed
        self.cell = Cell.build(self.w, cfg.fed.num_clients, self.seed)
        self.step_flops, self.up_bytes, self.down_bytes = int(step_flops), int(up_bytes), int(down_bytes)
        self.num_params = num_params
        self.time_s = 0.0  # simulated time and energy so far (checkpointed)
        self.energy_j = 0.0

    def state_dict(self) -> dict:
        return {"time_s": self.time_s, "energy_j": self.energy_j}

    def load_state_dict(self, state: dict) -> None:
        self.time_s, self.energy_j = float(state["time_s"]), float(state["energy_j"])

    def describe(self) -> str:
        w, c = self.w, self.cell
        counts = np.bincount(c.device_class, minlength=len(c.classes))
        mix = ", ".join(f"{n} {k}" for k, n in zip(c.classes, counts))
        return (f"simulated cell: {len(c.distance_m)} devices ({mix}) within {w.radius_m:g} m, B = {w.bandwidth_hz / 1e6:g} "
                f"MHz, p = {w.tx_power_dbm:g} dBm, base station {w.bs_power_dbm:g} dBm, sampler {self.cfg.fed.sampling}, "
                f"deadline {'none' if w.deadline_s is None else f'{w.deadline_s:g} s'}; one local step = "
                f"{self.step_flops / 1e9:,.3g} GFLOP (counted); messages {self.up_bytes:,} B up, "
                f"{self.down_bytes:,} B down")

    def deadline_warning(self, local_steps: int) -> str | None:
        """A warning when no device of the cell meets ``deadline_s`` even on an average channel (|h|^2 = 1, the
        band split among the expected round size); it says what the fastest device needs."""
        w = self.w
        if w.deadline_s is None:
            return None
        m = max(1.0, self.cfg.fed.expected_round_size)
        g = self.cell.mean_gain
        n0 = dbm_to_watts(w.noise_dbm_hz)
        air = (8 * self.up_bytes / shannon_rate(w.bandwidth_hz / m, g, dbm_to_watts(w.tx_power_dbm), n0)
               + 8 * self.down_bytes / shannon_rate(w.bandwidth_hz, g, dbm_to_watts(w.bs_power_dbm), n0))
        tflops = np.array([w.devices[k]["tflops"] for k in self.cell.classes])[self.cell.device_class]
        compute = self.step_flops * local_steps / (tflops * 1e12)
        k = int(np.argmin(air + compute))
        if air[k] + compute[k] <= w.deadline_s:
            return None
        return (f"wireless.deadline_s={w.deadline_s:g}: no device meets it on an average channel; the fastest "
                f"({self.cell.class_of(k)}, {self.cell.distance_m[k]:.0f} m from the base station) needs "
                f"{air[k] + compute[k]:.3g} s (compute {compute[k]:.3g} s + air {air[k]:.3g} s): every client may be "
                "dropped")

    def simulate(self, rnd: int, scheduled: list[int], local_steps: int, failed: list[int] = ()) -> RoundSim:
        """The round's clocks; ``sim.late``: the stragglers among the clients that did not fail anyway."""
        sim = simulate(self.cell, self.w, rnd, scheduled, 8 * self.up_bytes, 8 * self.down_bytes,
                       float(self.step_flops) * local_steps)
        lost = set(failed)
        sim.late = [c for c in sim.late if c not in lost]
        return sim

    def row(self, sim: RoundSim, reported: list[int], lost: list[int]) -> dict:
        """The round's sim_* metrics. ``reported``: clients whose message reached the server (kept or rejected:
        the server waited for them); ``lost``: scheduled clients that never reported (simulated dropouts)."""
        w = self.w
        index = {c: i for i, c in enumerate(sim.clients)}
        late = set(sim.late)
        energy = {}
        for c in sim.clients:
            i = index[c]
            if c in late:
                energy[c] = energy_until(sim, i, w.deadline_s)
            elif c in reported:
                energy[c] = float(sim.energy_j[i])
            else:  # a simulated failure: assumed to fail before spending anything
                energy[c] = 0.0
        done = [index[c] for c in reported if c in index]
        slowest = max(done, key=lambda i: sim.total_s[i]) if done else None
        # the server waits for the slowest client that reports; when one is missing and there is a deadline, it
        # waits until the deadline (it cannot know the client will not come); without a deadline a failure is
        # assumed to be noticed at once (the broadcast, at least, took its time)
        ran = float(sim.total_s[slowest]) if slowest is not None else (sim.download_s if sim.clients else 0.0)
        if w.deadline_s is not None and (late or lost):  # every client that reported finished before it
            t_clients = w.deadline_s
            ran = min(ran, t_clients)
        else:
            t_clients = ran
        aggregation = 2.0 * self.num_params * len(done) / (w.server_tflops * 1e12)
        latency = t_clients + aggregation
        self.time_s += latency
        self.energy_j += sum(energy.values())
        if slowest is not None:
            split = {"download": sim.download_s, "compute": float(sim.compute_s[slowest]),
                     "upload": float(sim.upload_s[slowest])}
        else:
            split = {"download": ran, "compute": 0.0, "upload": 0.0}
        split.update({"waiting_for_deadline": t_clients - ran, "aggregation": aggregation})
        return {
            "sim_latency_s": latency,
            "sim_latency_split_s": split,
            "sim_energy_j": sum(energy.values()),
            "sim_energy_wasted_j": sum(energy[c] for c in late),
            "sim_stragglers": sorted(late),
            "sim_air_bytes": {"up": self.up_bytes * len(done), "down": self.down_bytes * len(sim.clients)},
            "sim_rate_down_bps": sim.rate_down,
            "sim_clients": {str(c): {"device": self.cell.class_of(c), "distance_m": float(self.cell.distance_m[c]),
                                     "gain_db": float(10 * np.log10(sim.gain[index[c]])),
                                     "rate_up_bps": float(sim.rate_up[index[c]]),
                                     "download_s": sim.download_s, "compute_s": float(sim.compute_s[index[c]]),
                                     "upload_s": float(sim.upload_s[index[c]]), "energy_j": energy[c],
                                     "outcome": "late" if c in late else "reported" if c in reported else "lost"}
                            for c in sim.clients},
            "sim_time_s": self.time_s,
            "sim_energy_total_j": self.energy_j,
        }

    def summary(self, rounds) -> dict:
        """Over the run's ``RoundRecord``s (their ``sim_*`` metrics)."""
        sims = [h.metrics for h in rounds if "sim_latency_s" in h.metrics]
        by_class: dict[str, list[float]] = {k: [] for k in self.cell.classes}
        for h in sims:
            for c in h["sim_clients"].values():
                if c["outcome"] == "reported":
                    by_class[c["device"]].append(c["download_s"] + c["compute_s"] + c["upload_s"])
        return {
            "what": ("simulated (fed_ddp.wireless): a cell driven by the real message sizes and the FLOPs counted "
                     "on the real model; not measured time or energy"),
            "time_s": sum(h["sim_latency_s"] for h in sims),
            "energy_j": sum(h["sim_energy_j"] for h in sims),
            "energy_wasted_j": sum(h["sim_energy_wasted_j"] for h in sims),
            "stragglers": sum(len(h["sim_stragglers"]) for h in sims),
            "step_flops": self.step_flops,
            "message_bytes": {"up": self.up_bytes, "down": self.down_bytes},
            "client_round_s_median": {k: float(np.median(v)) for k, v in by_class.items() if v},
            "devices": {k: int(n) for k, n in zip(self.cell.classes,
                                                  np.bincount(self.cell.device_class, minlength=len(self.cell.classes)))},
        }
