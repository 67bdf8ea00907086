"""A codec from a user's file: 1-bit signs with one scale per block (scaled signSGD; the uplink's error feedback
carries what the signs lose to the next round).

    fed-ddp run configs/quickstart.yaml run.plugins=[examples/sign_codec.py] comm.uplink=[sign] comm.min_numel=0

Each block of ``comm.block_size`` consecutive values (the last may be shorter) travels as its signs, 8 per byte,
and one fp32 scale, the block's mean |x|: decode gives +scale where x >= 0 and -scale elsewhere (the mean |x|
is the scale that minimises the block's squared error). A tensor of n values sends ceil(n / 8) bytes of payload
and 4 * ceil(n / block_size) of metadata: what the run reports is the size of the tensors below, nothing else.
An encoder (the last codec of a chain: ``[sign]``, ``[topk, sign]``); secure aggregation refuses it.
"""

import math

import torch

from fed_ddp.compression import ENCODER, Codec, Payload, register
from fed_ddp.compression.base import pad_rows, unpad

BIT = torch.arange(8)  # bit i of a byte holds value i of its group of 8 (little-endian, as numpy's bitorder="little")


@register("sign")
class Sign(Codec):
    kind = ENCODER

    def __init__(self, block_size: int = 64):
        self.block_size = block_size

    @classmethod
    def from_config(cls, comm) -> Codec:
        return cls(comm.block_size)

    def encode(self, x, state=None):
        n = x.numel()
        blocks = pad_rows(x, self.block_size)  # the zero padding adds nothing to a block's sum and is never sent
        counts = torch.full((blocks.shape[0],), float(self.block_size), device=x.device)
        counts[-1] = n - (blocks.shape[0] - 1) * self.block_size  # the last block's own values
        scales = blocks.abs().sum(dim=1) / counts
        bits = (x.float().reshape(-1) >= 0).to(torch.int32)
        bits = torch.nn.functional.pad(bits, (0, -n % 8)).view(-1, 8)
        signs = (bits << BIT.to(x.device)).sum(dim=1).to(torch.uint8)
        return Payload(self.name, tuple(x.shape), {"signs": signs, "scales": scales}, metadata=frozenset({"scales"}))

    def decode(self, p):
        signs = p.fields["signs"]
        bits = (signs.to(torch.int32)[:, None] >> BIT.to(signs.device)) & 1
        values = (2.0 * bits.reshape(-1).float() - 1.0)[:math.prod(p.shape)]  # +1 / -1, the padding bits dropped
        return unpad(pad_rows(values, self.block_size) * p.fields["scales"][:, None], p.shape)
