"""Heterogeneous LoRA ranks (``lora.client_ranks``): small devices train and send fewer LoRA components.

The global adapter has rank r (``lora.rank``); client c trains rank ``client_ranks[c % len(client_ranks)]``
(device classes in turn), r_k <= r. Its *sub-layout* keeps, of every LoRA pair, A's first r_k rows and B's
first r_k columns (tensors outside (A, B) pairs whole): ``SubLayout.take`` cuts a flat adapter vector to
it, ``SubLayout.put`` zero-pads a sub-vector back to full size. A client

- starts from the global adapter with its components >= r_k zeroed (``start``); they stay exactly zero
  while it trains, since component j reaches the output only through B[:, j]·A[j] (zero gradients,
  and AdamW's decay keeps a zero at zero);
- sends the delta of its own components only (so its bytes follow its rank), which the server expands to

      delta = put(take(global) + sub_delta) - global        (``expand``; -global on components >= r_k)

  the client's trained adapter zero-padded to rank r, minus the global: strategies see full-size deltas.
  FedAvg then averages zero-padded adapters (HetLoRA); FlexLoRA averages the clients' products B_k·A_k
  and re-factorises by SVD, so components come back ordered by singular value and a rank-r_k client's
  truncation is the best rank-r_k approximation of the global adapter.

peft's scale alpha / r is the global rank's for every client, so a zero-padded adapter computes exactly
what the client's rank-r_k one does.
"""

from __future__ import annotations

import math

import torch


def client_rank(client_ranks, client: int) -> int:
    """Client ``client``'s LoRA rank: ``client_ranks[client % len(client_ranks)]``."""
    return int(client_ranks[client % len(client_ranks)])


class SubLayout:
    """The components 0..rank-1 of every LoRA (A, B) pair of a flat adapter ``layout`` ((name, shape) list)."""

    def __init__(self, layout, rank: int):
        names = {n for n, _ in layout}
        self.rank = int(rank)
        parts, self.layout, offset = [], [], 0
        for name, shape in layout:
            n = math.prod(shape)
            pos = torch.arange(offset, offset + n).reshape(tuple(shape))
            paired_a = ".lora_A." in name and name.replace(".lora_A.", ".lora_B.") in names
            paired_b = ".lora_B." in name and name.replace(".lora_B.", ".lora_A.") in names
            if paired_a or paired_b:
                have = shape[0] if paired_a else shape[1]
                if not 1 <= self.rank <= have:
                    raise ValueError(f"client rank {self.rank}: {name} has rank {have}")
                pos = pos[:self.rank] if paired_a else pos[:, :self.rank]
            parts.append(pos.reshape(-1))
            self.layout.append((name, tuple(pos.shape)))
            offset += n
        self.index = torch.cat(parts)  # positions in the full vector, in sub-vector order
        self.full_numel = offset

    @property
    def numel(self) -> int:
        return int(self.index.numel())

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        """The sub-layout's values of a full vector."""
        return flat[self.index]

    def put(self, sub: torch.Tensor) -> torch.Tensor:
        """A sub-vector zero-padded to full size."""
        out = sub.new_zeros(self.full_numel)
        out[self.index] = sub
        return out

    def start(self, global_flat: torch.Tensor) -> torch.Tensor:
        """What the client trains from: the global adapter with components >= rank zeroed."""
        return self.put(self.take(global_flat))

    def expand(self, sub_delta: torch.Tensor, global_flat: torch.Tensor) -> torch.Tensor:
        """The full-size delta of a client's sub-delta: its own components exactly, -global on the others."""
        out = -global_flat.to(sub_delta.dtype)
        out[self.index] = sub_delta
        return out
