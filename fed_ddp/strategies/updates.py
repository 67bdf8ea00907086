"""What a round asks of a client and what a client sends back; the sample-weighted mean of the latter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PLAN_FIELDS = ("round", "local_steps", "lr", "proximal_mu")  # every plan's own fields, in the downlink head's order


@dataclass
class RoundPlan:
    """What the server asks of every client in one round (travels in the downlink header). ``values``: the
    strategy's own numbers for the round, one per name in its ``plan_values`` (fp32 on the wire)."""

    round: int
    local_steps: int
    lr: float
    proximal_mu: float = 0.0
    values: dict[str, float] = field(default_factory=dict)


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
