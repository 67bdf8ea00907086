"""Aggregation strategies, by name. Pure tensor maths: no process group inside."""

from __future__ import annotations

from fed_ddp.strategies.base import ClientUpdate, RoundPlan, Strategy, weighted_mean
from fed_ddp.strategies.fedadam import FedAdam
from fed_ddp.strategies.fedavg import FedAvg, FedProx
from fed_ddp.strategies.robust import AGGREGATORS, combine, screen

REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str, cls: type[Strategy]) -> None:
    if name in REGISTRY:
        raise ValueError(f"strategy {name!r} is already registered")
    REGISTRY[name] = cls


register("fedavg", FedAvg)
register("fedprox", FedProx)
register("fedadam", FedAdam)


def build_strategy(fed, train) -> Strategy:
    """Build the strategy named by ``fed.strategy`` from the fed and train config groups."""
    if fed.strategy not in REGISTRY:
        raise ValueError(f"fed.strategy={fed.strategy!r}: must be one of {sorted(REGISTRY)}")
    kw = {"local_steps": fed.local_steps, "lr": train.lr, "server_lr": fed.server_lr,
          "proximal_mu": fed.proximal_mu if fed.strategy == "fedprox" else 0.0,
          "aggregator": getattr(fed, "aggregator", "mean"), "trim_fraction": getattr(fed, "trim_fraction", 0.2)}
    if fed.strategy == "fedadam":
        kw.update(beta1=fed.beta1, beta2=fed.beta2, tau=fed.tau)
    return REGISTRY[fed.strategy](**kw)


__all__ = [
    "AGGREGATORS",
    "REGISTRY",
    "ClientUpdate",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "RoundPlan",
    "Strategy",
    "build_strategy",
    "combine",
    "register",
    "screen",
    "weighted_mean",
]
