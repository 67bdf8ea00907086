"""The population of clients: who takes part in a round, who plays them, and what they keep.

A client is a record (its data shard, its state on disk), never a process. Each round the server
samples clients (``sampling``), drops the ones that fail to report (``dropouts``), and assigns the rest
to the training workers (``assign``); a worker plays its clients one after another, loading and saving
their state through a ``ClientStateStore``. Everything here is pure or file-level: no process group.
"""

from fed_ddp.population.assign import WorkerCaches, assign
from fed_ddp.population.sampling import RoundClients, available, dropouts, read_trace, sample, select_round
from fed_ddp.population.store import ClientStateStore
from fed_ddp.wireless import samplers as _cell_samplers  # noqa: F401  (best_channel and age register, as a plug-in does)

__all__ = ["ClientStateStore", "RoundClients", "WorkerCaches", "assign", "available", "dropouts", "read_trace", "sample",
           "select_round"]
