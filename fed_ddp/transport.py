"""Moving the round's byte buffers between the server and its workers, and counting every byte moved.

Protocol of one round: the server broadcasts a small fixed-size head, then a body whose size the head
determines (``fed_ddp.protocol.Wire``), to every worker; every worker answers with one uplink buffer
holding its clients' messages, whose size both ends know from the body's assignment table. The
transport neither knows nor cares what is in the buffers.

- ``CollectiveTransport``: ``torch.distributed`` broadcasts + ``gather_bytes`` on an explicit group
  (gloo or NCCL): one native gather, or one batched isend/irecv round (``comm.gather``).
- ``InMemoryTransport``: the same protocol in one process, workers called one after another (tests,
  baselines). Its byte counts are what the collective transport would move for the same buffers with
  ``comm.gather=p2p`` (exactly the messages: no padding to the fullest worker, no size exchange).

Byte accounting, in the cluster: ``bytes_down`` = downlink bytes delivered to the workers ((head +
body) x workers); ``bytes_up`` = bytes the uplink collectives moved to the server
(``GatherStats.total_bytes``: payloads, any padding, any size exchange). These are the tensors the
collectives carry; the backend's own framing (TCP/gloo/NCCL headers) is not included, nor is a
leader's re-broadcast inside its worker group. Over-the-air bytes (per client) are the server's to count.
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

    ``group`` holds the server and one leader per worker, in worker order. With several ranks per
    worker, the leader re-broadcasts each downlink inside ``client_group`` (from global rank
    ``client_src``) and the other ranks ``follow``; only leaders send uplinks.
    """

    def __init__(self, server_rank: int = 0, group=None, device: torch.device | None = None,
                 client_group=None, client_src: int | None = None, method: str = "gather"):
        self.server_rank, self.group, self.method = server_rank, group, method
        self.client_group, self.client_src = client_group, client_src
        self.device = device or torch.device("cpu")
        self.num_workers = dist.get_world_size(group) - 1

    def _with_server(self, up_sizes: list[int]) -> list[int]:
        """Sizes by group rank: the server (group rank 0 by construction) sends nothing."""
        server = self.server_rank if self.group is None else dist.get_group_rank(self.group, self.server_rank)
        if server != 0 or len(up_sizes) != self.num_workers:
            raise ValueError(f"{len(up_sizes)} uplink sizes for {self.num_workers} workers (server group rank {server})")
        return [0, *up_sizes]

    # -- server side --------------------------------------------------------------------------
    def exchange(self, head: torch.Tensor, body: torch.Tensor, up_sizes: list[int], deadline: float | None = None
                 ) -> tuple[list[torch.Tensor], ExchangeStats]:
        """``deadline``: seconds for every worker to answer (raises ``GatherTimeout`` naming the silent ranks)."""
        _check_bytes(head, "downlink head")
        _check_bytes(body, "downlink body")
        t0 = time.perf_counter()
        h, b = head.to(self.device), body.to(self.device)
        dist.broadcast(h, src=self.server_rank, group=self.group)
        dist.broadcast(b, src=self.server_rank, group=self.group)
        mine = torch.empty(0, dtype=torch.uint8, device=self.device)
        got, g = gather_bytes(mine, self.server_rank, self.group, method=self.method,
                              sizes=self._with_server(up_sizes), deadline=deadline)
        ups = [x.cpu() for x in got[1:]]
        stats = ExchangeStats(bytes_down=(nbytes(h) + nbytes(b)) * self.num_workers, bytes_up=g.total_bytes,
                              seconds=time.perf_counter() - t0, parallel=True, up_padding=g.padding_bytes,
                              up_sizes=g.size_bytes, collectives=2 + g.collectives)
        return ups, stats

    def stop(self, head: torch.Tensor) -> None:
        """Send the final head (it says stop); workers return without answering."""
        dist.broadcast(head.to(self.device), src=self.server_rank, group=self.group)

    # -- worker side --------------------------------------------------------------------------
    def _receive(self, head_nbytes: int, body_nbytes: Callable[[torch.Tensor], int | None], src: int, group,
                 relay: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = torch.empty(head_nbytes, dtype=torch.uint8, device=self.device)
        dist.broadcast(head, src=src, group=group)
        if relay:
            dist.broadcast(head, src=self.client_src, group=self.client_group)
        size = body_nbytes(head.cpu())
        if size is None:
            return head.cpu(), None
        body = torch.empty(size, dtype=torch.uint8, device=self.device)
        dist.broadcast(body, src=src, group=group)
        if relay:
            dist.broadcast(body, src=self.client_src, group=self.client_group)
        return head.cpu(), body.cpu()

    def serve(self, head_nbytes: int, body_nbytes: Callable[[torch.Tensor], int | None],
              handler: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[int]]]) -> None:
        """A worker leader: receive (head, body) until ``body_nbytes(head)`` says stop (None); send back
        what ``handler`` returns: (this worker's uplink, every worker's uplink size)."""
        relay = self.client_group is not None
        while True:
            head, body = self._receive(head_nbytes, body_nbytes, self.server_rank, self.group, relay)
            if body is None:
                return
            up, sizes = handler(head, body)
            _check_bytes(up, "uplink")
            gather_bytes(up.to(self.device), self.server_rank, self.group, method=self.method,
                         sizes=self._with_server(sizes))

    def follow(self, head_nbytes: int, body_nbytes: Callable[[torch.Tensor], int | None],
               handler: Callable[[torch.Tensor, torch.Tensor], object]) -> None:
        """A non-leader rank of a worker: take each downlink from the leader and train alongside it."""
        while True:
            head, body = self._receive(head_nbytes, body_nbytes, self.client_src, self.client_group, False)
            if body is None:
                return
            handler(head, body)


@dataclass
class InMemoryTransport:
    """The same protocol in one process: each worker's handler is called in turn."""

    handlers: list[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[int]]]] = field(
        default_factory=list)

    @property
    def num_workers(self) -> int:
        return len(self.handlers)

    def exchange(self, head: torch.Tensor, body: torch.Tensor, up_sizes: list[int], deadline: float | None = None
                 ) -> tuple[list[torch.Tensor], ExchangeStats]:
        _check_bytes(head, "downlink head")
        _check_bytes(body, "downlink body")
        t0 = time.perf_counter()
        ups = []
        for w, h in enumerate(self.handlers):
            up, _ = h(head.clone(), body.clone())
            if nbytes(up) != up_sizes[w]:
                raise RuntimeError(f"worker {w} sent {nbytes(up)} bytes, expected {up_sizes[w]}")
            ups.append(up)
        return ups, ExchangeStats(bytes_down=(nbytes(head) + nbytes(body)) * len(ups),
                                  bytes_up=sum(up_sizes), seconds=time.perf_counter() - t0, parallel=False)

    def stop(self, head: torch.Tensor) -> None:
        pass
