"""Who is who in the world: computed once from the launcher's environment; the only place with rank maths.

Rank 0 is the server; ranks 1..N are clients (client id = rank - 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fed_ddp.config import ConfigError


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    num_clients: int

    @classmethod
    def from_env(cls, num_clients: int, env=os.environ) -> "Topology":
        """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun, ``fed-ddp run`` or SLURM's srun)."""
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
        world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
        if world != 1 + num_clients:
            raise ConfigError("fed.num_clients", num_clients,
                              f"needs a world of 1 server + {num_clients} clients = {1 + num_clients} ranks, "
                              f"but this launch has {world}")
        return cls(rank, world, local, num_clients)

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    @property
    def client_id(self) -> int | None:
        return None if self.is_server else self.rank - 1

    @property
    def role(self) -> str:
        return "server" if self.is_server else f"client{self.client_id}"
