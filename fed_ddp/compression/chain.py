"""A codec chain applied tensor by tensor to a flat adapter vector, with error feedback and byte counts.

The flat vector is the concatenation of the trained parameters (LoRA's, or the whole UNet's with
``train.method=full``) in ``layout`` order (``layout_of(unet)``, the order of ``fed_ddp.diffusion.lora.get_flat``).
Each tensor is encoded on its own, so low-rank sees real matrices, top-k indices fit in 1-2 bytes, and scales
never straddle two matrices::

    chain = uplink_chain(comm, layout_of(unet))          # [topk, int8], error feedback on
    state = ChainState(seed=...)                          # the client's, checkpointable
    msg = chain.encode(delta, state)                      # msg.bytes.payload / .metadata, msg.nbytes
    buf = msg.to_bytes()                                  # one uint8 buffer, len(buf) == msg.nbytes
    delta_hat = chain.decode(chain.from_bytes(buf))       # on the server: fp32, same layout

Tensors with fewer than ``min_numel`` values travel untouched (dense fp32). Every size is a function of
the layout and the config only, never of the data (``skeleton``), so the server cuts a buffer without
any header and ``wire_bytes`` is exact before anything is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from fed_ddp.compression.base import ENCODER, TRANSFORM, Codec, PieceState, mix_seed
from fed_ddp.compression.payload import ByteCount, Payload, from_bytes, to_bytes
from fed_ddp.compression.registry import build_codecs
from fed_ddp.compression.state import ChainState
from fed_ddp.lora_names import trainable_named

RAW = "raw"
Layout = list[tuple[str, tuple[int, ...]]]


def layout_of(module: torch.nn.Module) -> Layout:
    """(name, shape) of the trained parameters (LoRA's, or the whole UNet's under ``train.method=full``), in
    flat-vector order (``lora_names.trainable_named``, as ``lora.lora_parameters``)."""
    # ZeRO-3 leaves an empty shard in p.shape; the full shape is ds_shape
    return [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in trainable_named(module)]


@dataclass
class Message:
    """One encoded adapter: a payload per layout tensor, in layout order."""

    pieces: list[Payload]

    @property
    def bytes(self) -> ByteCount:
        return sum((p.bytes for p in self.pieces), ByteCount())

    @property
    def nbytes(self) -> int:
        return self.bytes.total

    def to_bytes(self) -> torch.Tensor:
        return to_bytes(self.pieces)


class CodecChain:
    def __init__(self, codecs: list[Codec], layout: Layout, min_numel: int = 1024, error_feedback: bool = False):
        kinds = [c.kind for c in codecs]
        if kinds not in ([], [TRANSFORM], [ENCODER], [TRANSFORM, ENCODER]):
            raise ValueError(f"codec chain {[c.name for c in codecs]}: must be [transform] + [encoder], each optional")
        if not layout:
            raise ValueError("adapter layout is empty: no trainable LoRA parameters")
        self.codecs = list(codecs)
        self.transform = codecs[0] if codecs and codecs[0].kind == TRANSFORM else None
        self.encoder = codecs[-1] if codecs and codecs[-1].kind == ENCODER else None
        self.layout = [(n, tuple(int(d) for d in s)) for n, s in layout]
        self.sizes = [math.prod(s) for _, s in self.layout]
        self.numel = sum(self.sizes)
        self.min_numel = min_numel
        self.error_feedback = error_feedback and bool(codecs)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.codecs]

    def compresses(self, index: int) -> bool:
        """Whether tensor ``index`` goes through the codecs (else it travels untouched, fp32)."""
        return bool(self.codecs) and self.sizes[index] >= self.min_numel

    # -- sender ---------------------------------------------------------------------------------
    def encode(self, flat: torch.Tensor, state: ChainState | None = None) -> Message:
        """Encode a flat fp32 adapter vector (updates ``state``: residuals, warm starts, step)."""
        if self.error_feedback and state is None:
            raise ValueError("this chain uses error feedback: pass the sender's ChainState")
        msg = self._encode(flat, state, self.error_feedback)
        if state is not None:
            state.step += 1
        return msg

    def encode_bytes(self, flat: torch.Tensor, state: ChainState | None = None) -> torch.Tensor:
        """``encode(flat, state).to_bytes()``; an empty chain (dense fp32) copies the vector's bytes in one go
        instead of one payload per tensor (the same bytes: raw payloads are the values in layout order)."""
        if self.codecs:
            return self.encode(flat, state).to_bytes()
        if flat.numel() != self.numel:
            raise ValueError(f"adapter vector has {flat.numel()} values, the layout has {self.numel}")
        if state is not None:
            state.step += 1
        return flat.detach().float().reshape(-1).contiguous().view(torch.uint8).clone()

    def _encode(self, flat: torch.Tensor, state: ChainState | None, ef: bool) -> Message:
        if flat.numel() != self.numel:
            raise ValueError(f"adapter vector has {flat.numel()} values, the layout has {self.numel}")
        pieces = []
        for i, ((name, shape), x) in enumerate(zip(self.layout, flat.detach().float().reshape(-1).split(self.sizes))):
            if not self.compresses(i):
                pieces.append(Payload(RAW, shape, {"values": x.clone()}))
                continue
            x = x.reshape(shape)
            if ef and name in state.residual:
                x = x + state.residual[name].to(x.device)
            pst = state.piece(i, name) if state is not None else PieceState(mix_seed(0, 0, i))
            p = self._encode_piece(x, pst)
            if ef:
                state.residual[name] = x - self._decode_piece(p)
            pieces.append(p)
        return Message(pieces)

    def _encode_piece(self, x: torch.Tensor, st: PieceState) -> Payload:
        if self.transform is None:
            return self.encoder.encode(x, st)
        p = self.transform.encode(x, st)
        if self.encoder is None:
            return p
        fields = {k: v if k in p.metadata else self.encoder.encode(v, st.child(j))
                  for j, (k, v) in enumerate(p.fields.items())}
        return replace(p, fields=fields)

    # -- receiver -------------------------------------------------------------------------------
    def decode(self, msg: Message) -> torch.Tensor:
        """The flat fp32 adapter vector a message stands for."""
        if len(msg.pieces) != len(self.layout):
            raise ValueError(f"message has {len(msg.pieces)} tensors, the layout has {len(self.layout)}")
        return torch.cat([self._decode_piece(p).reshape(-1) for p in msg.pieces])

    def _decode_piece(self, p: Payload) -> torch.Tensor:
        if p.codec == RAW:
            return p.fields["values"].float().reshape(p.shape)
        if self.transform is None:
            return self.encoder.decode(p)
        fields = {k: self.encoder.decode(v) if isinstance(v, Payload) else v for k, v in p.fields.items()}
        return self.transform.decode(replace(p, fields=fields))

    def decode_bytes(self, buf: torch.Tensor) -> torch.Tensor:
        """``decode(from_bytes(buf))``; an empty chain reads the fp32 values in one copy."""
        if self.codecs:
            return self.decode(self.from_bytes(buf))
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != 4 * self.numel:
            raise ValueError(f"buffer has {buf.numel()} bytes of {buf.dtype} (shape {tuple(buf.shape)}), this chain "
                             f"and adapter layout send {4 * self.numel} uint8 bytes")
        return buf.clone().view(torch.float32)

    def from_bytes(self, buf: torch.Tensor) -> Message:
        """Cut a received buffer into the message it serializes (checks its exact size)."""
        return Message(from_bytes(buf, self.skeleton))

    # -- sizes ----------------------------------------------------------------------------------
    @cached_property
    def skeleton(self) -> list[Payload]:
        """The structure of every message of this chain: an encoding of zeros (sizes never depend on data)."""
        return self._encode(torch.zeros(self.numel), None, ef=False).pieces

    @property
    def wire_bytes(self) -> ByteCount:
        """Exact bytes of one message (payload, metadata)."""
        return Message(self.skeleton).bytes

    @property
    def dense_bytes(self) -> int:
        """Bytes of the same adapter as dense fp32 (what an empty chain sends)."""
        return self.numel * 4

    @property
    def dense_dtype(self) -> torch.dtype | None:
        """The dtype when a message is just the adapter in one dtype (no metadata): [] or a lone cast with
        every tensor cast. Such messages add up elementwise, so a reduce can replace the gather."""
        leaves = [(t.dtype, meta) for p in self.skeleton for _, t, meta in p.leaves()]
        dtypes = {d for d, _ in leaves}
        return dtypes.pop() if self.transform is None and len(dtypes) == 1 and not any(m for _, m in leaves) else None

    def describe(self) -> str:
        return " -> ".join(self.names) if self.codecs else "dense fp32"


def build_chain(names: list[str], layout: Layout, comm=None, *, key: str = "comm.uplink",
                error_feedback: bool = False) -> CodecChain:
    """A chain from codec names (validated: one-line ``ConfigError`` naming ``key``) and a ``CommConfig``."""
    from fed_ddp.compression.config import CommConfig

    comm = comm if comm is not None else CommConfig()
    names = [str(n).lower() for n in names]
    return CodecChain(build_codecs(names, comm, key), layout, comm.min_numel, error_feedback)


def uplink_chain(comm, layout: Layout) -> CodecChain:
    """Client -> server: the adapter delta, with error feedback (its state is the client's)."""
    return build_chain(comm.uplink, layout, comm, key="comm.uplink", error_feedback=True)


def downlink_chain(comm, layout: Layout) -> CodecChain:
    """Server -> clients: the global adapter itself; no error feedback (it is not a sum of deltas)."""
    return build_chain(comm.downlink, layout, comm, key="comm.downlink", error_feedback=False)
