"""The privacy accountant: epsilon(delta) of the run so far, from Google's ``dp-accounting``.

Each round that releases a noised aggregate is one Poisson-subsampled Gaussian mechanism with
sampling rate q (``fed.sample_rate``; q = 1 with ``fed.sampling=all``) and noise multiplier z; the
run is their composition. ``pld`` (privacy loss distributions) is tight; ``rdp`` (Renyi DP) is the
classic upper bound. The history of (q, z) per round is all the state there is: it is checkpointed
and a resumed run rebuilds the same accountant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's RDP prints convergence notes per order

KINDS = ("pld", "rdp")


def _event(q: float, z: float, rounds: int = 1):
    import dp_accounting as dpa

    one = dpa.GaussianDpEvent(z) if q >= 1 else dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
    return one if rounds == 1 else dpa.SelfComposedDpEvent(one, rounds)


def _fresh(kind: str):
    from dp_accounting import pld, rdp

    if kind == "pld":
        return pld.PLDAccountant(value_discretization_interval=1e-3)
    if kind == "rdp":
        return rdp.RdpAccountant()
    raise ValueError(f"privacy.dp.accountant={kind!r}: must be one of {list(KINDS)}")


def epsilon(kind: str, steps: list[tuple[float, float]], delta: float) -> float:
    """epsilon(delta) after the mechanisms ``steps`` = [(q, z), ...] (runs of equal steps compose at once)."""
    if not steps:
        return 0.0
    acc = _fresh(kind)
    run_start = 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or steps[i] != steps[run_start]:
            q, z = steps[run_start]
            acc.compose(_event(q, z, i - run_start))
            run_start = i
    return float(acc.get_epsilon(delta))


def calibrate(kind: str, q: float, rounds: int, target_epsilon: float, delta: float,
              z_max: float = 500.0) -> float:
    """The smallest noise multiplier z whose epsilon after ``rounds`` rounds is at most ``target_epsilon``.
    Raises ValueError when even z_max does not reach it."""
    import dp_accounting as dpa

    if epsilon(kind, [(q, z_max)] * rounds, delta) > target_epsilon:
        raise ValueError(f"privacy.dp.target_epsilon={target_epsilon:g}: unreachable in {rounds} rounds at q={q:g}, "
                         f"delta={delta:g} (noise_multiplier {z_max:g} still gives more); raise it or run fewer rounds")
    return float(dpa.calibrate_dp_mechanism(lambda: _fresh(kind), lambda z: _event(q, z, rounds), target_epsilon,
                                            delta, dpa.ExplicitBracketInterval(0.05, z_max), tol=1e-3))


@dataclass
class Accountant:
    kind: str
    delta: float
    steps: list[tuple[float, float]] = field(default_factory=list)  # (q, z) of every round that released noise

    def epsilon(self, extra: list[tuple[float, float]] = ()) -> float:
        return epsilon(self.kind, self.steps + list(extra), self.delta)

    def step(self, q: float, z: float) -> None:
        self.steps.append((float(q), float(z)))

    def state_dict(self) -> dict:
        return {"kind": self.kind, "delta": self.delta, "steps": [list(s) for s in self.steps]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = [(float(q), float(z)) for q, z in state.get("steps", [])]
