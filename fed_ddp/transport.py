"""Moving flat buffers between the server and its clients, and counting every byte moved.

Protocol of one round: the server sends one downlink buffer (plan header + global adapter) to every
client; every client answers with one uplink buffer (delta + sample count + metrics). The transport
neither knows nor cares what is in the buffers.

- ``CollectiveTransport``: ``torch.distributed`` broadcast + gather on an explicit group (gloo or NCCL).
- ``InMemoryTransport``: the same protocol in one process, clients called one after another (tests,
  baselines). Its byte counts are what the collective transport would move for the same buffers.

Byte accounting: ``bytes_down`` = downlink payload bytes delivered to each client, summed over
clients; ``bytes_up`` = uplink payload bytes sent by the clients. These are the tensors the
collectives carry; the backend's own framing (TCP/gloo/NCCL headers) is not included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ExchangeStats:
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0  # wall time of the whole exchange on the server (includes client compute)
    parallel: bool = True  # clients ran concurrently (critical path = slowest) or one after another


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CollectiveTransport:
    """Broadcast + gather over ``torch.distributed`` (server = ``src`` rank of ``group``).

    ``group`` holds the server and one leader per client. With several ranks per client, the leader
    re-broadcasts each downlink inside ``client_group`` (from global rank ``client_src``) and the
    other ranks of the client ``follow``; only leaders send uplinks.
    """

    def __init__(self, server_rank: int = 0, group=None, device: torch.device | None = None,
                 client_group=None, client_src: int | None = None):
        self.server_rank, self.group = server_rank, group
        self.client_group, self.client_src = client_group, client_src
        self.device = device or torch.device("cpu")
        self.num_clients = dist.get_world_size(group) - 1

    # -- server side --------------------------------------------------------------------------
    def exchange(self, downlink: torch.Tensor, uplink_numel: int) -> tuple[list[torch.Tensor], ExchangeStats]:
        t0 = time.perf_counter()
        down = downlink.to(self.device)
        dist.broadcast(down, src=self.server_rank, group=self.group)
        mine = torch.zeros(uplink_numel, dtype=downlink.dtype, device=self.device)  # server's own slot
        slots = [torch.empty_like(mine) for _ in range(self.num_clients + 1)]
        dist.gather(mine, gather_list=slots, dst=self.server_rank, group=self.group)
        ups = [s.cpu() for i, s in enumerate(slots) if i != self.server_rank]
        stats = ExchangeStats(bytes_down=nbytes(down) * self.num_clients, bytes_up=sum(nbytes(u) for u in ups),
                              seconds=time.perf_counter() - t0, parallel=True)
        return ups, stats

    def stop(self, downlink: torch.Tensor) -> None:
        """Send the final downlink (its header says stop); clients return without answering."""
        dist.broadcast(downlink.to(self.device), src=self.server_rank, group=self.group)

    # -- client side --------------------------------------------------------------------------
    def serve(self, downlink_numel: int, handler: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Receive downlinks until ``handler`` returns None (stop); send back what it returns."""
        while True:
            down = torch.empty(downlink_numel, dtype=torch.float32, device=self.device)
            dist.broadcast(down, src=self.server_rank, group=self.group)
            if self.client_group is not None:
                dist.broadcast(down, src=self.client_src, group=self.client_group)
            up = handler(down.cpu())
            if up is None:
                return
            dist.gather(up.to(self.device), gather_list=None, dst=self.server_rank, group=self.group)

    def follow(self, downlink_numel: int, handler: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """A non-leader rank of a client: take each downlink from the leader and train alongside it."""
        while True:
            down = torch.empty(downlink_numel, dtype=torch.float32, device=self.device)
            dist.broadcast(down, src=self.client_src, group=self.client_group)
            if handler(down.cpu()) is None:
                return


@dataclass
class InMemoryTransport:
    """The same protocol in one process: each client handler is called in turn."""

    handlers: list[Callable[[torch.Tensor], torch.Tensor | None]] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return len(self.handlers)

    def exchange(self, downlink: torch.Tensor, uplink_numel: int) -> tuple[list[torch.Tensor], ExchangeStats]:
        t0 = time.perf_counter()
        ups = [h(downlink.clone()) for h in self.handlers]
        for u in ups:
            if u is None or u.numel() != uplink_numel:
                raise RuntimeError(f"client sent {None if u is None else u.numel()} values, expected {uplink_numel}")
        return ups, ExchangeStats(bytes_down=nbytes(downlink) * len(ups), bytes_up=sum(nbytes(u) for u in ups),
                                  seconds=time.perf_counter() - t0, parallel=False)

    def stop(self, downlink: torch.Tensor) -> None:
        for h in self.handlers:
            h(downlink.clone())
