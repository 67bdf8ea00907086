"""Half-precision casts: ``fp16`` and ``bf16`` (2 bytes per value, no metadata).

A cast is linear up to rounding, so a cast-only chain keeps the sum-of-updates path open (the server
may reduce half-precision buffers instead of gathering them; see ``CodecChain.dense_dtype``).
"""

from __future__ import annotations

import torch

from fed_ddp.compression.base import ENCODER, Codec, PieceState
from fed_ddp.compression.payload import Payload
from fed_ddp.compression.registry import register

FP16_MAX = 65504.0


class _Cast(Codec):
    kind = ENCODER
    dtype: torch.dtype

    def encode(self, x: torch.Tensor, state: PieceState | None = None) -> Payload:
        return Payload(self.name, tuple(x.shape), {"values": self._cast(x.float())})

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def decode(self, p: Payload) -> torch.Tensor:
        return p.fields["values"].float().reshape(p.shape)


@register("fp16")
class Fp16(_Cast):
    """IEEE half: round to nearest even, 10 stored mantissa bits.

    Error bound: |x - x_hat| <= 2**-11 * |x| for 2**-14 <= |x| <= 65504 (normal range), and
    <= 2**-25 below it (subnormal spacing 2**-24). Values beyond +-65504 saturate to +-65504 instead of
    becoming inf (an adapter delta that large has diverged anyway; NaN stays NaN).
    """

    dtype = torch.float16

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


@register("bf16")
class Bf16(_Cast):
    """bfloat16: fp32's exponent range, 7 stored mantissa bits, round to nearest even.

    Error bound: |x - x_hat| <= 2**-8 * |x| for every finite fp32 x in bf16's normal range (|x| >= 2**-126).
    """

    dtype = torch.bfloat16
