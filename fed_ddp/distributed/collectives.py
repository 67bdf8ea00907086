"""Gathering variable-size byte payloads to one rank, with an exact count of the bytes moved.

    payloads, stats = gather_bytes(buf, dst=0, group=group)    # every rank of ``group`` calls it
    # on dst: payloads[r] is group rank r's buffer (its own included); elsewhere (None, None)

Two methods, each two collective calls (one when ``sizes`` are known to every rank beforehand, as they
are for a ``CodecChain``, whose message size is a function of the config and the layout):

- ``p2p`` (default): ``gather`` of one int64 size per rank to dst, then one batched isend/irecv round in
  which dst receives exactly each rank's bytes. Moves sum(sizes) + 8 (W - 1) bytes: no padding.
- ``gather``: ``all_gather`` of the sizes (every rank must know the largest), then one ``gather`` of
  buffers zero-padded to the largest. Moves (W - 1) max(sizes) + 8 W (W - 1) bytes; the padding is
  counted. One native collective for the payloads: the better choice when sizes are equal.

Bytes moved = bytes of tensors that leave one rank for another, as the collective API carries them
(each rank's size delivered to each receiver; the backend's own framing is not counted; what dst
"sends" to itself is not counted). Works on gloo (CPU tensors) and NCCL (tensors on the rank's device);
``dst`` is a global rank, as in ``torch.distributed``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

SIZE_DTYPE = torch.int64
SIZE_BYTES = 8  # one size per rank
METHODS = ("p2p", "gather")


@dataclass(frozen=True)
class GatherStats:
    payload_bytes: int  # sum of the payload sizes dst received from the other ranks
    padding_bytes: int  # bytes moved beyond the payloads ("gather": padding to the largest)
    size_bytes: int  # bytes moved to exchange the sizes (0 when sizes were given)
    collectives: int  # collective calls made (a batched isend/irecv round counts as one)

    @property
    def total_bytes(self) -> int:
        return self.payload_bytes + self.padding_bytes + self.size_bytes


def _global(group, group_rank: int) -> int:
    return group_rank if group is None or group is dist.GroupMember.WORLD else dist.get_global_rank(group, group_rank)


class GatherTimeout(RuntimeError):
    """The gather did not complete by its deadline; ``missing`` = global ranks whose bytes did not arrive
    (``p2p``; with a native ``gather`` every sender is listed: the collective cannot tell them apart)."""

    def __init__(self, missing: list[int], seconds: float):
        self.missing, self.seconds = missing, seconds
        super().__init__(f"ranks {missing} have not answered within {seconds:g} s")


def _wait_all(works, deadline: float | None, senders: list[int]) -> None:
    """Wait for ``works``; past ``deadline`` seconds, raise GatherTimeout naming the senders still pending.
    (``wait(timeout)``, not polling: gloo's p2p receives never report ``is_completed`` before a wait.)"""
    if deadline is None:
        for w in works:
            w.wait()
        return
    end = time.monotonic() + deadline
    missing = []
    for i, w in enumerate(works):
        try:
            w.wait(timeout=timedelta(seconds=max(0.001, end - time.monotonic())))
        except RuntimeError:
            missing.append(senders[i] if len(works) == len(senders) else -1)
    if missing:
        raise GatherTimeout(senders if -1 in missing else missing, deadline)


def gather_bytes(payload: torch.Tensor, dst: int, group=None, *, method: str = "p2p",
                 sizes: list[int] | None = None, deadline: float | None = None
                 ) -> tuple[list[torch.Tensor] | None, GatherStats | None]:
    """Gather each rank's 1-D uint8 ``payload`` (any size, 0 included) to global rank ``dst``.

    ``sizes``: every rank's payload size by group rank, when all ranks know them in advance (then no
    size exchange happens; a rank whose payload does not match its entry raises before sending, and
    the others wait for the process group's timeout, as with any collective a rank skips).
    ``deadline`` (seconds, dst only): raise ``GatherTimeout`` naming the ranks that have not sent by then.
    Returns (payloads by group rank, stats) on dst and (None, None) elsewhere.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {list(METHODS)}")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError(f"payload must be a 1-D uint8 tensor, got {payload.dtype} of shape {tuple(payload.shape)}")
    world, me = dist.get_world_size(group), dist.get_rank(group)
    dst_g = dst if group is None or group is dist.GroupMember.WORLD else dist.get_group_rank(group, dst)
    device = payload.device
    collectives, size_bytes = 0, 0

    if sizes is not None:
        sizes = [int(s) for s in sizes]
        if len(sizes) != world or sizes[me] != payload.numel():
            raise ValueError(f"rank {me}: payload has {payload.numel()} bytes, sizes={sizes} (world {world})")
    else:
        mine = torch.tensor([payload.numel()], dtype=SIZE_DTYPE, device=device)
        if method == "p2p":  # only dst needs the sizes
            slots = [torch.empty_like(mine) for _ in range(world)] if me == dst_g else None
            dist.gather(mine, gather_list=slots, dst=dst, group=group)
            size_bytes = SIZE_BYTES * (world - 1)
        else:  # everyone needs the largest, to pad
            slots = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(slots, mine, group=group)
            size_bytes = SIZE_BYTES * world * (world - 1)
        collectives += 1
        sizes = [int(s.item()) for s in slots] if slots is not None else None

    if method == "p2p":
        if me == dst_g:
            out = [payload if r == me else torch.empty(sizes[r], dtype=torch.uint8, device=device)
                   for r in range(world)]
            ops = [dist.P2POp(dist.irecv, out[r], _global(group, r), group) for r in range(world)
                   if r != me and sizes[r] > 0]
        else:
            out = None
            ops = [dist.P2POp(dist.isend, payload, dst, group)] if payload.numel() > 0 else []
        if ops:
            works = dist.batch_isend_irecv(ops)
            senders = [_global(group, r) for r in range(world) if r != me and sizes[r] > 0] if me == dst_g else []
            _wait_all(works, deadline if me == dst_g else None, senders)
        if me != dst_g:
            return None, None
        moved = sum(s for r, s in enumerate(sizes) if r != me)
        return out, GatherStats(moved, 0, size_bytes, collectives + int(moved > 0))

    longest = max(sizes)  # every rank knows it: all_gather, or given
    if longest > 0:
        padded = payload
        if payload.numel() < longest:
            padded = torch.zeros(longest, dtype=torch.uint8, device=device)
            padded[:payload.numel()] = payload
        slots = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)] if me == dst_g else None
        work = dist.gather(padded, gather_list=slots, dst=dst, group=group, async_op=True)
        _wait_all([work], deadline if me == dst_g else None,
                  [_global(group, r) for r in range(world) if r != dst_g])
        collectives += 1
    if me != dst_g:
        return None, None
    out = [payload if r == me else slots[r][:sizes[r]] if longest else payload.new_empty(0) for r in range(world)]
    moved = sum(s for r, s in enumerate(sizes) if r != me)
    return out, GatherStats(moved, longest * (world - 1) - moved, size_bytes, collectives)


def broadcast_text(text: str | None, src: int, group=None, device: torch.device | None = None) -> str:
    """A UTF-8 string from global rank ``src`` to every rank of ``group``: two tensor broadcasts (length,
    bytes), so nothing from a peer is ever unpickled (``broadcast_object_list`` would)."""
    device = device or torch.device("cpu")
    data = torch.tensor(list(text.encode()) if text is not None else [], dtype=torch.uint8, device=device)
    n = torch.tensor([data.numel()], dtype=SIZE_DTYPE, device=device)
    dist.broadcast(n, src=src, group=group)
    buf = data if data.numel() == int(n.item()) else torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=src, group=group)
    return bytes(buf.cpu().tolist()).decode()


def all_gather_ints(values: list[int], group=None, device: torch.device | None = None) -> list[list[int]]:
    """Every rank's list of ints (lengths may differ): int64 tensors, nothing unpickled."""
    device = device or torch.device("cpu")
    world = dist.get_world_size(group)
    n = torch.tensor([len(values)], dtype=SIZE_DTYPE, device=device)
    lens = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(lens, n, group=group)
    longest = max(int(x.item()) for x in lens)
    mine = torch.zeros(longest, dtype=torch.int64, device=device)
    mine[:len(values)] = torch.tensor(list(values), dtype=torch.int64, device=device)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    return [g[:int(k.item())].tolist() for g, k in zip(got, lens)]


TENSOR_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                             torch.int64, torch.int32, torch.uint8, torch.bool)}


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, src: int, group=None,
                      device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Named tensors from global rank ``src`` to every rank of ``group`` (CPU tensors back everywhere): a JSON
    header of names, dtypes and shapes (``broadcast_text``), checked on arrival, then one byte buffer. Nothing
    is unpickled; a header naming another dtype or a malformed shape raises ``ValueError`` on the receiver."""
    device = device or torch.device("cpu")
    me = dist.get_rank()
    if me == src:
        parts = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        head = json.dumps([[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in parts.items()])
    header = broadcast_text(head if me == src else None, src=src, group=group, device=device)
    spec = json.loads(header)
    if not isinstance(spec, list) or not all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[1] in TENSOR_DTYPES
            and isinstance(e[2], list) and all(type(d) is int and d >= 0 for d in e[2]) for e in spec) \
            or len({e[0] for e in spec}) != len(spec):
        raise ValueError(f"broadcast_tensors: malformed header from rank {src}: {header[:200]!r}")
    sizes = [math.prod(shape) * TENSOR_DTYPES[dt].itemsize for _, dt, shape in spec]
    if me == src:
        flat = torch.cat([v.reshape(-1).view(torch.uint8) for v in parts.values()]) if parts else \
            torch.empty(0, dtype=torch.uint8)
        buf = flat.to(device)
    else:
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=src, group=group)
    if me == src:
        return parts
    out, offset, host = {}, 0, buf.cpu()
    for (name, dt, shape), n in zip(spec, sizes):
        out[name] = host[offset:offset + n].clone().view(TENSOR_DTYPES[dt]).reshape(shape)
        offset += n
    return out
