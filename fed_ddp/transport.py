"""Moving the round's byte buffers between the server and its clients, and counting every byte moved.

Protocol of one round: the server broadcasts one downlink buffer (plan header + encoded global adapter)
to every client; every client answers with one uplink buffer (encoded delta + sample count + metrics).
Buffers are flat uint8 tensors whose sizes both ends know in advance (``fed_ddp.protocol.Wire``); the
transport neither knows nor cares what is in them.

- ``CollectiveTransport``: ``torch.distributed`` broadcast + ``gather_bytes`` on an explicit group
  (gloo or NCCL): one native gather, or one batched isend/irecv round (``comm.gather``).
- ``InMemoryTransport``: the same protocol in one process, clients called one after another (tests,
  baselines). Its byte counts are what the collective transport would move for the same buffers.

Byte accounting: ``bytes_down`` = downlink bytes delivered to the clients (buffer size x clients);
``bytes_up`` = bytes the uplink collectives moved to the server (``GatherStats.total_bytes``: payloads,
any padding, any size exchange). These are the tensors the collectives carry; the backend's own
framing (TCP/gloo/NCCL headers) is not included, nor is the leader's re-broadcast inside a client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fed_ddp.distributed.collectives import gather_bytes


@dataclass
class ExchangeStats:
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0  # wall time of the whole exchange on the server (includes client compute)
    parallel: bool = True  # clients ran concurrently (critical path = slowest) or one after another
    up_padding: int = 0  # of bytes_up: padding to the largest payload ("gather" with unequal sizes)
    up_sizes: int = 0  # of bytes_up: size exchange (0 when sizes are known in advance, as here)
    collectives: int = 0  # collective calls of the exchange on the server


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_bytes(buf: torch.Tensor, what: str) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"{what} must be a 1-D uint8 buffer, got {buf.dtype} {tuple(buf.shape)}")


class CollectiveTransport:
    """Broadcast + gather over ``torch.distributed`` (server = ``server_rank`` of ``group``).

    ``group`` holds the server and one leader per client. With several ranks per client, the leader
    re-broadcasts each downlink inside ``client_group`` (from global rank ``client_src``) and the
    other ranks of the client ``follow``; only leaders send uplinks.
    """

    def __init__(self, server_rank: int = 0, group=None, device: torch.device | None = None,
                 client_group=None, client_src: int | None = None, method: str = "gather"):
        self.server_rank, self.group, self.method = server_rank, group, method
        self.client_group, self.client_src = client_group, client_src
        self.device = device or torch.device("cpu")
        self.num_clients = dist.get_world_size(group) - 1

    def _sizes(self, up_nbytes: int) -> list[int]:
        server = self.server_rank if self.group is None else dist.get_group_rank(self.group, self.server_rank)
        return [0 if r == server else up_nbytes for r in range(self.num_clients + 1)]

    # -- server side --------------------------------------------------------------------------
    def exchange(self, downlink: torch.Tensor, up_nbytes: int) -> tuple[list[torch.Tensor], ExchangeStats]:
        _check_bytes(downlink, "downlink")
        t0 = time.perf_counter()
        down = downlink.to(self.device)
        dist.broadcast(down, src=self.server_rank, group=self.group)
        mine = torch.empty(0, dtype=torch.uint8, device=self.device)
        got, g = gather_bytes(mine, self.server_rank, self.group, method=self.method, sizes=self._sizes(up_nbytes))
        server = self._sizes(up_nbytes).index(0)
        ups = [b.cpu() for r, b in enumerate(got) if r != server]
        stats = ExchangeStats(bytes_down=nbytes(down) * self.num_clients, bytes_up=g.total_bytes,
                              seconds=time.perf_counter() - t0, parallel=True, up_padding=g.padding_bytes,
                              up_sizes=g.size_bytes, collectives=1 + g.collectives)
        return ups, stats

    def stop(self, downlink: torch.Tensor) -> None:
        """Send the final downlink (its header says stop); clients return without answering."""
        dist.broadcast(downlink.to(self.device), src=self.server_rank, group=self.group)

    # -- client side --------------------------------------------------------------------------
    def serve(self, down_nbytes: int, up_nbytes: int,
              handler: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Receive downlinks until ``handler`` returns None (stop); send back what it returns."""
        while True:
            down = torch.empty(down_nbytes, dtype=torch.uint8, device=self.device)
            dist.broadcast(down, src=self.server_rank, group=self.group)
            if self.client_group is not None:
                dist.broadcast(down, src=self.client_src, group=self.client_group)
            up = handler(down.cpu())
            if up is None:
                return
            _check_bytes(up, "uplink")
            gather_bytes(up.to(self.device), self.server_rank, self.group, method=self.method,
                         sizes=self._sizes(up_nbytes))

    def follow(self, down_nbytes: int, handler: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """A non-leader rank of a client: take each downlink from the leader and train alongside it."""
        while True:
            down = torch.empty(down_nbytes, dtype=torch.uint8, device=self.device)
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

    def exchange(self, downlink: torch.Tensor, up_nbytes: int) -> tuple[list[torch.Tensor], ExchangeStats]:
        _check_bytes(downlink, "downlink")
        t0 = time.perf_counter()
        ups = [h(downlink.clone()) for h in self.handlers]
        for u in ups:
            if u is None or nbytes(u) != up_nbytes:
                raise RuntimeError(f"client sent {None if u is None else nbytes(u)} bytes, expected {up_nbytes}")
        return ups, ExchangeStats(bytes_down=nbytes(downlink) * len(ups), bytes_up=sum(nbytes(u) for u in ups),
                                  seconds=time.perf_counter() - t0, parallel=False)

    def stop(self, downlink: torch.Tensor) -> None:
        for h in self.handlers:
            h(downlink.clone())
