"""FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution", arXiv 1909.06335).

FedAvg with momentum on the server. d is the round's combined client delta (sample-weighted mean, or
``fed.aggregator``'s robust combination); the velocity m starts at zero and is saved with checkpoints:
    m = beta*m + d;  w = w + server_lr * m
beta = 0 is FedAvg. The steady-state step along a constant d is server_lr/(1-beta) x d: to keep FedAvg's
effective step with beta = 0.9, take server_lr = 0.1 (the paper compares at equal server_lr/(1-beta)).
"""

from __future__ import annotations

import torch

from fed_ddp.strategies.base import ClientUpdate
from fed_ddp.strategies.fedavg import FedAvg


class FedAvgM(FedAvg):
    fed_keys = ("server_momentum",)

    def __init__(self, *args, server_momentum: float = 0.9, **kw):
        super().__init__(*args, **kw)
        self.server_momentum = server_momentum
        self.m: torch.Tensor | None = None

    def aggregate(self, rnd: int, global_state: torch.Tensor, updates: list[ClientUpdate]):
        d = self.combine(updates)
        if self.m is None:
            self.m = torch.zeros_like(d)
        self.m = self.server_momentum * self.m + d
        step = self.server_lr * self.m
        return global_state + step, {"update_norm": float(step.norm())}

    def state_dict(self) -> dict:
        return {"m": self.m}

    def load_state_dict(self, state: dict) -> None:
        self.m = state.get("m")
