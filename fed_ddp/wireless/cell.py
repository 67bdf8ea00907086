"""The simulated cell: where devices are, what they are, and what their channels carry (pure numpy).

    cell = Cell.build(wireless_cfg, num_clients, seed)      # placement, shadowing, device class: once
    g    = cell.gains(rnd)                                  # x Rayleigh |h|^2 ~ Exp(1), redrawn each round
    r_k  = shannon_rate(b_k, g_k, p, N0)                    # b log2(1 + g p / (N0 b)), bits/s

Path loss 128.1 + 37.6 log10(d / km) dB and log-normal shadowing (sigma 8 dB) as in the FL-over-wireless
literature (Yang et al. 2021, arXiv 1911.02417; Chen et al. 2021, arXiv 1909.07972; the 3GPP urban macro
model TR 36.814). Every stream is keyed by (seed, purpose[, round]): the cell never depends on who was
sampled, and a resumed run redraws exactly the channels the uninterrupted one drew.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PLACEMENT, FADING, TIEBREAK = 11, 12, 13  # numpy stream purposes (fed_ddp.seeds uses 1-3)


def db_to_linear(db):
    return 10.0 ** (np.asarray(db, dtype=np.float64) / 10.0)


def dbm_to_watts(dbm):
    return 10.0 ** ((np.asarray(dbm, dtype=np.float64) - 30.0) / 10.0)


def path_loss_db(distance_m):
    """128.1 + 37.6 log10(d in km) dB."""
    return 128.1 + 37.6 * np.log10(np.asarray(distance_m, dtype=np.float64) / 1000.0)


def shannon_rate(bandwidth_hz, gain, power_w, noise_w_per_hz):
    """b log2(1 + g p / (N0 b)) bits/s (arrays broadcast)."""
    b = np.asarray(bandwidth_hz, dtype=np.float64)
    return b * np.log2(1.0 + np.asarray(gain) * power_w / (noise_w_per_hz * b))


@dataclass
class Cell:
    distance_m: np.ndarray  # per device
    shadowing_db: np.ndarray  # per device (slow fading: fixed for the run)
    device_class: np.ndarray  # per device: index into ``classes``
    classes: list[str]
    seed: int

    @classmethod
    def build(cls, w, num_clients: int, seed: int) -> Cell:
        """Devices uniform in the annulus min_distance_m..radius_m (area-uniform: d = sqrt(U (R^2 - r^2) + r^2)),
        classes drawn by ``share``, shadowing N(0, sigma^2) dB; each from its own stream of ``seed``, so the cell
        of N devices is the first N devices of any larger cell."""
        def rng(k: int) -> np.random.Generator:
            return np.random.default_rng([seed, PLACEMENT, k])

        r0, r1 = w.min_distance_m, w.radius_m
        d = np.sqrt(rng(0).random(num_clients) * (r1 ** 2 - r0 ** 2) + r0 ** 2)
        shadow = rng(1).normal(0.0, w.shadowing_db, num_clients) if w.shadowing_db > 0 else np.zeros(num_clients)
        names = list(w.devices)
        share = np.array([float(w.devices[n]["share"]) for n in names])
        kind = np.searchsorted(np.cumsum(share / share.sum()), rng(2).random(num_clients), side="right")
        kind = np.minimum(kind, len(names) - 1)  # a draw at the top of the last interval (rounding)
        return cls(d, shadow, kind, names, seed)

    @property
    def mean_gain(self) -> np.ndarray:
        """Linear gain without fast fading: 10^(-(path loss + shadowing) / 10)."""
        return db_to_linear(-(path_loss_db(self.distance_m) + self.shadowing_db))

    def fading(self, rnd: int) -> np.ndarray:
        """|h|^2 of every device in round ``rnd`` (Rayleigh: exponential with mean 1)."""
        return np.random.default_rng([self.seed, FADING, rnd]).exponential(1.0, len(self.distance_m))

    def gains(self, rnd: int) -> np.ndarray:
        return self.mean_gain * self.fading(rnd)

    def class_of(self, client: int) -> str:
        return self.classes[int(self.device_class[client])]
