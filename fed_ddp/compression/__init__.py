"""Compressed adapter exchange: codecs (pure tensor maths, one per module), chains, byte accounting.

    from fed_ddp.compression import ChainState, CommConfig, layout_of, uplink_chain
    chain = uplink_chain(CommConfig(uplink=["topk", "int8"]), layout_of(unet))
    buf = chain.encode(delta, state).to_bytes()          # client
    delta_hat = chain.decode(chain.from_bytes(buf))      # server

No process-group code here: moving the buffers is ``fed_ddp.distributed.collectives``.
"""

from fed_ddp.compression import cast, lowrank, quantize, sparsify  # noqa: F401  (the built-in codecs register)
from fed_ddp.compression.base import ENCODER, TRANSFORM, Codec, PieceState
from fed_ddp.compression.chain import CodecChain, Message, build_chain, downlink_chain, layout_of, uplink_chain
from fed_ddp.compression.config import CommConfig
from fed_ddp.compression.payload import ByteCount, Payload
from fed_ddp.compression.registry import REGISTRY, build_codecs, register, validate_chain
from fed_ddp.compression.state import ChainState

__all__ = ["ENCODER", "REGISTRY", "TRANSFORM", "ByteCount", "ChainState", "Codec", "CodecChain", "CommConfig",
           "Message", "Payload", "PieceState", "build_chain", "build_codecs", "downlink_chain", "layout_of",
           "register", "uplink_chain", "validate_chain"]
