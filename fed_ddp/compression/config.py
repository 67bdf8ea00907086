"""The ``comm`` config group (``CommSection``, mounted as ``RunConfig.comm``), owned by the compression
package; ``CommConfig`` is its name here::

    comm:
      uplink: [topk, int8]     # client -> server: the adapter delta (error feedback on)
      downlink: [fp16]         # server -> clients: the global adapter itself
      topk_fraction: 0.05
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fed_ddp.errors import ConfigError
from fed_ddp.errors import check as _check
from fed_ddp.errors import one_of as _one_of
from fed_ddp.errors import positive as _positive


@dataclass(kw_only=True)
class CommSection:
    """How adapters travel: a codec chain per direction (``fed_ddp.compression``) and its knobs.

    A chain is ``[transform] + [encoder]``, each optional: at most one of topk/blocktopk/segtopk/randomk/lowrank, first;
    at most one of fp16/bf16/int8/int4, last; ``[]`` sends dense fp32. The downlink carries the global
    adapter itself, not a delta, so it takes casts and quantizers only.
    """

    uplink: list[str] = field(default_factory=list)  # client->server codec chain, e.g. [topk, int8]; [] = dense fp32
    downlink: list[str] = field(default_factory=list)  # server->client codec chain: casts/quantizers; [] = dense fp32
    block_size: int = 64  # int8/int4: values per absmax scale (the last block of a tensor may be shorter)
    topk_fraction: float = 0.1  # topk/randomk: share of each tensor's values sent (blocktopk: of its blocks), in (0, 1]
    topk_block: int = 8  # blocktopk: values per block (one index per block); segtopk: values per segment
    stochastic_rounding: bool = False  # int8/int4: unbiased stochastic rounding instead of round-to-nearest
    lowrank_rank: int = 4  # lowrank: rank of the PowerSGD factors P (n x r) and Q (m x r)
    min_numel: int = 1024  # tensors with fewer values travel uncompressed (dense fp32)
    gather: str = "gather"  # uplink collective: gather (one native gather) / p2p (batched isend/irecv)

    def __post_init__(self):
        from fed_ddp.compression.registry import TRANSFORM, validate_chain

        for key in ("uplink", "downlink"):
            names = getattr(self, key)
            if isinstance(names, str):  # a plain string given in Python (the command line needs [topk])
                names = [names]
            names = [str(n).lower() for n in names]
            setattr(self, key, names)
            kinds = validate_chain(names, f"comm.{key}")
            if key == "downlink" and TRANSFORM in kinds:
                raise ConfigError("comm.downlink", names, "the downlink carries the global adapter, not a delta: "
                                  "only casts and quantizers (fp16, bf16, int8, int4) are allowed")
        _check(isinstance(self.block_size, int) and not isinstance(self.block_size, bool) and self.block_size >= 1,
               "comm.block_size", self.block_size, "must be an integer >= 1")
        _check("int4" not in self.uplink + self.downlink or self.block_size % 2 == 0, "comm.block_size",
               self.block_size, "must be even with int4: 2 must divide it (two 4-bit codes per byte, so every "
               "block starts on a byte boundary)")
        _check(0 < self.topk_fraction <= 1, "comm.topk_fraction", self.topk_fraction, "must be in (0, 1]")
        _check(self.topk_block >= 1, "comm.topk_block", self.topk_block, "must be an integer >= 1")
        _check(self.lowrank_rank >= 1, "comm.lowrank_rank", self.lowrank_rank, "must be an integer >= 1")
        _positive("comm.min_numel", self.min_numel, zero_ok=True)
        _one_of("comm.gather", self.gather, {"gather", "p2p"})


CommConfig = CommSection

__all__ = ["CommConfig", "CommSection"]
