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


def lookup(name: str, key: str = "fed.strategy") -> type[Strategy]:
    """The strategy class of a registered name, or of ``package.module:Name`` (registered under that name)."""
    from fed_ddp.plugins import lookup as find

    return find(REGISTRY, name, key, Strategy)


def build_strategy(fed, train, layout=None) -> Strategy:
    """Build the strategy named by ``fed.strategy`` from the fed and train config groups and ``fed.strategy_args``
    (``layout``: the flat vector's named shapes, for the strategies that aggregate LoRA layers as products).
    Every strategy, built-in or a plug-in's, is built the same way: ``Strategy.from_config``."""
    return lookup(fed.strategy).from_config(fed, train, layout, dict(getattr(fed, "strategy_args", None) or {}))


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
