"""Aggregation strategies, by name. Pure tensor maths: no process group inside."""

from __future__ import annotations

from fed_ddp.strategies.base import ClientUpdate, RoundPlan, Strategy, weighted_mean
from fed_ddp.strategies.fedadam import FedAdam
from fed_ddp.strategies.fedavg import FedAvg, FedProx
from fed_ddp.strategies.fedavgm import FedAvgM
from fed_ddp.strategies.fedopt import FedAdagrad, FedYogi
from fed_ddp.strategies.lora_agg import FfaLora, FlexLora, lora_pairs, product_error
from fed_ddp.strategies.robust import AGGREGATORS, combine, screen
from fed_ddp.strategies.scaffold import Scaffold

REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str, cls: type[Strategy]) -> None:
    if name in REGISTRY:
        raise ValueError(f"strategy {name!r} is already registered")
    REGISTRY[name] = cls


register("fedavg", FedAvg)
register("fedprox", FedProx)
register("fedadam", FedAdam)
register("fedavgm", FedAvgM)
register("fedadagrad", FedAdagrad)
register("fedyogi", FedYogi)
register("ffa_lora", FfaLora)
register("flexlora", FlexLora)
register("scaffold", Scaffold)


def build_strategy(fed, train, layout=None) -> Strategy:
    """Build the strategy named by ``fed.strategy`` from the fed and train config groups (``layout``: the flat
    vector's named shapes, for the strategies that aggregate LoRA layers as products)."""
    if fed.strategy not in REGISTRY:
        raise ValueError(f"fed.strategy={fed.strategy!r}: must be one of {sorted(REGISTRY)}")
    kw = {"local_steps": fed.local_steps, "lr": train.lr, "server_lr": fed.server_lr,
          "proximal_mu": fed.proximal_mu if fed.strategy == "fedprox" else 0.0,
          "aggregator": getattr(fed, "aggregator", "mean"), "trim_fraction": getattr(fed, "trim_fraction", 0.2)}
    if fed.strategy in ("fedadam", "fedadagrad", "fedyogi"):
        kw.update(beta1=fed.beta1, beta2=fed.beta2, tau=fed.tau)
    elif fed.strategy == "fedavgm":
        kw.update(server_momentum=fed.server_momentum)
    elif fed.strategy == "scaffold":
        kw.update(num_clients=fed.num_clients)
    elif fed.strategy in ("flexlora", "ffa_lora"):
        kw.update(layout=layout)
    return REGISTRY[fed.strategy](**kw)


__all__ = [
    "AGGREGATORS",
    "REGISTRY",
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "FfaLora",
    "FlexLora",
    "RoundPlan",
    "Scaffold",
    "Strategy",
    "build_strategy",
    "combine",
    "lora_pairs",
    "product_error",
    "register",
    "screen",
    "weighted_mean",
]
