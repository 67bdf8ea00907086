"""How many ranks each node of a multi-node launch runs: the server and the client ranks spread over the nodes.

    python -m fed_ddp.distributed.nodes --nnodes 2 CONFIG [key=value ...]                -> "2 1"  (all nodes)
    python -m fed_ddp.distributed.nodes --nnodes 2 --node-rank 1 CONFIG [key=value ...]  -> "1"    (this node)

Used by ``launch/*.sh`` and ``slurm/*.sbatch`` before they start ``torchrun``: the config decides the
world size (1 + fed.workers x fed.ranks_per_client), so the scripts never ask for nproc-per-node. torchrun's
agents may each run a different number of workers; global ranks are handed out agent by agent. Errors
(a bad config, more nodes than ranks, more ranks than GPUs on a node) are one ``fed-ddp:`` line and
exit code 2, before anything is launched. An info line on stderr says what will be launched.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fed_ddp.config import ConfigError, load_config, split_args


def procs_per_node(world_size: int, nnodes: int) -> list[int]:
    """``world_size`` ranks over ``nnodes`` nodes, as even as possible, the first nodes taking the extra."""
    if nnodes < 1:
        raise ConfigError("--nnodes", nnodes, "must be >= 1")
    if nnodes > world_size:
        raise ConfigError("--nnodes", nnodes, f"a world of {world_size} ranks cannot fill {nnodes} nodes; "
                                              f"use at most {world_size} nodes or raise fed.workers")
    base, extra = divmod(world_size, nnodes)
    return [base + (1 if i < extra else 0) for i in range(nnodes)]


def describe(cfg) -> str:
    per = getattr(cfg.fed, "ranks_per_client", 1)
    f = cfg.fed
    return (f"{cfg.world_size} ranks (1 server + {f.num_workers} workers{f' x {per} ranks' if per > 1 else ''}) "
            f"for {f.num_clients} clients")


def local_gpus() -> int:
    """CUDA devices this process may use (honours CUDA_VISIBLE_DEVICES); 0 without an NVIDIA driver."""
    if not Path("/proc/driver/nvidia/gpus").is_dir() or os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return 0  # no driver: skip importing torch (seconds per launch on small machines)
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU ranks
        return 0


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what a container or ``taskset`` allows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers(cfg, gpus: int | None = None, cores: int | None = None) -> int | None:
    """``fed.workers`` for a one-node CPU launch that left it null: no more single-thread worker ranks than the
    machine has cores (``cores // (train.num_threads x fed.ranks_per_client)``, at least 1), since more
    oversubscribe them: the quickstart's round on 2 cores took 1.19x its compute floor with 4 workers and 0.96x
    with 2 (benchmarks/results/round_floor.md). None when nothing changes (workers set, GPUs, or enough cores);
    the server rank is not counted: it waits while the workers train."""
    f = cfg.fed
    if f.workers is not None or (cfg.train.device == "auto" and (local_gpus() if gpus is None else gpus)):
        return None
    fit = max(1, (cores or cpu_cores()) // (cfg.train.num_threads * f.ranks_per_client))
    return fit if fit < f.num_workers else None


def plan(config, overrides: list[str], nnodes: int, gpus: int | None = None) -> tuple[list[int], str]:
    """Per-node rank counts and a one-line description; raises ConfigError for launches that cannot work.
    ``config``: a YAML path or a list of them (merged in order), as ``load_config`` takes."""
    return plan_cfg(load_config(config, overrides), nnodes, gpus)


def plan_cfg(cfg, nnodes: int, gpus: int | None = None) -> tuple[list[int], str]:
    """``plan`` for a loaded config (``fed-ddp run`` checks its one-node launch with it)."""
    try:
        counts = procs_per_node(cfg.world_size, nnodes)
    except ConfigError as e:
        raise ConfigError(e.key, e.value, e.allowed.replace(f"{cfg.world_size} ranks", describe(cfg), 1)) from None
    if cfg.train.device == "auto":
        gpus = local_gpus() if gpus is None else gpus
        if gpus and max(counts) > gpus:  # NCCL refuses two ranks of one communicator on one GPU
            raise ConfigError("fed.workers", cfg.fed.num_workers,
                              f"{max(counts)} ranks on a node with {gpus} GPU(s): NCCL needs one GPU per rank; "
                              f"use more nodes, more GPUs per node, fewer workers, or train.device=cpu")
    where = f"{gpus} GPU(s) per node" if cfg.train.device == "auto" and gpus else "CPU (gloo)"
    text = (f"{describe(cfg)} on {nnodes} node(s), "
            f"ranks per node {' '.join(map(str, counts))}, {where}, run directory {cfg.run.dir}")
    return counts, text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fed_ddp.distributed.nodes", description=__doc__.splitlines()[0])
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--node-rank", type=int, default=None, help="print only this node's count")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: what torch sees here)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        files, overrides = split_args([a.config, *a.overrides])
        counts, text = plan(files, overrides, a.nnodes, a.gpus)
        if a.node_rank is not None and not 0 <= a.node_rank < a.nnodes:
            raise ConfigError("--node-rank", a.node_rank, f"must be in [0, {a.nnodes - 1}] (--nnodes={a.nnodes})")
    except ConfigError as e:
        print(f"fed-ddp: config error: {e}", file=sys.stderr)
        return 2
    print(f"fed-ddp: {text}", file=sys.stderr)
    print(counts[a.node_rank] if a.node_rank is not None else " ".join(map(str, counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
