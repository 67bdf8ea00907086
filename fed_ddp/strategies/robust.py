"""Distrust every update: screening and robust combination of client deltas (pure tensor maths).

    kept, rejected = screen(updates, numel, sizes, max_norm=0.0, norm_factor=10.0)
    mean = combine(kept, "trimmed_mean", trim_fraction=0.2)

``screen`` drops an update, with a reason, when its delta has the wrong size or a non-finite value, its
metrics are not finite, it claims more examples than the server knows the client holds (the partition is
the server's) or fewer than one, or its L2 norm exceeds ``max_norm`` (absolute, 0 = off) or
``norm_factor`` x the lower median of the round's norms (0 = off). ``combine`` turns the kept deltas
into one: the sample-weighted ``mean`` (FedAvg), the coordinate-wise ``median``, the coordinate-wise
``trimmed_mean`` (drop the ``trim_fraction`` largest and smallest values of every coordinate), or the
``clipped_mean`` (every delta clipped to the median norm, then the weighted mean). Median and trimmed
mean ignore the example counts: a client that lies about them gains nothing.
"""

from __future__ import annotations

import math

import torch

from fed_ddp.strategies.updates import ClientUpdate, weighted_mean

AGGREGATORS = ("mean", "median", "trimmed_mean", "clipped_mean")


def lower_median(values: list[float]) -> float:
    """The median, or the lower of the two middle values (one outlier of two cannot move it up)."""
    s = sorted(values)
    return s[(len(s) - 1) // 2]


def screen(updates: list[ClientUpdate], numel: int, sizes=None, max_norm: float = 0.0, norm_factor: float = 0.0,
           reference_norm: float | None = None) -> tuple[list[ClientUpdate], dict[int, str]]:
    """(the updates that pass, {client id: why it was rejected}). ``reference_norm``: the median norm of
    earlier rounds, the yardstick when fewer than two updates are left to compare with each other."""
    kept, rejected = [], {}
    for u in updates:
        d = u.delta
        if d.dim() != 1 or d.numel() != numel:
            rejected[u.client_id] = f"delta has {d.numel()} values, the adapter {numel}"
        elif not bool(torch.isfinite(d).all()):
            rejected[u.client_id] = f"delta has {int((~torch.isfinite(d)).sum())} non-finite values"
        elif u.control is not None and (u.control.shape != d.shape or not bool(torch.isfinite(u.control).all())):
            rejected[u.client_id] = "control variate (scaffold) has the wrong size or non-finite values"
        elif not all(math.isfinite(v) for v in u.metrics.values()):
            rejected[u.client_id] = "metrics are not finite"
        elif u.num_examples < 1:
            rejected[u.client_id] = f"claims {u.num_examples} examples"
        elif sizes is not None and u.num_examples > int(sizes[u.client_id]):
            rejected[u.client_id] = f"claims {u.num_examples} examples, holds {int(sizes[u.client_id])}"
        elif max_norm > 0 and (n := float(d.double().norm())) > max_norm:
            rejected[u.client_id] = f"norm {n:.4g} > fed.max_update_norm={max_norm:g}"
        else:
            kept.append(u)
    if norm_factor > 0 and (len(kept) >= 2 or (kept and reference_norm)):
        norms = [float(u.delta.double().norm()) for u in kept]
        bound = norm_factor * (lower_median(norms) if len(kept) >= 2 else reference_norm)
        for u, n in zip(list(kept), norms):
            if n > bound:
                rejected[u.client_id] = f"norm {n:.4g} > {norm_factor:g} x the round's median norm ({bound:.4g})"
                kept.remove(u)
    if norm_factor > 0 and len(kept) >= 2 and kept[0].control is not None:  # scaffold: Δc_i by the same rule
        norms = [float(u.control.double().norm()) for u in kept]
        bound = norm_factor * lower_median(norms)
        for u, n in zip(list(kept), norms):
            if n > bound:
                rejected[u.client_id] = (f"control variate norm {n:.4g} > {norm_factor:g} x the round's median "
                                         f"({bound:.4g})")
                kept.remove(u)
    return kept, rejected


def combine(updates: list[ClientUpdate], how: str = "mean", trim_fraction: float = 0.2) -> torch.Tensor:
    """One delta from the kept updates (fp64 maths, returned in the deltas' dtype)."""
    if not updates:
        raise ValueError("no updates to combine")
    if how == "mean":
        return weighted_mean(updates)
    stack = torch.stack([u.delta.double() for u in updates])
    if how == "median":
        out = stack.median(dim=0).values if len(updates) % 2 else stack.sort(dim=0).values[
            len(updates) // 2 - 1:len(updates) // 2 + 1].mean(dim=0)
    elif how == "trimmed_mean":
        k = int(trim_fraction * len(updates))
        if 2 * k >= len(updates):
            k = (len(updates) - 1) // 2
        out = stack.sort(dim=0).values[k:len(updates) - k].mean(dim=0)
    elif how == "clipped_mean":
        norms = stack.norm(dim=1)
        bound = lower_median(norms.tolist())
        scale = torch.clamp(bound / norms.clamp_min(1e-30), max=1.0)
        clipped = [ClientUpdate(u.client_id, (stack[i] * scale[i]), u.num_examples) for i, u in enumerate(updates)]
        out = weighted_mean(clipped)
    else:
        raise ValueError(f"fed.aggregator={how!r}: must be one of {list(AGGREGATORS)}")
    return out.to(updates[0].delta.dtype)
