"""The one error a user sees for bad input, and the checks every config section uses.

A leaf module (imports nothing from fed_ddp), so any component can own its config section and
validate it without importing ``fed_ddp.config``.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line: the key, the value, what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: {allowed}" if value is None else f"{key}={value!r}: {allowed}")


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def one_of(key: str, value: Any, choices) -> None:
    check(value in choices, key, value, f"must be one of {sorted(choices)}")


def positive(key: str, value: float, zero_ok: bool = False) -> None:
    """> 0 (or >= 0), and finite: inf and nan are refused too."""
    import math

    check(isinstance(value, (int, float)) and math.isfinite(value), key, value, "must be a finite number")
    check(value >= 0 if zero_ok else value > 0, key, value, "must be >= 0" if zero_ok else "must be > 0")


SEED_LIMIT = 2 ** 32  # every stream derived from a seed (seed * 1_000_003 + round * 1_009 + id) fits torch's 64 bits


def integer(key: str, value: Any, lo: int, hi: int, why: str = "") -> None:
    """An integer in [lo, hi] (bools refused); ``why`` says where the bound comes from."""
    check(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
    check(lo <= value <= hi, key, value, f"must be in [{lo:,}, {hi:,}]{why}")


def seed(key: str, value: Any) -> None:
    integer(key, value, 0, SEED_LIMIT - 1, " (seeds of every derived random stream must fit 64 bits)")
