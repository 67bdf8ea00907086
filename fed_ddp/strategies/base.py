"""The strategy interface: pure tensor maths on flat adapter vectors, no process-group code."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class RoundPlan:
    """What the server asks of every client in one round (travels in the downlink header)."""

    round: int
    local_steps: int
    lr: float
    proximal_mu: float = 0.0


@dataclass
class ClientUpdate:
    """What one client sent: its adapter delta (local - global), sample count and metrics (scaffold: and the
    change of its control variate, ``control``)."""

    client_id: int
    delta: torch.Tensor
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    control: torch.Tensor | None = None


def weighted_mean(updates: list[ClientUpdate]) -> torch.Tensor:
    """Sample-weighted mean of the clients' deltas (FedAvg's aggregate), in fp64 for exactness."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("clients reported no examples: nothing to average")
    acc = torch.zeros_like(updates[0].delta, dtype=torch.float64)
    for u in updates:
        acc.add_(u.delta, alpha=u.num_examples / total)  # in fp64, without a product temporary
    return acc.to(updates[0].delta.dtype)


class Strategy(ABC):
    """A server strategy: plans rounds, aggregates client deltas, owns the server state."""

    controls = False  # scaffold: control variates travel with the adapter (``protocol.ControlWire``)

    def __init__(self, local_steps: int, lr: float, proximal_mu: float = 0.0, server_lr: float = 1.0,
                 aggregator: str = "mean", trim_fraction: float = 0.2):
        self.local_steps, self.lr, self.proximal_mu, self.server_lr = local_steps, lr, proximal_mu, server_lr
        self.aggregator, self.trim_fraction = aggregator, trim_fraction

    def combine(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """The round's mean delta: sample-weighted (FedAvg), or robust (``fed.aggregator``)."""
        from fed_ddp.strategies.robust import combine

        return combine(updates, self.aggregator, self.trim_fraction)

    def downlink(self, global_state: torch.Tensor) -> torch.Tensor:
        """The flat vector every client receives: the global adapter (scaffold: followed by the control c)."""
        return global_state

    def configure_round(self, rnd: int) -> RoundPlan:
        return RoundPlan(round=rnd, local_steps=self.local_steps, lr=self.lr, proximal_mu=self.proximal_mu)

    @abstractmethod
    def aggregate(self, rnd: int, global_state: torch.Tensor, updates: list[ClientUpdate]
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the new global adapter vector and scalar metrics."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
