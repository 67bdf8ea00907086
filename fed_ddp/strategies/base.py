"""The strategy interface: pure tensor maths on flat adapter vectors, no process-group code."""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod

import torch

from fed_ddp.errors import ConfigError
from fed_ddp.strategies.robust import combine
from fed_ddp.strategies.updates import PLAN_FIELDS, ClientUpdate, RoundPlan, weighted_mean

__all__ = ["ClientUpdate", "RoundPlan", "Strategy", "weighted_mean"]


class Strategy(ABC):
    """A server strategy: plans rounds, aggregates client deltas, owns the server state."""

    controls = False  # scaffold: control variates travel with the adapter (``protocol.ControlWire``)
    frozen_factors: tuple[str, ...] = ()  # LoRA factors every client keeps frozen (FFA-LoRA: "lora_A"), never sent
    # names of the numbers configure_round adds to every round's plan (RoundPlan.values), sent to every client as
    # fp32 after the head's own fields: a client's hooks read them as job.plan.values, its objective self.plan.values
    plan_values: tuple[str, ...] = ()
    RESERVED = ("kind", *PLAN_FIELDS, "slots", "values")  # the downlink head's own fields and RoundPlan's

    # fed.* keys this strategy's constructor takes (fedadam: beta1, beta2, tau); other keyword parameters of its
    # constructor are its own settings, set by fed.strategy_args.NAME (validated against the constructor)
    fed_keys: tuple[str, ...] = ()
    FILLED = ("local_steps", "lr", "server_lr", "aggregator", "trim_fraction", "layout")  # what fed_ddp passes itself

    @classmethod
    def settings(cls) -> dict[str, object]:
        """The constructor's keyword parameters over the class hierarchy, with their defaults (``inspect.Parameter.
        empty`` when required): what ``from_config`` may pass."""
        out: dict[str, object] = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in list(inspect.signature(init).parameters.values())[1:]:
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                    out[p.name] = p.default
        return out

    @classmethod
    def own_settings(cls) -> dict[str, object]:
        """What ``fed.strategy_args`` may set: the settings fed_ddp does not fill from the config itself."""
        return {k: v for k, v in cls.settings().items() if k not in cls.FILLED and k not in cls.fed_keys
                and k != "proximal_mu"}

    @classmethod
    def check_args(cls, name: str, args: dict) -> None:
        """One line for a ``fed.strategy_args`` key the strategy does not declare, or of the wrong type."""
        own = cls.own_settings()
        for k, v in args.items():
            key = f"fed.strategy_args.{k}"
            if k not in own:
                said = ", ".join(sorted(own)) or "none"
                hint = f" (set fed.{k})" if k in cls.fed_keys or k == "proximal_mu" else ""
                raise ConfigError(key, v, f"fed.strategy={name} takes no setting {k!r}{hint}; its settings: {said}")
            default = own[k]
            kind = type(default) if default is not None and default is not inspect.Parameter.empty else None
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                continue
            if kind is not None and not isinstance(v, kind):
                raise ConfigError(key, v, f"must be a {kind.__name__} (fed.strategy={name}'s default is {default!r})")

    @classmethod
    def check_plan_values(cls, name: str) -> None:
        """One line (at config load) for a ``plan_values`` name that is no identifier, repeats, or is reserved."""
        values = cls.plan_values
        allowed = f"plan_values takes distinct identifiers other than {', '.join(cls.RESERVED)}"
        if not isinstance(values, (tuple, list)):
            raise ConfigError("fed.strategy", name, f"plan_values={values!r} is not a tuple of names: {allowed}")
        for i, v in enumerate(values):
            why = ("is not an identifier" if not (isinstance(v, str) and v.isidentifier()) else
                   "is declared twice" if v in values[:i] else "is a field of every plan" if v in cls.RESERVED else "")
            if why:
                raise ConfigError("fed.strategy", name, f"plan value {v!r} {why}: {allowed}")

    @classmethod
    def check_plan(cls, name: str, plan: RoundPlan) -> None:
        """What ``configure_round`` returned must carry exactly the declared ``plan_values``, each a number that
        is finite in fp32; else a line naming the strategy, the round and the value."""
        declared = list(cls.plan_values)
        said = f"(its plan_values: {', '.join(declared) or 'none'})"
        for k in declared:
            if k not in plan.values:
                raise ValueError(f"fed.strategy={name}: configure_round({plan.round}) gave no plan value {k!r} {said}")
        for k, v in plan.values.items():
            if k not in declared:
                raise ValueError(f"fed.strategy={name}: configure_round({plan.round}) gave plan value {k!r}, which "
                                 f"it does not declare {said}")
            try:
                ok = math.isfinite(v) and bool(torch.tensor(float(v), dtype=torch.float32).isfinite())
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"fed.strategy={name}: configure_round({plan.round}) gave plan value {k}={v!r}: "
                                 "must be a number, finite in fp32")

    @classmethod
    def from_config(cls, fed, train, layout=None, args: dict | None = None) -> Strategy:
        """Built from the config: the common settings, the fed.* keys in ``fed_keys``, the layout if the
        constructor takes one, and ``fed.strategy_args``."""
        declared = cls.settings()
        kw = {"local_steps": fed.local_steps, "lr": train.lr, "server_lr": fed.server_lr,
              "aggregator": getattr(fed, "aggregator", "mean"), "trim_fraction": getattr(fed, "trim_fraction", 0.2)}
        kw.update({k: getattr(fed, k) for k in cls.fed_keys})
        if "layout" in declared:
            kw["layout"] = layout
        cls.check_args(fed.strategy, args or {})
        return cls(**kw, **(args or {}))

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
        """Round ``rnd``'s plan; a strategy with ``plan_values`` fills ``values`` (every name, every round)."""
        return RoundPlan(round=rnd, local_steps=self.local_steps, lr=self.lr, proximal_mu=self.proximal_mu)

    @abstractmethod
    def aggregate(self, rnd: int, global_state: torch.Tensor, updates: list[ClientUpdate]
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the new global adapter vector and scalar metrics."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
