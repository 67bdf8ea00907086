"""Who is who in the world: computed once from the launcher's environment; the only place with rank maths.

Rank 0 is the server. Worker w owns the R consecutive ranks 1 + w*R ... w*R + R (R =
``fed.ranks_per_client``); the first of them is its leader. A worker plays the clients the server
assigns it, one after another (clients are data, not ranks). Groups:

- ``client_group``: one worker's R ranks: data parallelism inside the client it plays (gradients, ZeRO shards);
- ``leaders_group``: the server + every leader: the federated traffic;
- DeepSpeed gets an ``mpu`` whose data-parallel group is ``client_group``, so workers never mix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.distributed as dist

from fed_ddp.errors import ConfigError


@dataclass
class Groups:
    client: object | None  # this rank's client group (None on the server, or when R == 1)
    leaders: object | None  # server + leaders (None when it is the whole world)
    single: object | None = None  # {this rank} alone (DeepSpeed's model-parallel group)
    dp: object | None = None  # DeepSpeed's data-parallel group: client group, or {this rank}


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    num_workers: int
    ranks_per_client: int = 1
    groups: Groups | None = field(default=None, compare=False)

    @classmethod
    def from_env(cls, num_workers: int, ranks_per_client: int = 1, env=os.environ) -> Topology:
        """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun, ``fed-ddp run`` or SLURM's srun)."""
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
        world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
        need = 1 + num_workers * ranks_per_client
        if world != need:
            what = f"{num_workers} workers" if ranks_per_client == 1 else \
                f"{num_workers} workers x {ranks_per_client} ranks"
            raise ConfigError("fed.workers", num_workers,
                              f"needs a world of 1 server + {what} = {need} ranks, but this launch has {world}")
        return cls(rank, world, local, num_workers, ranks_per_client)

    # -- who am I -----------------------------------------------------------------------------
    @property
    def is_server(self) -> bool:
        return self.rank == 0

    @property
    def worker_id(self) -> int | None:
        return None if self.is_server else (self.rank - 1) // self.ranks_per_client

    @property
    def rank_in_client(self) -> int:
        return 0 if self.is_server else (self.rank - 1) % self.ranks_per_client

    @property
    def is_leader(self) -> bool:
        return not self.is_server and self.rank_in_client == 0

    @property
    def role(self) -> str:
        if self.is_server:
            return "server"
        return f"worker{self.worker_id}" + (f".{self.rank_in_client}" if self.ranks_per_client > 1 else "")

    def client_ranks(self, c: int) -> list[int]:
        start = 1 + c * self.ranks_per_client
        return list(range(start, start + self.ranks_per_client))

    def leader_of(self, c: int) -> int:
        return self.client_ranks(c)[0]

    # -- groups (collective calls: every rank, same order) -----------------------------------
    def with_groups(self, deepspeed: bool = False) -> Topology:
        client = leaders = single = None
        if self.ranks_per_client > 1:
            for c in range(self.num_workers):
                g = dist.new_group(self.client_ranks(c))
                if c == self.worker_id:
                    client = g
            leaders = dist.new_group([0] + [self.leader_of(c) for c in range(self.num_workers)])
        if deepspeed:
            for r in range(self.world_size):
                g = dist.new_group([r])
                if r == self.rank:
                    single = g
        return Topology(self.rank, self.world_size, self.local_rank, self.num_workers, self.ranks_per_client,
                        Groups(client, leaders, single, client or single))

    def deepspeed_mpu(self) -> ClientMPU:
        return ClientMPU(self.groups.dp, self.groups.single)


class ClientMPU:
    """The Megatron-style "mpu" DeepSpeed asks for: data parallel = one client's ranks, no model parallel."""

    def __init__(self, dp_group, mp_group):
        self.dp, self.mp = dp_group, mp_group

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.dp)

    def get_data_parallel_rank(self):
        return dist.get_rank(self.dp)

    def get_model_parallel_group(self):
        return self.mp

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0
