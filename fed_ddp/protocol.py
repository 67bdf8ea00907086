"""What one round puts on the wire: two flat uint8 buffers, shared by server and clients.

    downlink = [stop, round, local_steps, lr, proximal_mu] (fp32)  + downlink-chain message (global adapter)
    uplink   = uplink-chain message (adapter delta)  + [num_examples, train_loss, train_seconds, client_seconds] (fp32)

The messages are ``fed_ddp.compression`` codec chains (``comm.uplink`` / ``comm.downlink``; an empty
chain is dense fp32). Every size is a function of the config and the adapter layout only, never of the
data, so both ends know each buffer's exact length before anything moves and no size travels.
Counts travel as fp32, exact up to 2**24 (16.7 M examples per client).

Accounting (``Wire.up_bytes`` / ``down_bytes``): payload = the codec's values; metadata = the codec's
scales, indices and seeds plus the protocol's fp32 fields.
"""

from __future__ import annotations

import torch

from fed_ddp.compression import ByteCount, ChainState, CodecChain, downlink_chain, uplink_chain
from fed_ddp.strategies import ClientUpdate, RoundPlan

DOWN_HEADER = 5
UP_FIELDS = ("num_examples", "train_loss", "train_seconds", "client_seconds")
DOWN_HEADER_BYTES = 4 * DOWN_HEADER
UP_TAIL_BYTES = 4 * len(UP_FIELDS)


def _f32_bytes(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(torch.uint8)


def _f32(buf: torch.Tensor) -> list[float]:
    return buf.clone().view(torch.float32).tolist()


def client_codec_state(run_seed: int, client_id: int) -> ChainState:
    """A client's uplink codec state (error feedback, warm starts), with random streams of its own."""
    return ChainState(seed=run_seed * 1_000_003 + client_id)


class Wire:
    """Packs and unpacks the round's buffers with the configured codec chains.

    ``layout`` is the adapter's (name, shape) list in flat-vector order (``compression.layout_of``).
    """

    def __init__(self, comm, layout):
        self.up: CodecChain = uplink_chain(comm, layout)
        self.down: CodecChain = downlink_chain(comm, layout)
        self.num_params = self.up.numel
        self.up_bytes = self.up.wire_bytes + ByteCount(0, UP_TAIL_BYTES)  # one client's uplink
        self.down_bytes = self.down.wire_bytes + ByteCount(0, DOWN_HEADER_BYTES)  # one client's downlink
        self.up_nbytes, self.down_nbytes = self.up_bytes.total, self.down_bytes.total

    # -- server -> clients ------------------------------------------------------------------------
    def pack_downlink(self, plan: RoundPlan, global_flat: torch.Tensor, state: ChainState | None = None,
                      stop: bool = False) -> torch.Tensor:
        head = _f32_bytes([float(stop), plan.round, plan.local_steps, plan.lr, plan.proximal_mu])
        msg = self.down.encode(global_flat.detach().float().cpu(), state).to_bytes()
        return torch.cat([head, msg])

    def unpack_downlink(self, buf: torch.Tensor) -> tuple[bool, RoundPlan, torch.Tensor]:
        """(stop, plan, the global adapter as the clients see it: decoded, fp32)."""
        self._check(buf, self.down_nbytes, "downlink")
        stop, rnd, steps, lr, mu = _f32(buf[:DOWN_HEADER_BYTES])
        flat = self.down.decode(self.down.from_bytes(buf[DOWN_HEADER_BYTES:]))
        return bool(stop), RoundPlan(int(rnd), int(steps), float(lr), float(mu)), flat

    # -- clients -> server ------------------------------------------------------------------------
    def pack_uplink(self, delta: torch.Tensor, state: ChainState | None, num_examples: int,
                    metrics: dict[str, float]) -> torch.Tensor:
        """Encode ``delta`` (updating the client's error-feedback ``state``) and append the fp32 fields."""
        msg = self.up.encode(delta.detach().float().cpu(), state).to_bytes()
        return torch.cat([msg, _f32_bytes([num_examples] + [metrics[k] for k in UP_FIELDS[1:]])])

    def unpack_uplink(self, buf: torch.Tensor, client_id: int) -> ClientUpdate:
        self._check(buf, self.up_nbytes, "uplink")
        fields = dict(zip(UP_FIELDS, _f32(buf[-UP_TAIL_BYTES:])))
        delta = self.up.decode(self.up.from_bytes(buf[:-UP_TAIL_BYTES]))
        return ClientUpdate(client_id, delta, round(fields.pop("num_examples")), fields)

    @staticmethod
    def _check(buf: torch.Tensor, want: int, what: str) -> None:
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != want:
            raise ValueError(f"{what} buffer: expected {want} uint8 bytes, got {buf.dtype} {tuple(buf.shape)}")
