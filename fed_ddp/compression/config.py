"""The ``comm`` config group lives in ``fed_ddp.config`` (``CommSection``, mounted as ``RunConfig.comm``);
``CommConfig`` is its name inside the compression package::

    comm:
      uplink: [topk, int8]     # client -> server: the adapter delta (error feedback on)
      downlink: [fp16]         # server -> clients: the global adapter itself
      topk_fraction: 0.05
"""

from fed_ddp.config import CommSection as CommConfig

__all__ = ["CommConfig"]
