"""The exchange stage: one round's downlink out and uplinks back, under the round's deadline, decoded.

``Exchange`` is the only way the server (and secure aggregation's ``MaskedServer``, which makes four of them
a round) talks to the workers: ``exchange(head, body, sizes, slots, training)`` -> (per-worker uplinks,
stats). ``decode`` turns the uplinks into client updates; a message is untrusted, so a decoder error
excludes its client and never ends the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fed_ddp.distributed.collectives import GatherTimeout
from fed_ddp.strategies import ClientUpdate

log = logging.getLogger("fed_ddp.server")


class Exchange:
    """The transport under a deadline: ``fed.round_timeout_s``, or (null) 10x the first training exchange's
    time per client slot times this exchange's slots, at least 60 s."""

    def __init__(self, transport, wire, fed, gather: str):
        self.transport, self.wire, self.fed, self.gather = transport, wire, fed, gather
        self.per_client_s: float | None = None  # set by the first training exchange

    def deadline(self, slots: int) -> float | None:
        """Seconds every worker has to answer; None = no deadline (0, or before round 1's exchange)."""
        rt = self.fed.round_timeout_s
        if rt is not None:
            return rt or None
        return max(60.0, self.per_client_s * slots) if self.per_client_s else None

    def __call__(self, head: torch.Tensor, body: torch.Tensor, sizes: list[int], slots: int, training: bool):
        try:
            ups, stats = self.transport.exchange(head, body, sizes, self.deadline(slots))
        except GatherTimeout as e:
            which = "" if self.gather == "p2p" else " (one of them; comm.gather=p2p names exactly which)"
            raise RuntimeError(f"round {self.wire.unpack_head(head).plan.round}: worker rank(s) {e.missing}{which} "
                               f"have not answered within {e.seconds:.0f} s (fed.round_timeout_s): hung or stopped; "
                               "every complete round is checkpointed") from None
        if training and self.fed.round_timeout_s is None and self.per_client_s is None and slots:
            self.per_client_s = 10 * stats.seconds / slots
            log.info("round deadline: 10 x %.1f s per client on the busiest worker, at least 60 s "
                     "(fed.round_timeout_s sets it)", stats.seconds / slots)
        return ups, stats


@dataclass
class Uplinks:
    """What came back in a round: decoded updates (by client id), each worker's (for its clocks), the
    clients rejected so far and why, the exchange's stats, and secure aggregation's outcome (or None)."""
    updates: list[ClientUpdate]
    per_worker: list[list[ClientUpdate]]
    stats: object
    rejected: dict[int, str] = field(default_factory=dict)
    outcome: object = None

    @property
    def arrived(self) -> list[int]:
        return [u.client_id for u in self.updates] if self.outcome is None else list(self.outcome.survivors)


def decode(wire, table: list[list[int]], ups: list[torch.Tensor], global_flat: torch.Tensor, stats) -> Uplinks:
    """Each worker's uplink split into its clients' messages and decoded (``lora.client_ranks``: expanded to full
    size); a message that does not decode, or names another client than its slot, rejects that client."""
    got = Uplinks([], [], stats)
    for row, buf in zip(table, ups):
        mine = []
        for cid, msg in zip(row, wire.split_uplink(buf, row)):
            try:
                u = wire.unpack_uplink(msg, cid, global_flat)
            except (ValueError, RuntimeError, IndexError, ArithmeticError) as e:
                got.rejected[cid] = f"undecodable message: {' '.join(str(e).split())[:200]}"
                continue
            if u.client_id != cid:
                got.rejected[cid] = f"message in client {cid}'s slot says client {u.client_id}"
                continue
            mine.append(u)
        got.per_worker.append(mine)
        got.updates.extend(mine)
    got.updates.sort(key=lambda u: u.client_id)  # aggregation order: by client id, whoever played it
    return got


def masked(outcome) -> Uplinks:
    """Secure aggregation's outcome as the round's uplinks: no decoded update (only the unmasked sum), each
    worker's clocks, the clients it rejected."""
    per_worker = [[ClientUpdate(c, torch.empty(0), 0, {"train_seconds": ts, "client_seconds": cs})
                   for c, ts, cs in mine] for mine in outcome.timing]
    return Uplinks([], per_worker, outcome.stats, dict(outcome.rejected), outcome)
