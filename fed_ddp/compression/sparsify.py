"""Sparsification: ``topk`` (largest magnitudes) and ``randomk`` (a seeded random subset).

Each keeps k = ceil(topk_fraction * n) values of an n-value tensor (at least 1) and sends them exactly
(the next codec of a chain may quantize them). Both are biased: error feedback (``CodecChain`` with
``error_feedback=True``, the uplink's default) carries what was dropped into the next round, so the sum
of what a client sends tracks the sum of its true deltas.

Which values were kept travels as metadata, in the cheapest of three exact forms (a function of n and
k only, so both ends agree without being told):

- indices, sorted, in the smallest integer type that holds n - 1 (uint8 / int16 offset by -32768 /
  int32 / int64): k * (1, 2, 4 or 8) bytes;
- a bitmap of n bits: ceil(n / 8) bytes, cheaper once k / n exceeds 1/8, 1/16 or 1/32;
- nothing, when k = n.

``blocktopk`` keeps whole blocks of ``topk_block`` consecutive values (the blocks of largest L2 norm), so
one index (or bitmap bit) describes a block, not a value: at 10 % and blocks of 8 the positions cost
8x less than ``topk``'s, whose bitmap alone caps its ratio at 32x.

``segtopk`` cuts a tensor into segments of ``topk_block`` values and keeps the k largest of each; which k
of the S positions were kept travels as one integer per segment, the subset's rank in the combinatorial
number system (log2 C(S, k) bits, e.g. 27 bits in an int32 for 6 of 64): 0.5 bit per value instead of
the bitmap's 1.

``randomk`` sends an 8-byte seed instead: the receiver regenerates the same indices (CPU ``randperm``,
same torch version at both ends).
"""

from __future__ import annotations

import math

import torch

from fed_ddp.compression.base import TRANSFORM, Codec, PieceState, mix_seed, pad_rows, unpad
from fed_ddp.compression.payload import Payload
from fed_ddp.compression.registry import register
from fed_ddp.errors import ConfigError

_BITS = torch.arange(8, dtype=torch.uint8)


def num_kept(n: int, fraction: float) -> int:
    """k = ceil(fraction * n), at least 1 and at most n (rounded first so 0.1 * 1280 is exactly 128)."""
    return min(n, max(1, math.ceil(round(fraction * n, 6))))


def index_format(n: int, k: int) -> tuple[str, int]:
    """(format, bytes) of the cheapest exact description of k sorted indices in [0, n)."""
    if k >= n:
        return "all", 0
    width, name = next((w, f) for bound, w, f in ((2**8, 1, "uint8"), (2**16, 2, "int16"), (2**31, 4, "int32"),
                                                  (2**63, 8, "int64")) if n <= bound)
    bitmap = math.ceil(n / 8)
    return ("bitmap", bitmap) if bitmap < k * width else (name, k * width)


def encode_indices(idx: torch.Tensor, n: int) -> torch.Tensor | None:
    """Sorted int64 indices -> the tensor that travels (None when all n are kept)."""
    fmt, _ = index_format(n, idx.numel())
    if fmt == "all":
        return None
    if fmt == "bitmap":
        mask = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8, device=idx.device)
        mask[idx] = 1
        return (mask.view(-1, 8) << _BITS.to(idx.device)).sum(dim=1, dtype=torch.uint8)
    if fmt == "int16":
        return (idx - 2**15).to(torch.int16)
    return idx.to(getattr(torch, fmt))


def decode_indices(t: torch.Tensor | None, n: int, k: int, device) -> torch.Tensor:
    fmt, _ = index_format(n, k)
    if fmt == "all":
        return torch.arange(n, device=device)
    if fmt == "bitmap":
        bits = (t[:, None] >> _BITS.to(t.device)) & 1
        idx = bits.reshape(-1)[:n].nonzero().reshape(-1)
    else:
        idx = t.long()
        idx = idx + 2**15 if fmt == "int16" else idx
    # a message from a peer is untrusted: k positions, each inside the tensor (negative ones would wrap)
    if idx.numel() != k or (k and (int(idx.min()) < 0 or int(idx.max()) >= n)):
        raise ValueError(f"sparse message: {idx.numel()} positions in [{int(idx.min()) if idx.numel() else 0}, "
                         f"{int(idx.max()) if idx.numel() else 0}], expected {k} in [0, {n})")
    return idx


class _Sparsifier(Codec):
    kind = TRANSFORM

    def __init__(self, fraction: float = 0.1):
        if not 0 < fraction <= 1:
            raise ConfigError("comm.topk_fraction", fraction, "must be in (0, 1]")
        self.fraction = fraction

    @classmethod
    def from_config(cls, comm) -> Codec:
        return cls(comm.topk_fraction)

    def _scatter(self, p: Payload, idx: torch.Tensor) -> torch.Tensor:
        values = p.fields["values"].float().reshape(-1)
        out = torch.zeros(math.prod(p.shape), dtype=torch.float32, device=values.device)
        out[idx.to(values.device)] = values
        return out.reshape(p.shape)


@register("topk")
class TopK(_Sparsifier):
    """The k values of largest magnitude, exactly; the others are dropped.

    Error bound: ||x - x_hat||_2^2 <= (1 - k/n) ||x||_2^2 (the dropped values are the n - k smallest), and
    every dropped value is no larger in magnitude than the smallest kept one.
    """

    def encode(self, x: torch.Tensor, state: PieceState | None = None) -> Payload:
        flat = x.float().reshape(-1)
        k = num_kept(flat.numel(), self.fraction)
        idx = flat.abs().topk(k, sorted=False).indices.sort().values
        fields = {"values": flat[idx]}
        if (enc := encode_indices(idx, flat.numel())) is not None:
            fields["indices"] = enc
        return Payload(self.name, tuple(x.shape), fields, metadata=frozenset({"indices"}))

    def decode(self, p: Payload) -> torch.Tensor:
        n = math.prod(p.shape)
        k = num_kept(n, self.fraction)
        return self._scatter(p, decode_indices(p.fields.get("indices"), n, k, p.fields["values"].device))


def random_indices(seed: int, n: int, k: int) -> torch.Tensor:
    """The k sorted indices random-k keeps for ``seed`` (CPU generator: identical on every rank)."""
    gen = torch.Generator().manual_seed(mix_seed(seed, 0))
    return torch.randperm(n, generator=gen)[:k].sort().values


@register("randomk")
class RandomK(_Sparsifier):
    """k values at indices drawn uniformly without replacement from a seeded generator; not rescaled.

    Error bound: ||x - x_hat||_2^2 = sum of the dropped x_i^2, whose expectation is (1 - k/n) ||x||_2^2;
    kept values are exact. Metadata is one int64 seed, not k indices.
    """

    def encode(self, x: torch.Tensor, state: PieceState | None = None) -> Payload:
        flat = x.float().reshape(-1)
        n = flat.numel()
        k = num_kept(n, self.fraction)
        if k == n:
            return Payload(self.name, tuple(x.shape), {"values": flat})
        seed = (state or PieceState()).seed
        idx = random_indices(seed, n, k).to(flat.device)
        return Payload(self.name, tuple(x.shape),
                       {"values": flat[idx], "seed": torch.tensor([seed], dtype=torch.int64, device=flat.device)},
                       metadata=frozenset({"seed"}))

    def decode(self, p: Payload) -> torch.Tensor:
        n = math.prod(p.shape)
        k = num_kept(n, self.fraction)
        if k == n:
            return self._scatter(p, torch.arange(n))
        return self._scatter(p, random_indices(int(p.fields["seed"].item()), n, k))


@register("blocktopk")
class BlockTopK(_Sparsifier):
    """The k = ceil(fraction * blocks) blocks of ``block`` consecutive values with the largest L2 norm, exactly.

    The flattened tensor is zero-padded to whole blocks (a kept last block sends its padding: sizes never
    depend on the data). Error bound: ||x - x_hat||_2^2 <= (1 - k/blocks) ||x||_2^2 (the dropped blocks
    are the blocks - k of smallest norm), and no dropped block has a larger norm than a kept one.
    """

    def __init__(self, fraction: float = 0.1, block: int = 8):
        super().__init__(fraction)
        if block < 1:
            raise ConfigError("comm.topk_block", block, "must be an integer >= 1")
        self.block = block

    @classmethod
    def from_config(cls, comm) -> Codec:
        return cls(comm.topk_fraction, comm.topk_block)

    def encode(self, x: torch.Tensor, state: PieceState | None = None) -> Payload:
        blocks = pad_rows(x, self.block)
        nb = blocks.shape[0]
        k = num_kept(nb, self.fraction)
        idx = blocks.norm(dim=1).topk(k, sorted=False).indices.sort().values
        fields = {"values": blocks[idx].reshape(-1)}
        if (enc := encode_indices(idx, nb)) is not None:
            fields["indices"] = enc
        return Payload(self.name, tuple(x.shape), fields, metadata=frozenset({"indices"}))

    def decode(self, p: Payload) -> torch.Tensor:
        nb = math.ceil(math.prod(p.shape) / self.block)
        values = p.fields["values"].float().reshape(-1, self.block)
        idx = decode_indices(p.fields.get("indices"), nb, num_kept(nb, self.fraction), values.device)
        out = torch.zeros(nb, self.block, dtype=torch.float32, device=values.device)
        out[idx] = values
        return unpad(out, p.shape)


def _comb_table(s: int, k: int) -> torch.Tensor:
    """C(c, i) for c in [0, s), i in [0, k], int64 (exact: C(s, k) < 2**63 is checked by the caller)."""
    return torch.tensor([[math.comb(c, i) for i in range(k + 1)] for c in range(s)], dtype=torch.int64)


@register("segtopk")
class SegmentTopK(_Sparsifier):
    """In every segment of ``segment`` consecutive values, the k = ceil(fraction * segment) of largest
    magnitude, exactly; positions as one combinadic rank per segment (int32 when C(segment, k) < 2**31).

    The flattened tensor is zero-padded to whole segments (sizes never depend on the data). Error bound,
    per segment and so overall: ||x - x_hat||_2^2 <= (1 - k/segment) ||x||_2^2.
    """

    def __init__(self, fraction: float = 0.1, segment: int = 64):
        super().__init__(fraction)
        self.segment = segment
        self.k = num_kept(segment, fraction)
        if math.comb(segment, self.k) >= 2**63:
            raise ConfigError("comm.topk_block", segment, f"segtopk: C({segment}, {self.k}) positions do not fit "
                              "64 bits; use a smaller segment")
        self.rank_dtype = torch.int32 if math.comb(segment, self.k) < 2**31 else torch.int64
        self.table = _comb_table(segment, self.k)

    @classmethod
    def from_config(cls, comm) -> Codec:
        return cls(comm.topk_fraction, comm.topk_block)

    def encode(self, x: torch.Tensor, state: PieceState | None = None) -> Payload:
        seg = pad_rows(x, self.segment)
        pos = seg.abs().topk(self.k, dim=1, sorted=False).indices.sort(dim=1).values  # (segments, k)
        fields = {"values": seg.gather(1, pos).reshape(-1)}
        if self.k < self.segment:  # rank = sum_i C(pos_i, i + 1) over the sorted positions
            table = self.table.to(pos.device)
            rank = table[pos, torch.arange(1, self.k + 1, device=pos.device)].sum(dim=1)
            fields["positions"] = rank.to(self.rank_dtype)
        return Payload(self.name, tuple(x.shape), fields, metadata=frozenset({"positions"}))

    def decode(self, p: Payload) -> torch.Tensor:
        values = p.fields["values"].float().reshape(-1, self.k)
        ns = values.shape[0]
        if self.k == self.segment:
            pos = torch.arange(self.segment, device=values.device).expand(ns, -1)
        else:  # greedy inverse: the largest c with C(c, i) <= rank, for i = k .. 1
            rank = p.fields["positions"].to(torch.int64).cpu().clone()
            if len(rank) and (int(rank.min()) < 0 or int(rank.max()) >= math.comb(self.segment, self.k)):
                raise ValueError(f"segtopk message: position rank outside [0, C({self.segment}, {self.k}))")
            cols = []
            for i in range(self.k, 0, -1):
                c = torch.searchsorted(self.table[:, i].contiguous(), rank, right=True) - 1
                rank -= self.table[c, i]
                cols.append(c)
            pos = torch.stack(cols[::-1], dim=1).to(values.device)
        out = torch.zeros(ns, self.segment, dtype=torch.float32, device=values.device)
        out.scatter_(1, pos, values)
        return unpad(out, p.shape)
