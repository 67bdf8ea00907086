"""What the server and the workers do with the ``privacy`` config each round.

``PrivacySetup`` is resolved once from the config (the noise multiplier calibrated to
``privacy.dp.target_epsilon`` if asked); the server owns the accountant and the clip (adaptive
clipping moves it), and sends the workers, in every downlink body, the two numbers they need: the
round's clip and the std of the noise each client adds (distributed mode; 0 otherwise).

Server side, without secure aggregation (it sees each decoded update):
    central      every update is clipped again on arrival (the codec's error feedback may have moved it),
                 noise N(0, (z C)^2) is added to the sum, the sum is divided by E[m];
    distributed  updates carry their noise; each must be within C + 2 (its noise's expected norm) or it
                 is rejected; the sum is divided by E[m] when at least ``min_clients`` arrived.
With secure aggregation the server gets only the sum (``fed_ddp.privacy.secagg``), checks it against
what m clipped (and noised) updates can reach, adds the central noise if asked, and divides.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from dataclasses import dataclass

import torch

from fed_ddp.files import open_new
from fed_ddp.hooks import ClientHook
from fed_ddp.privacy import accountant as acc
from fed_ddp.privacy import dp
from fed_ddp.privacy.config import min_clients, sample_rate, secagg_bits

log = logging.getLogger("fed_ddp.privacy")

LEDGER = "privacy_ledger.jsonl"  # one line per noised aggregate computed (the accountant's source of truth)


@dataclass
class PrivacySetup:
    dp: bool  # differential privacy on
    clip: float  # C (the starting clip under adaptive clipping); 0 = clients do not clip
    z: float  # noise multiplier the accountant sees
    z_delta: float  # noise multiplier on the deltas (= z unless adaptive clipping takes a share for the count)
    count_stddev: float
    mode: str
    q: float
    min_clients: int
    delta: float
    kind: str
    calibrated: bool
    secagg: bool
    bits: int
    threshold: int | None
    value_range: float | None
    noise_seed: int | None
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2

    @property
    def clips(self) -> bool:
        return self.clip > 0

    @property
    def client_clips(self) -> bool:
        """Clients clip (and noise) themselves when the server must not see their raw update: secure
        aggregation, or distributed noise. Central mode: the server clips what it decoded, so its count
        of unclipped updates (adaptive clipping) sees the true norms."""
        return self.secagg or (self.dp and self.mode == "distributed")

    def describe(self) -> str:
        out = []
        if self.dp:
            z = f"z={self.z:.4g}" + (" (calibrated to privacy.dp.target_epsilon)" if self.calibrated else "")
            out.append(f"DP-FedAvg ({self.mode} noise) {z}, C={self.clip:g}{' (adaptive)' if self.adaptive else ''}, "
                       f"q={self.q:g}, delta={self.delta:g}, {self.kind.upper()} accountant")
            if self.mode == "distributed":
                out.append(f"each client adds std z*C/sqrt({self.min_clients})")
        elif self.clips:
            out.append(f"updates clipped to C={self.clip:g}, no noise (no differential privacy)")
        if self.secagg:
            t = "floor(m/2)+1" if self.threshold is None else str(self.threshold)
            out.append(f"secure aggregation, {self.bits}-bit fixed point, threshold t={t}")
        return "; ".join(out)

    def client_noise_std(self, clip: float) -> float:
        if not self.dp or self.mode != "distributed":
            return 0.0
        return dp.client_noise_std(self.z_delta, clip, self.min_clients)

    def central_noise_std(self, clip: float) -> float:
        return self.z_delta * clip if self.dp and self.mode == "central" else 0.0

    def guarantee(self, accountant: acc.Accountant | None, clip: float) -> str:
        """The run's privacy in words, for its closing lines and summary.json."""
        parts = []
        if self.dp and accountant is not None and accountant.steps:
            eps = accountant.epsilon()
            c = f"C = {clip:.4g}" + (f" (adaptive, started at {self.clip:.4g})" if abs(clip - self.clip) > 1e-12 else "")
            parts.append(f"(epsilon, delta) = ({eps:.3g}, {self.delta:g}) at the client level after {len(accountant.steps)} "
                         f"rounds, q = {self.q:g}, z = {self.z:.4g}{' (calibrated)' if self.calibrated else ''}, {c}, "
                         f"{self.mode} noise, {self.kind.upper()} accountant")
        elif self.dp:
            parts.append("differential privacy configured, but no round released a noised aggregate")
        else:
            parts.append("no differential privacy" + (f" (updates clipped to C = {self.clip:g})" if self.clips else ""))
        if self.dp and self.mode == "distributed" and not self.secagg:
            parts.append(f"without secure aggregation the server saw each update with noise std z*C/sqrt("
                         f"{self.min_clients}) only")
        if self.secagg:
            parts.append("secure aggregation: the server saw only the sum of the masked updates")
        if self.dp and self.noise_seed is not None:
            parts.append(f"noise replayable from privacy.dp.noise_seed={self.noise_seed}: an experiment, not a guarantee "
                         "against whoever knows the seed")
        return "; ".join(parts)


def resolve(cfg, calibrate: bool = True) -> PrivacySetup | None:
    """The run's privacy, or None when the ``privacy`` group asks for nothing (the plain path).
    ``calibrate=False`` (workers: they get the clip and noise std in every downlink) skips calibrating z."""
    p, f = cfg.privacy, cfg.fed
    d = p.dp
    if not (d.enabled or p.clips or p.secagg):
        return None
    q = sample_rate(f) if d.enabled else 1.0
    z, calibrated = float(d.noise_multiplier), False
    if d.target_epsilon is not None and calibrate:
        z, calibrated = acc.calibrate(d.accountant, q, f.rounds, d.target_epsilon, d.delta), True
    em = f.expected_round_size
    sb = d.count_stddev if d.count_stddev is not None else max(em / 20, z)  # sigma_b > z/2 is needed
    z_delta = dp.delta_noise_multiplier(z, sb) if d.adaptive_clip else z
    return PrivacySetup(dp=d.enabled, clip=p.clip, z=z, z_delta=z_delta, count_stddev=sb, mode=d.mode, q=q,
                        min_clients=min_clients(p, f), delta=d.delta, kind=d.accountant, calibrated=calibrated,
                        secagg=p.secagg, bits=secagg_bits(p, cfg.comm),
                        threshold=p.secagg_threshold, value_range=p.secagg_range, noise_seed=d.noise_seed,
                        adaptive=d.adaptive_clip, target_quantile=d.target_quantile, clip_lr=d.clip_lr)


def fixed_range(value_range: float | None, clip: float, noise_std: float, numel: int) -> float:
    """Secure aggregation's fixed-point range: ``privacy.secagg_range``, or 4 C / sqrt(n) (a clipped
    update's values rarely exceed 4x their RMS) plus 6 stds of the noise each client adds (exceeded
    with probability 2e-9 per value; such a value is clipped, the one place the noise is not Gaussian)."""
    if value_range is not None:
        return value_range
    return 4 * clip / math.sqrt(numel) + 6 * noise_std


def secagg_threshold(setup: PrivacySetup, roster: int) -> int:
    """t for a round whose roster has ``roster`` clients; with distributed noise at least
    ``min_clients``, so that no sum the server can unmask carries less than the central noise."""
    t = setup.threshold if setup.threshold is not None else roster // 2 + 1
    return max(t, setup.min_clients) if setup.dp and setup.mode == "distributed" else t


def signal_clip(clip: float, value_range: float, noise_std: float, numel: int, bits: int) -> float:
    """The L2 clip a client applies before fixed point, so that the rounded update's norm stays within C:
    stochastic rounding moves each value by less than one step, the whole vector by < step sqrt(n), so the
    client clips to C - step sqrt(n) (97 % of C at 8 bits with the default range). With distributed noise
    the rounding acts on the noised values and C is used as is (see the README's failure model)."""
    if noise_std > 0:
        return clip
    out = clip - value_range / (2 ** (bits - 1) - 1) * math.sqrt(numel)
    if out <= 0:
        raise ValueError(f"privacy.secagg_range={value_range:g} is too wide for {bits}-bit values and C={clip:g}: "
                         f"one rounding step per value could move an update by more than C")
    return out


def pack_fields(clip: float, noise_std: float) -> torch.Tensor:
    return torch.tensor([clip, noise_std], dtype=torch.float32).view(torch.uint8)


def round_trip(clip: float, noise_std: float) -> tuple[float, float]:
    """(clip, noise std) exactly as clients read them from the downlink (fp32)."""
    return unpack_fields(pack_fields(clip, noise_std))


def unpack_fields(buf: torch.Tensor) -> tuple[float, float]:
    clip, std = buf.clone().view(torch.float32).tolist()
    if not (math.isfinite(clip) and clip > 0 and math.isfinite(std) and std >= 0):
        raise ValueError(f"downlink privacy fields: clip={clip}, noise std={std}")
    return clip, std


class ClientClip(ClientHook):
    """Local or distributed DP, or secure aggregation's clip, on the client: the round's clip and noise std from
    the downlink, applied to the delta before it is encoded (``client_side``)."""

    def __init__(self, noise_seed: int | None):
        self.noise_seed = noise_seed

    def downlink(self, wire, body, slots, start):
        self.clip, self.noise_std = unpack_fields(wire.body_fields(body, slots))
        return start

    def before_encode(self, worker, job, delta: torch.Tensor) -> torch.Tensor:
        return client_side(delta, self.clip, self.noise_std, self.noise_seed, job.plan.round, job.client)


def client_side(delta: torch.Tensor, clip: float, noise_std: float, noise_seed: int | None, rnd: int,
                client: int) -> torch.Tensor:
    """What a client does to its delta before it encodes or masks it: clip, then add its noise share."""
    out, _ = dp.clip(delta, clip)
    if noise_std > 0:
        out = (out.double() + dp.gaussian(out.numel(), noise_std, dp.noise_generator(noise_seed, 1, rnd, client)))
        out = out.to(delta.dtype)
    return out


class ServerPrivacy:
    """The server's privacy state: accountant, current clip; aggregation of a round under DP."""

    def __init__(self, setup: PrivacySetup, numel: int, run_dir=None):
        self.setup, self.numel = setup, numel
        self.clip = setup.clip
        self.accountant = acc.Accountant(setup.kind, setup.delta) if setup.dp else None
        # the sampling stream's seed: secret under DP (amplification by sampling assumes nobody outside the
        # server knows who was sampled; run.seed is in config.yaml), drawn afresh at every start and resume
        self.sample_seed = secrets.randbits(62) if setup.dp else None
        self.ledger = (run_dir / LEDGER) if (run_dir is not None and setup.dp) else None
        if setup.secagg and setup.client_noise_std(setup.clip) == 0:  # a too-wide privacy.secagg_range: say so now
            signal_clip(setup.clip, fixed_range(setup.value_range, setup.clip, 0.0, numel), 0.0, numel, setup.bits)

    def start_fresh(self) -> None:
        if self.ledger is not None and self.ledger.exists():
            self.ledger.unlink()

    def record(self, rnd: int) -> None:
        """Every noised aggregate computed is counted at once and durably, before anything derived from it
        is released: a round replayed after a crash is counted twice, as it was released twice."""
        self.accountant.step(self.setup.q, self.setup.z)
        if self.ledger is not None:
            with open_new(self.ledger, append=True) as f:  # never through a planted link
                f.write(json.dumps({"round": rnd, "q": self.setup.q, "z": self.setup.z}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    # -- budget ----------------------------------------------------------------------------------------
    def epsilon_after_next(self) -> float:
        return self.accountant.epsilon([(self.setup.q, self.setup.z)]) if self.accountant else 0.0

    def over_budget(self, max_epsilon: float | None) -> float | None:
        """The epsilon the next round would reach if it exceeds the budget, else None."""
        if self.accountant is None or max_epsilon is None:
            return None
        e = self.epsilon_after_next()
        return e if e > max_epsilon else None

    # -- aggregation -----------------------------------------------------------------------------------
    def combine_updates(self, deltas: dict[int, torch.Tensor], expected: float, rnd: int
                        ) -> tuple[torch.Tensor | None, dict[int, str], dict]:
        """(mean delta or None when the round cannot be applied, rejected clients, metrics) from the
        decoded updates the server can see."""
        s, rejected = self.setup, {}
        total = torch.zeros(self.numel, dtype=torch.float64)
        used = unclipped = 0
        bound = self.clip + 2 * s.client_noise_std(self.clip) * math.sqrt(self.numel)
        for cid, d in sorted(deltas.items()):
            try:
                if s.dp and s.mode == "distributed":
                    norm = float(d.double().norm())
                    if not math.isfinite(norm) or norm > bound:
                        raise ValueError(f"norm {norm:.4g} above C + 2 x its noise's expected norm = {bound:.4g}")
                    c = d.double()
                    unclipped = None  # noised: the server cannot tell who was clipped
                else:  # central (or clipping alone): clip again, whatever the client did
                    c, norm = dp.clip(d, self.clip)
                    c = c.double()
                    unclipped += int(norm <= self.clip)
            except ValueError as e:
                rejected[cid] = f"privacy: {e}"
                continue
            total += c
            used += 1
        mean, metrics = self._finish(total, used, expected, rnd, unclipped)
        return mean, rejected, metrics

    def combine_sum(self, total: torch.Tensor, used: int, expected: float, rnd: int
                    ) -> tuple[torch.Tensor | None, dict]:
        """Secure aggregation: the unmasked sum of ``used`` clients' fixed-point updates."""
        return self._finish(total.double(), used, expected, rnd, None)

    def sum_bound(self, used: int, step: float) -> float:
        """The largest L2 norm the sum of ``used`` honest clipped updates (fixed point, noised) can have."""
        s = self.setup
        return (used * (self.clip + step * math.sqrt(self.numel))
                + 1.2 * s.client_noise_std(self.clip) * math.sqrt(used * self.numel))

    def _finish(self, total: torch.Tensor, used: int, expected: float, rnd: int, unclipped: int | None
                ) -> tuple[torch.Tensor | None, dict]:
        s = self.setup
        metrics: dict = {"clip": self.clip, "contributions": used}
        if used == 0:
            return None, metrics
        if s.dp and s.mode == "distributed" and used < s.min_clients:
            metrics["not_applied"] = f"{used} contributions < privacy.dp.min_clients={s.min_clients}"
            return None, metrics
        denom = expected if s.dp else used  # DP: the fixed denominator E[m]; plain clipping: the mean
        gen = dp.noise_generator(s.noise_seed, 0, rnd) if s.dp else None
        mean = dp.noisy_mean(total, s.central_noise_std(self.clip), denom, gen)
        if s.dp:
            self.record(rnd)
            metrics["epsilon"] = self.accountant.epsilon()
            metrics["noise_std_mean"] = (s.z_delta * self.clip) / denom
            metrics["expected_clients"] = denom
        if unclipped is not None and s.dp:
            metrics["unclipped"] = unclipped  # exact count: a diagnostic on the server, not released under DP
        if s.dp and s.adaptive and unclipped is not None:
            # the centred count sum(b_i - 1/2) has sensitivity 1/2, which the 2 sigma_b of z_delta assumes
            centred = unclipped - used / 2
            noisy = centred + float(dp.gaussian(1, s.count_stddev, dp.noise_generator(s.noise_seed, 2, rnd))[0])
            self.clip = dp.next_clip(self.clip, noisy + denom / 2, denom, s.target_quantile, s.clip_lr)
            metrics["next_clip"] = self.clip
        return mean.to(torch.float32), metrics

    def state_dict(self) -> dict:
        return {"clip": self.clip, "z": self.setup.z, "z_delta": self.setup.z_delta,
                "count_stddev": self.setup.count_stddev,
                "accountant": self.accountant.state_dict() if self.accountant else None}

    def load_state_dict(self, state: dict) -> None:
        """A resume: the clip and the noise (z calibrated once, for the run's first fed.rounds, and the count's
        sigma_b: a resume with more rounds keeps them) come from the checkpoint; the accountant from the
        ledger, which also counts rounds computed after the last checkpoint (a crash). The sampling seed is
        drawn afresh: a replayed round then samples anew, so its two releases compose as independent
        subsampled mechanisms, which is what the ledger counts."""
        self.clip = float(state.get("clip", self.clip))
        if state.get("z") is not None:
            self.setup.z, self.setup.z_delta = float(state["z"]), float(state["z_delta"])
            self.setup.count_stddev = float(state.get("count_stddev", self.setup.count_stddev))
        if self.accountant is not None:
            self.accountant.load_state_dict(state.get("accountant") or {})
            if self.ledger is not None and self.ledger.exists():
                rows = []
                for line in filter(str.strip, self.ledger.read_text().splitlines()):
                    try:
                        r = json.loads(line)
                        rows.append((float(r["q"]), float(r["z"])))
                    except (ValueError, KeyError, TypeError):  # a line cut short by a crash: a spent round
                        rows.append((float(self.setup.q), float(self.setup.z)))
                if len(rows) > len(self.accountant.steps):
                    self.accountant.steps = rows
