"""The codec interface: pure tensor maths on ONE dense fp32 tensor, no process-group code.

    payload = codec.encode(x, state)     # x: a float tensor; state: PieceState or None
    x_hat = codec.decode(payload)        # fp32, payload.shape

Two kinds (the chain rules in ``registry`` are stated in these terms):

- ``transform`` (topk, randomk, lowrank): its *payload* fields are float tensors that the next codec of
  a chain encodes in turn (top-k values, PowerSGD factors); its metadata fields travel as they are.
- ``encoder`` (fp16, bf16, int8, int4): produces what travels; nothing follows it.

Randomness (stochastic rounding, random-k) comes only from ``PieceState.generator``, which is seeded
from (chain seed, round counter, tensor index): encodings are reproducible and the state checkpoints
as two integers plus tensors.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from fed_ddp.compression.payload import Payload

TRANSFORM, ENCODER = "transform", "encoder"


def pad_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` flattened (fp32) and zero-padded to whole rows of ``width`` values: (ceil(n / width), width)."""
    flat = x.float().reshape(-1)
    rows = -(-flat.numel() // width)
    return torch.nn.functional.pad(flat, (0, rows * width - flat.numel())).view(rows, width)


def unpad(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``pad_rows``: drop the padding, restore ``shape``."""
    return rows.reshape(-1)[:math.prod(shape)].reshape(shape)


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & (2**63 - 1) for p in parts]).generate_state(1, np.uint64)[0]
               & np.uint64(2**63 - 1))


@dataclass
class PieceState:
    """What one codec may use while encoding one tensor of one message."""

    seed: int = 0  # fresh per (chain seed, step, tensor): stochastic rounding, random-k
    slot: dict = field(default_factory=dict)  # persists across rounds for this tensor (lowrank's warm start)

    def generator(self, device: torch.device | str = "cpu", stream: int = 0) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(mix_seed(self.seed, stream))

    def child(self, stream: int) -> PieceState:
        """An independent random stream for the next codec of the chain (sharing ``slot``)."""
        return PieceState(mix_seed(self.seed, 1_000 + stream), self.slot)


class Codec(ABC):
    name: ClassVar[str]
    kind: ClassVar[str]

    @classmethod
    def from_config(cls, comm) -> Codec:
        """Build from a ``CommConfig`` (each codec reads the fields it needs)."""
        return cls()

    @abstractmethod
    def encode(self, x: torch.Tensor, state: PieceState | None = None) -> Payload:
        """Encode one float tensor; the payload's leaves are exactly what travels."""

    @abstractmethod
    def decode(self, p: Payload) -> torch.Tensor:
        """Reconstruct an fp32 tensor of shape ``p.shape`` (encoded fields already decoded to tensors)."""

    def __repr__(self) -> str:
        return self.name
