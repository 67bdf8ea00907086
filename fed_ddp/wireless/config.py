"""The ``wireless`` config group: a simulated cell around the base station (every figure it yields is ``sim_``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fed_ddp.errors import check, one_of, positive, seed

SCHEDULERS = ("random", "best_channel", "age")


def _default_devices() -> dict:
    # sustained FLOP/s = a vendor's published peak fp32 figure x an assumed 30 % utilisation in training (README:
    # "The wireless edge, simulated" names the devices each class stands for)
    return {"phone": {"share": 0.5, "tflops": 0.6, "watts": 5.0},
            "laptop": {"share": 0.3, "tflops": 4.5, "watts": 80.0},
            "edge_gpu": {"share": 0.2, "tflops": 9.0, "watts": 72.0}}


@dataclass(kw_only=True)
class WirelessSection:
    enabled: bool = False  # simulate the cell: sim_* latency, energy and air time per round, deadline, scheduler
    radius_m: float = 500.0  # devices placed uniformly in a disc of this radius around the base station
    min_distance_m: float = 10.0  # nearest a device can be to the base station
    bandwidth_hz: float = 20e6  # total uplink bandwidth B, split equally among the round's scheduled clients
    tx_power_dbm: float = 10.0  # client transmit power p
    bs_power_dbm: float = 33.0  # base station power: the downlink is a broadcast over B at the worst scheduled client's rate
    noise_dbm_hz: float = -174.0  # noise power spectral density N0
    shadowing_db: float = 8.0  # log-normal shadowing std (drawn once per device); Rayleigh fading is redrawn every round
    deadline_s: float | None = None  # drop the clients whose simulated round time would exceed it (null = none)
    scheduler: str = "random"  # the older spelling of fed.sampling=best_channel (strongest channels this round) / age (least recently sampled first); random: fed.sampling decides
    server_tflops: float = 10.0  # base station's server: aggregation time = 2 FLOPs per value per kept client / this
    devices: dict = field(default_factory=_default_devices)  # device classes {share, tflops (sustained), watts while training}; yours merge with these three (share 0 leaves one out)
    seed: int | None = None  # placement, device classes and fading; null = run.seed

    def __post_init__(self):
        if self.seed is not None:
            seed("wireless.seed", self.seed)
        positive("wireless.radius_m", self.radius_m)
        positive("wireless.min_distance_m", self.min_distance_m)
        check(self.min_distance_m < self.radius_m, "wireless.min_distance_m", self.min_distance_m,
              f"must be below wireless.radius_m={self.radius_m}")
        positive("wireless.bandwidth_hz", self.bandwidth_hz)
        for k in ("tx_power_dbm", "bs_power_dbm"):  # dBm: 10 dBm = 10 mW, -10 dBm = 0.1 mW
            v = getattr(self, k)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and -40 <= v <= 60, f"wireless.{k}", v,
                  "must be a transmit power in dBm within [-40, 60] (10 dBm = 10 mW, 33 dBm = 2 W)")
        check(isinstance(self.noise_dbm_hz, (int, float)) and -220 <= self.noise_dbm_hz <= -100,
              "wireless.noise_dbm_hz", self.noise_dbm_hz, "must be a noise density in dBm/Hz within [-220, -100]")
        positive("wireless.shadowing_db", self.shadowing_db, zero_ok=True)
        if self.deadline_s is not None:
            positive("wireless.deadline_s", self.deadline_s)
        one_of("wireless.scheduler", self.scheduler, set(SCHEDULERS))
        positive("wireless.server_tflops", self.server_tflops)
        check(isinstance(self.devices, dict) and bool(self.devices), "wireless.devices", self.devices,
              "must map device class names to {share, tflops, watts}")
        for name, d in self.devices.items():
            check(isinstance(d, dict) and set(d) == {"share", "tflops", "watts"}, f"wireless.devices.{name}", d,
                  "must have exactly the keys share, tflops, watts")
            positive(f"wireless.devices.{name}.share", d["share"], zero_ok=True)
            positive(f"wireless.devices.{name}.tflops", d["tflops"])
            positive(f"wireless.devices.{name}.watts", d["watts"], zero_ok=True)
        check(sum(d["share"] for d in self.devices.values()) > 0, "wireless.devices", self.devices,
              "needs at least one class with share > 0")
