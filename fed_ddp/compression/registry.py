"""Codecs by name, and the rules a chain of them must follow.

A chain is ``[transform] + [encoder]``, each part optional:

- transforms: ``topk``, ``blocktopk``, ``segtopk``, ``randomk``, ``lowrank``: at most one, and first. They need the dense tensor
  (top-k ranks all values; PowerSGD multiplies the whole matrix), so nothing may run before them, and
  their output (a value list, or two factors) is no longer a matrix another transform could use.
- encoders: ``fp16``, ``bf16``, ``int8``, ``int4``: at most one, and last. They turn floats into what
  travels (half floats, integer codes); a second cast or quantizer would only add error.

So ``[topk, int8]``, ``[lowrank, fp16]``, ``[int4]``, ``[randomk]`` are chains; ``[int8, topk]``,
``[topk, lowrank]``, ``[fp16, int8]`` are not. ``[]`` sends dense fp32. Names are lower case; a name
can be registered once.
"""

from __future__ import annotations

from fed_ddp.compression.base import ENCODER, TRANSFORM, Codec
from fed_ddp.errors import ConfigError

REGISTRY: dict[str, type[Codec]] = {}


def register(name: str):
    """Class decorator: ``@register("topk")``."""

    def deco(cls: type[Codec]) -> type[Codec]:
        if name != name.lower() or not name.isidentifier():
            raise ValueError(f"codec name {name!r} must be a lower-case identifier")
        if name in REGISTRY:
            raise ValueError(f"codec {name!r} is already registered")
        if getattr(cls, "kind", None) not in (TRANSFORM, ENCODER):
            raise ValueError(f"codec {name!r}: kind must be {TRANSFORM!r} or {ENCODER!r}")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def _names(kind: str) -> str:
    return ", ".join(sorted(n for n, c in REGISTRY.items() if c.kind == kind))


def validate_chain(names: list[str], key: str = "comm.uplink") -> list[str]:
    """Check a chain against the registry and the order rules; return the codecs' kinds.

    Raises ``ConfigError`` (a ``ValueError``) with one line naming ``key``, the chain and what is allowed.
    """
    kinds = []
    for i, name in enumerate(names):
        if name not in REGISTRY:
            raise ConfigError(key, list(names), f"unknown codec {name!r}; known: {', '.join(sorted(REGISTRY))}")
        kind = REGISTRY[name].kind
        if i > 0:
            prev = names[i - 1]
            if kinds[-1] == ENCODER:
                raise ConfigError(key, list(names), f"{name!r} cannot follow {prev!r}: casts and quantizers "
                                  f"({_names(ENCODER)}) end a chain")
            if kind == TRANSFORM:
                raise ConfigError(key, list(names), f"{name!r} cannot follow {prev!r}: at most one of "
                                  f"{_names(TRANSFORM)}, and it comes first")
        kinds.append(kind)
    return kinds


def build_codecs(names: list[str], comm, key: str = "comm.uplink") -> list[Codec]:
    validate_chain(names, key)
    return [REGISTRY[n].from_config(comm) for n in names]


# the built-in codecs register themselves on import
