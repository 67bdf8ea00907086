"""What a codec sends for one tensor, how it is counted and how it becomes one flat byte buffer.

A ``Payload`` holds exactly the tensors that travel (its leaves), each marked payload or metadata:

- payload: the values themselves (fp16 values, int8/int4 codes, top-k values, PowerSGD factors);
- metadata: what is needed to interpret them (block scales, indices or bitmaps, a random-k seed).

Shapes, dtypes, k, block counts and the layout of the adapter are *not* sent: they follow from the
config and the tensor shapes, which both ends know (every size is data-independent, see
``CodecChain.skeleton``). A field may itself be a ``Payload``: the next codec of a chain encoded it
(``topk`` values quantized by ``int8``). Serialization concatenates the raw bytes of the leaves in
order, so ``len(to_bytes(...)) == nbytes`` by construction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ByteCount:
    """Bytes of a message, split into payload and metadata."""

    payload: int = 0
    metadata: int = 0

    @property
    def total(self) -> int:
        return self.payload + self.metadata

    def __add__(self, other: ByteCount) -> ByteCount:
        return ByteCount(self.payload + other.payload, self.metadata + other.metadata)

    def __mul__(self, n: int) -> ByteCount:
        return ByteCount(self.payload * n, self.metadata * n)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Payload:
    """The encoding of one tensor by one codec."""

    codec: str  # registry name of the codec that made it ("raw" for an untouched tensor)
    shape: tuple[int, ...]  # shape of the tensor it decodes to (known to both ends, not sent)
    fields: dict[str, torch.Tensor | Payload]  # what travels, in this order
    metadata: frozenset[str] = field(default_factory=frozenset)  # names of fields that are metadata

    def __post_init__(self):
        # row-major everywhere: the sender decodes (error feedback) exactly what the receiver will decode
        self.fields = {k: v if isinstance(v, Payload) else v.contiguous() for k, v in self.fields.items()}

    def leaves(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor, bool]]:
        """(dotted name, tensor, is_metadata) of every tensor that travels, in wire order."""
        for name, v in self.fields.items():
            if isinstance(v, Payload):
                yield from v.leaves(f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", v, name in self.metadata

    @property
    def bytes(self) -> ByteCount:
        pay = meta = 0
        for _, t, is_meta in self.leaves():
            if is_meta:
                meta += tensor_bytes(t)
            else:
                pay += tensor_bytes(t)
        return ByteCount(pay, meta)

    @property
    def nbytes(self) -> int:
        return self.bytes.total


def to_bytes(payloads: list[Payload]) -> torch.Tensor:
    """All leaves of ``payloads`` as one flat uint8 buffer (on the leaves' device)."""
    parts = [t.contiguous().reshape(-1).view(torch.uint8) for p in payloads for _, t, _ in p.leaves()]
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts)


def from_bytes(buf: torch.Tensor, skeleton: list[Payload]) -> list[Payload]:
    """Cut ``buf`` into payloads shaped like ``skeleton`` (same structure, dtypes and sizes)."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"expected a 1-D uint8 buffer, got {buf.dtype} of shape {tuple(buf.shape)}")
    expected = sum(p.nbytes for p in skeleton)
    if buf.numel() != expected:
        raise ValueError(f"buffer has {buf.numel()} bytes, this chain and adapter layout send {expected}")
    offset = 0
    whole = buf.clone()  # one copy: the payloads never alias the caller's buffer

    def fill(p: Payload) -> Payload:
        nonlocal offset
        out = {}
        for name, v in p.fields.items():
            if isinstance(v, Payload):
                out[name] = fill(v)
            else:
                n = tensor_bytes(v)
                piece = whole[offset:offset + n]
                if offset % v.element_size():  # a slice at an odd offset cannot be viewed as a wider dtype
                    piece = piece.clone()
                out[name] = piece.view(v.dtype).reshape(v.shape)
                offset += n
        return Payload(p.codec, p.shape, out, p.metadata)

    return [fill(p) for p in skeleton]
