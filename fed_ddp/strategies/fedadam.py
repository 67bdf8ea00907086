"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the server.

The mean client delta is a pseudo-gradient; the server keeps Adam's moments (saved with checkpoints):
    m = b1*m + (1-b1)*d;  v = b2*v + (1-b2)*d^2;  w = w + eta * m / (sqrt(v) + tau)
(no bias correction, as in the paper). Both moments start at zero, m_{-1} = v_{-1} = 0 (the paper's
Algorithm 2 asks for v_{-1} >= tau^2; here tau in the denominator alone bounds the first steps). FedAdagrad
and FedYogi (``fedopt.py``) are this class with another second-moment rule (``_second_moment``).
"""

from __future__ import annotations

import torch

from fed_ddp.strategies.base import ClientUpdate
from fed_ddp.strategies.fedavg import FedAvg


class FedAdam(FedAvg):
    fed_keys = ("beta1", "beta2", "tau")

    def __init__(self, *args, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **kw):
        super().__init__(*args, **kw)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def aggregate(self, rnd: int, global_state: torch.Tensor, updates: list[ClientUpdate]):
        d = self.combine(updates)
        if self.m is None:
            self.m, self.v = torch.zeros_like(d), torch.zeros_like(d)
        self.m = self.beta1 * self.m + (1 - self.beta1) * d
        self.v = self._second_moment(self.v, d)
        step = self.server_lr * self.m / (self.v.sqrt() + self.tau)
        return global_state + step, {"update_norm": float(step.norm())}

    def _second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Adam: v = b2*v + (1-b2)*d^2 (the same float operations, in the same order, as before the hook)."""
        return self.beta2 * v + (1 - self.beta2) * d * d

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v = state.get("m"), state.get("v")
