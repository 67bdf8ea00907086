"""The server: its round loop as stages (``loop``), each stage a module of its own.

- ``loop``: ``Server`` (run, one round as a handful of stage calls, the resume state in one bundle) and
  ``run_server`` (the run directory, tracking, the loop).
- ``exchange``: the transport under the round's deadline, and the uplinks decoded (untrusted).
- ``admit``: screening, or clipping and noise under privacy (secure aggregation's sum included).
- ``records``: the metrics row, bytes two ways never mixed, the time split, the summary's totals.
"""

from fed_ddp.server.loop import Server, run_server

__all__ = ["Server", "run_server"]
