"""The ``comm`` config group: which codec chain each direction uses and the codecs' hyper-parameters.

To be mounted on ``RunConfig`` as ``comm: CommConfig``; until then ``fed_ddp.plan.load_run_and_comm``
pops a ``comm:`` section (and ``comm.*`` overrides) before the rest goes to ``load_config``::

    comm:
      uplink: [topk, int8]     # client -> server: the adapter delta (error feedback on)
      downlink: [fp16]         # server -> clients: the global adapter itself
      topk_fraction: 0.05

Chain rules (``fed_ddp.compression.registry``): at most one of topk/randomk/lowrank, first; at most one
of fp16/bf16/int8/int4, last; an empty list sends dense fp32. The downlink carries the global adapter,
not a delta, so it takes casts and quantizers only (a top-k of the weights themselves would zero 90 %
of the adapter in every client's copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fed_ddp.config import ConfigError


@dataclass(kw_only=True)
class CommConfig:
    uplink: list[str] = field(default_factory=list)  # client->server codec chain, e.g. [topk, int8]; [] = dense fp32
    downlink: list[str] = field(default_factory=list)  # server->client codec chain: casts/quantizers; [] = dense fp32
    block_size: int = 64  # int8/int4: values per absmax scale (the last block of a tensor may be shorter)
    topk_fraction: float = 0.1  # topk/randomk: share of each tensor's values sent, in (0, 1]
    stochastic_rounding: bool = False  # int8/int4: unbiased stochastic rounding instead of round-to-nearest
    lowrank_rank: int = 4  # lowrank: rank of the PowerSGD factors P (n x r) and Q (m x r)
    min_numel: int = 1024  # tensors with fewer values travel uncompressed (dense fp32)

    def __post_init__(self):
        from fed_ddp.compression.registry import TRANSFORM, validate_chain

        for key in ("uplink", "downlink"):
            names = getattr(self, key)
            if isinstance(names, str):  # comm.uplink=topk on the command line
                names = [names]
            names = [str(n).lower() for n in names]
            setattr(self, key, names)
            kinds = validate_chain(names, f"comm.{key}")
            if key == "downlink" and TRANSFORM in kinds:
                raise ConfigError("comm.downlink", names, "the downlink carries the global adapter, not a delta: "
                                  "only casts and quantizers (fp16, bf16, int8, int4) are allowed")
        _int = isinstance(self.block_size, int) and not isinstance(self.block_size, bool)
        if not _int or self.block_size < 1:
            raise ConfigError("comm.block_size", self.block_size, "must be an integer >= 1")
        if "int4" in self.uplink + self.downlink and self.block_size % 2:
            raise ConfigError("comm.block_size", self.block_size, "must be even with int4: 2 must divide it "
                              "(two 4-bit codes per byte, so every block starts on a byte boundary)")
        if not 0 < self.topk_fraction <= 1:
            raise ConfigError("comm.topk_fraction", self.topk_fraction, "must be in (0, 1]")
        if self.lowrank_rank < 1:
            raise ConfigError("comm.lowrank_rank", self.lowrank_rank, "must be an integer >= 1")
        if self.min_numel < 0:
            raise ConfigError("comm.min_numel", self.min_numel, "must be >= 0")
