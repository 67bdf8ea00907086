"""The ``privacy`` config group (``PrivacySection``, mounted as ``RunConfig.privacy``)::

    privacy:
      dp: {noise_multiplier: 1.0, clip_norm: 0.05}    # or target_epsilon: 8 (z calibrated before round 1)
      secagg: true                                     # the server sees only the masked sum

Checks that need other groups (sampling, codecs, aggregator) are rules in ``fed_ddp.compat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fed_ddp.errors import ConfigError, check, one_of, positive


@dataclass(kw_only=True)
class DpSection:
    """Client-level differential privacy (DP-FedAvg): on when clip_norm > 0 and noise (z or a target) is set."""

    noise_multiplier: float = 0.0  # z: noise std = z x clip_norm on the sum of clipped deltas; 0 = no noise
    clip_norm: float | None = None  # C: every client's delta is clipped to this L2 norm over the whole adapter; null = 10 with DP or secagg (about a round-1 delta's norm on configs/population.yaml), else no clipping
    target_epsilon: float | None = None  # calibrate z before round 1 so that epsilon after fed.rounds rounds is this
    delta: float = 1e-5  # the delta of (epsilon, delta)
    max_epsilon: float | None = None  # budget: stop cleanly before a round whose epsilon would exceed it
    mode: str = "central"  # central (the server adds the noise) / distributed (each client adds its share)
    min_clients: int | None = None  # distributed: each client adds std z*C/sqrt(this), so any this many carry z*C; rounds with fewer contributions are not applied; null = max(1, E[m]/2)
    accountant: str = "pld"  # pld (privacy loss distribution: tight) / rdp (Renyi DP: an upper bound)
    adaptive_clip: bool = False  # clip_norm follows target_quantile of the update norms (Andrew et al. 2021)
    target_quantile: float = 0.5  # adaptive_clip: share of clients meant to be unclipped
    clip_lr: float = 0.2  # adaptive_clip: geometric step of the clip per round
    count_stddev: float | None = None  # adaptive_clip: noise on the count of unclipped clients; null = max(E[m]/20, z)
    noise_seed: int | None = None  # null: noise from the OS's entropy; an integer replays it (experiments only: no privacy against whoever knows it)

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0 or self.target_epsilon is not None

    def __post_init__(self):
        positive("privacy.dp.noise_multiplier", self.noise_multiplier, zero_ok=True)
        if self.clip_norm is not None:
            positive("privacy.dp.clip_norm", self.clip_norm, zero_ok=True)
        if self.enabled:
            check(self.clip_norm != 0, "privacy.dp.clip_norm", self.clip_norm,
                  "must be > 0 with differential privacy: the noise is calibrated to the clip")
        if self.target_epsilon is not None:
            positive("privacy.dp.target_epsilon", self.target_epsilon)
            check(self.noise_multiplier == 0, "privacy.dp.noise_multiplier", self.noise_multiplier,
                  "set either noise_multiplier or target_epsilon (which calibrates it), not both")
        check(isinstance(self.delta, (int, float)) and 0 < self.delta < 1, "privacy.dp.delta", self.delta,
              "must be in (0, 1)")
        if self.max_epsilon is not None:
            positive("privacy.dp.max_epsilon", self.max_epsilon)
        one_of("privacy.dp.mode", self.mode, {"central", "distributed"})
        if self.min_clients is not None:
            check(isinstance(self.min_clients, int) and self.min_clients >= 1, "privacy.dp.min_clients",
                  self.min_clients, "must be an integer >= 1 (or null)")
        from fed_ddp.privacy.accountant import KINDS

        one_of("privacy.dp.accountant", self.accountant, set(KINDS))
        check(0 < self.target_quantile < 1, "privacy.dp.target_quantile", self.target_quantile, "must be in (0, 1)")
        positive("privacy.dp.clip_lr", self.clip_lr)
        if self.count_stddev is not None:
            positive("privacy.dp.count_stddev", self.count_stddev)
        if self.adaptive_clip:
            check(self.clip_norm != 0, "privacy.dp.clip_norm", self.clip_norm,
                  "must be > 0 with adaptive_clip: it is the starting clip")


@dataclass(kw_only=True)
class PrivacySection:
    dp: DpSection = field(default_factory=DpSection)
    secagg: bool = False  # secure aggregation (Bonawitz et al. 2017): the server sees only the sum of masked updates
    secagg_threshold: int | None = None  # t: shares needed to unmask; at least t clients must send a masked input; null = floor(m/2) + 1
    secagg_bits: int | None = None  # fixed-point bits per value; null = from comm.uplink: int8 8, int4 4, else 16
    secagg_range: float | None = None  # values are clipped to [-range, range] before fixed point; null = 4 C / sqrt(values) (+ 6x the distributed noise std)

    @property
    def clip(self) -> float:
        """C: ``dp.clip_norm``, or DEFAULT_CLIP when DP or secure aggregation is on, else 0 (no clipping)."""
        if self.dp.clip_norm is not None:
            return float(self.dp.clip_norm)
        return DEFAULT_CLIP if (self.dp.enabled or self.secagg) else 0.0

    @property
    def clips(self) -> bool:
        """Clients clip their deltas (DP or secure aggregation): the downlink carries the clip."""
        return self.clip > 0

    def __post_init__(self):
        if self.secagg_threshold is not None:
            check(isinstance(self.secagg_threshold, int) and self.secagg_threshold >= 2, "privacy.secagg_threshold",
                  self.secagg_threshold, "must be an integer >= 2 (t = 1 would let one share reveal a client's mask)")
        if self.secagg_bits is not None:
            check(isinstance(self.secagg_bits, int) and 2 <= self.secagg_bits <= 32, "privacy.secagg_bits",
                  self.secagg_bits, "must be an integer in [2, 32]")
        if self.secagg_range is not None:
            positive("privacy.secagg_range", self.secagg_range)


DEFAULT_CLIP = 10.0  # about the norm of a client's round-1 delta on configs/population.yaml (9.4 to 9.6)
SECAGG_BITS = {"int8": 8, "int4": 4}  # fixed-point encodings by uplink encoder; anything else linear: 16


def sample_rate(fed) -> float:
    """The sampling probability the accountant uses: q (poisson), 1 (all)."""
    return 1.0 if fed.sampling == "all" else float(fed.sample_rate)


def min_clients(privacy: PrivacySection, fed) -> int:
    dp = privacy.dp
    if dp.min_clients is not None:
        return dp.min_clients
    return max(1, math.floor(fed.expected_round_size / 2))


def secagg_bits(privacy: PrivacySection, comm) -> int:
    if privacy.secagg_bits is not None:
        return privacy.secagg_bits
    enc = [SECAGG_BITS[n] for n in comm.uplink if n in SECAGG_BITS]
    return enc[0] if enc else 16


__all__ = ["ConfigError", "DpSection", "PrivacySection"]
