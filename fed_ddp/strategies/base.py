"""The strategy interface: pure tensor maths on flat adapter vectors, no process-group code."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from fed_ddp.strategies.robust import combine
from fed_ddp.strategies.updates import ClientUpdate, RoundPlan, weighted_mean

__all__ = ["ClientUpdate", "RoundPlan", "Strategy", "weighted_mean"]


class Strategy(ABC):
    """A server strategy: plans rounds, aggregates client deltas, owns the server state."""

    controls = False  # scaffold: control variates travel with the adapter (``protocol.ControlWire``)
    frozen_factors: tuple[str, ...] = ()  # LoRA factors every client keeps frozen (FFA-LoRA: "lora_A"), never sent

    @classmethod
    def client_hook(cls, cfg):
        """What this strategy adds to each client's round on the workers (a ``hooks.ClientHook``), or None."""
        return

    def __init__(self, local_steps: int, lr: float, proximal_mu: float = 0.0, server_lr: float = 1.0,
                 aggregator: str = "mean", trim_fraction: float = 0.2):
        self.local_steps, self.lr, self.proximal_mu, self.server_lr = local_steps, lr, proximal_mu, server_lr
        self.aggregator, self.trim_fraction = aggregator, trim_fraction

    def combine(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """The round's mean delta: sample-weighted (FedAvg), or robust (``fed.aggregator``)."""
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
