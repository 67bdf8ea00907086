"""Block quantization with absmax scales: ``int8`` (1 byte per value) and ``int4`` (two values per byte).

The flattened tensor is cut into consecutive blocks of ``block_size`` values (the last block may be
shorter; no padding travels). Each block b has one fp32 scale s_b = max|x in b| / qmax (qmax = 127 for
int8, 7 for int4: symmetric, so zero is exact and -128/-8 are never used) and every value becomes the
integer q = round(x / s_b) in [-qmax, qmax]; decode is q * s_b.

Rounding is either to nearest (deterministic) or stochastic: q = floor(x / s_b + u), u ~ U[0, 1) from
the piece's seeded generator, so E[q * s_b] = x (unbiased: the sum of many clients' quantized deltas
has no systematic drift, and no error feedback is needed for it).

Bytes per tensor of n values: codes n (int8) or ceil(n / 2) (int4), payload; scales 4 * ceil(n / B),
metadata.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from fed_ddp.compression.base import ENCODER, Codec, PieceState, pad_rows, unpad
from fed_ddp.compression.payload import Payload
from fed_ddp.compression.registry import register
from fed_ddp.errors import ConfigError


class _BlockQuantizer(Codec):
    kind = ENCODER
    qmax: int

    def __init__(self, block_size: int = 64, stochastic: bool = False):
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError("comm.block_size", block_size, "must be an integer >= 1")
        self.block_size, self.stochastic = block_size, stochastic

    @classmethod
    def from_config(cls, comm) -> Codec:
        return cls(comm.block_size, comm.stochastic_rounding)

    def encode(self, x: torch.Tensor, state: PieceState | None = None) -> Payload:
        blocks = pad_rows(x, self.block_size)  # zero padding changes no absmax and is never sent
        scales = blocks.abs().amax(dim=1) / self.qmax
        y = blocks / torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
        if self.stochastic:
            gen = (state or PieceState()).generator(x.device)
            q = torch.floor(y + torch.rand(y.shape, generator=gen, device=y.device))
        else:
            q = torch.round(y)
        q = q.clamp_(-self.qmax, self.qmax).reshape(-1)[:x.numel()]
        return Payload(self.name, tuple(x.shape), {"codes": self._pack(q), "scales": scales},
                       metadata=frozenset({"scales"}))

    def decode(self, p: Payload) -> torch.Tensor:
        q = pad_rows(self._unpack(p.fields["codes"], math.prod(p.shape)), self.block_size)
        return unpad(q * p.fields["scales"][:, None], p.shape)

    @abstractmethod
    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        """Integer-valued float codes in [-qmax, qmax] -> the tensor that travels."""

    @abstractmethod
    def _unpack(self, codes: torch.Tensor, n: int) -> torch.Tensor:
        """The travelled tensor -> n float codes."""


@register("int8")
class Int8(_BlockQuantizer):
    """int8 codes, one fp32 absmax scale per block.

    Error bound, per value x in block b with absmax a_b: round-to-nearest |x - x_hat| <= a_b / 254;
    stochastic |x - x_hat| < a_b / 127 and E[x_hat] = x (plus fp32 rounding of q * s_b, <= 2**-24 |x|).
    """

    qmax = 127

    def _pack(self, q):
        return q.to(torch.int8)

    def _unpack(self, codes, n):
        return codes.float()


@register("int4")
class Int4(_BlockQuantizer):
    """4-bit codes q + 8 in [1, 15], two per byte (even index in the low nibble), one fp32 scale per block.

    Error bound, per value x in block b with absmax a_b: round-to-nearest |x - x_hat| <= a_b / 14;
    stochastic |x - x_hat| < a_b / 7 and E[x_hat] = x (plus fp32 rounding of q * s_b).
    """

    qmax = 7

    def __init__(self, block_size: int = 64, stochastic: bool = False):
        super().__init__(block_size, stochastic)
        if block_size % 2:
            raise ConfigError("comm.block_size", block_size, "must be even with int4: 2 must divide it "
                              "(two 4-bit codes per byte, so every block starts on a byte boundary)")

    def _pack(self, q):
        c = (q + 8).to(torch.uint8)
        if c.numel() % 2:
            c = torch.cat([c, c.new_full((1,), 8)])  # a zero code fills the last byte
        return c[0::2] | (c[1::2] << 4)

    def _unpack(self, codes, n):
        both = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)[:n]
        return both.float() - 8
