"""FedAvg (McMahan et al. 2017): the global adapter moves by the sample-weighted mean of client deltas."""

from __future__ import annotations

import torch

from fed_ddp.strategies.base import ClientUpdate, Strategy


class FedAvg(Strategy):
    def aggregate(self, rnd: int, global_state: torch.Tensor, updates: list[ClientUpdate]):
        mean = self.combine(updates)
        return global_state + self.server_lr * mean, {"update_norm": float(mean.norm())}


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg aggregation; clients add (mu/2)*||w - w_global||^2 to their loss.

    The proximal term is applied by the client trainer from ``RoundPlan.proximal_mu``.
    """

    fed_keys = ("proximal_mu",)
