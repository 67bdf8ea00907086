"""What a strategy or a feature adds to a client's round on the worker, owned by that feature.

The worker plays a client the same way whatever runs: it loads the client's state, trains it from the round's
adapter, encodes its delta and saves its state. A ``ClientHook`` is how a feature changes that without a
branch in ``Worker``: SCAFFOLD's gradient correction and control variate (``strategies.scaffold``), a personal
adapter (``personal``), privacy's clipping and noise (``privacy.engine``). A strategy brings its own through
``Strategy.client_hook``; ``worker.client_hooks`` lists them in the order they run.

For one exchange, then for every client of the worker's row, the worker calls

    start = hook.downlink(wire, body, slots, start)     once per exchange: its part of the downlink (every rank)
    hook.before_fit(worker, job)                        the client's own state in, before training (every rank)
    with hook.fitting(worker, job): ...train...         around the client's local steps (every rank)
    delta = hook.after_fit(worker, job, delta)          after training (every rank)
    delta = hook.before_encode(worker, job, delta)      before the codec (the leader rank only)

and keeps ``job.saved`` (tensors under the hook's ``prefix``) in the client's state file, never in its message.
``job.plan`` is the round's plan as the client received it; ``job.plan.values`` the strategy's plan values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class ClientJob:
    """One client's round on a worker, as every hook sees it."""
    client: int
    plan: object  # strategies.RoundPlan (plan.values: the strategy's plan values for the round)
    state_round: int  # the round whose saved state the client reloads (-1: it has none yet)
    start: torch.Tensor  # the adapter it trains from
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # kept in its state file, by the hooks' prefixes
    keep: int | None = None  # an older state file of the client that must stay (SCAFFOLD: until its Δc_i counts)


class ClientHook:
    """Every method has a default that does nothing; a hook overrides what it needs."""

    prefix: str | None = None  # the keys of the client's state file this hook owns (kept out of the codec state)
    saves: bool = False  # it keeps tensors in the client's state file (job.saved), so the server names its round

    def downlink(self, wire, body: torch.Tensor, slots: int, start: torch.Tensor) -> torch.Tensor:
        return start

    def before_fit(self, worker, job: ClientJob) -> None:
        pass

    def fitting(self, worker, job: ClientJob):
        return contextlib.nullcontext()

    def after_fit(self, worker, job: ClientJob, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def before_encode(self, worker, job: ClientJob, delta: torch.Tensor) -> torch.Tensor:
        return delta
