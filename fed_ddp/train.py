"""Entry point of every rank: config -> process group -> server or worker loop -> tear down.

    torchrun --standalone --nproc-per-node 5 -m fed_ddp.train configs/quickstart.yaml [more.yaml ...] [key=value ...]

(``fed-ddp run`` launches exactly this through torch's own launcher.) Rank 0 is the server, ranks
1..W*R the workers (``fed.workers`` W of ``fed.ranks_per_client`` R ranks each), which play the
clients the server samples each round. Backend: NCCL when every rank has a CUDA device, gloo otherwise.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from fed_ddp.config import ConfigError, RunConfig, load_config, split_args
from fed_ddp.diffusion.families import denoiser
from fed_ddp.distributed.topology import Topology
from fed_ddp.tracking import setup_logging


def pick_device(cfg: RunConfig, local_rank: int) -> torch.device:
    if cfg.train.device == "auto" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def run_rank(cfg: RunConfig, topo: Topology, device: torch.device) -> dict | None:
    from fed_ddp.compression import layout_of
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.lora import prepare_trainable
    from fed_ddp.diffusion.models import base_path, load_pipeline, quiet_libraries, training_scheduler
    from fed_ddp.engines import TorchEngine, build_engine
    from fed_ddp.protocol import wire_for
    from fed_ddp.transport import CollectiveTransport

    quiet_libraries()
    from fed_ddp.distributed.collectives import broadcast_text

    # the server pretrains/locates the base; the others wait here (a string as tensors: nothing unpickled)
    base = broadcast_text(base_path(cfg.model, show_progress=True) if topo.is_server else None, src=0,
                          device=device if dist.get_backend() == "nccl" else None)
    pipe = load_pipeline(base, device, cfg.model.revision, cfg.model.family)
    prepare_trainable(denoiser(pipe), cfg)
    scheduler = training_scheduler(pipe)
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    replay = shared_replay(cfg, pipe, data, topo, device)
    # Every rank builds its engine in the same order: DeepSpeed's ZeRO-3 set-up has world-wide barriers.
    deepspeed = cfg.train.engine == "deepspeed"
    engine = build_engine(denoiser(pipe), cfg, topo, device) if deepspeed or not topo.is_server else \
        TorchEngine(denoiser(pipe), cfg.train)
    wid = topo.worker_id
    # every buffer size is known from here on
    wire = wire_for(cfg, layout_of(denoiser(pipe)), topo.num_workers)
    transport = CollectiveTransport(server_rank=0, group=topo.groups.leaders,
                                    device=device if dist.get_backend() == "nccl" else None,
                                    client_group=topo.groups.client,
                                    client_src=None if topo.is_server else topo.leader_of(wid),
                                    method=cfg.comm.gather)

    if topo.is_server:
        from fed_ddp.server import run_server

        return run_server(cfg, pipe, scheduler, data, transport, base, engine=engine, wire=wire)

    from fed_ddp.worker import Worker

    worker = Worker(wid, cfg, pipe, scheduler, data, wire, engine=engine, replay=replay, leader=topo.is_leader,
                    rank_in_client=topo.rank_in_client, ranks_per_client=topo.ranks_per_client)
    if topo.is_leader:
        transport.serve(wire.head_nbytes, worker.body_nbytes, worker.handle)
        log = logging.getLogger("fed_ddp")
        log.info("played %d client rounds, encoded %d clients' data, read %d client states",
                 worker.played, worker.encoded, worker.store.reads)
    else:
        transport.follow(wire.head_nbytes, worker.body_nbytes, worker.handle)
    return None


def shared_replay(cfg: RunConfig, pipe, data, topo: Topology, device: torch.device):
    """The replay set (the base's concepts mixed into local batches), encoded once by the server and broadcast
    to every rank, instead of by every worker (the same posterior means and text states: the encoders are
    frozen and the server encodes at the ranks' thread count). None without replay."""
    if data.replay is None or cfg.data.replay_fraction <= 0:
        return None
    from fed_ddp.data.encoded import EncodedSet
    from fed_ddp.diffusion.models import encode_set
    from fed_ddp.distributed.collectives import broadcast_tensors

    mine = None
    if topo.is_server:
        enc = encode_set(pipe, data.replay)
        mine = {"latents": enc.latents, **{f"cond.{k}": v for k, v in enc.cond.items()}}
    got = broadcast_tensors(mine, src=0, device=device if dist.get_backend() == "nccl" else None)
    if topo.is_server:  # the server trains no client: it only encoded the set for the others
        return None
    lengths = {len(v) if v.dim() else -1 for v in got.values()}
    if "latents" not in got or lengths != {len(data.replay)}:
        raise ValueError(f"replay set from the server: {sorted(got)} with lengths {sorted(lengths)}, expected "
                         f"{len(data.replay)} examples each")
    # where encode_set leaves them: latents on the autoencoder's device, the conditioning on the host
    return EncodedSet(got.pop("latents").to(pipe.vae.device), {k[5:]: v for k, v in got.items()})


def die_with_parent() -> None:
    """Linux: the kernel kills this rank when its launcher (torchrun's agent, ``fed-ddp run``) dies, however it
    dies, so no rank trains on unsupervised. SIGKILL, not SIGTERM: a rank blocked in a collective never runs a
    Python handler, and checkpoints are atomic, so nothing is lost that a resume would need."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's own teardown is all there is
        return
    # the launcher died before the prctl above: the parent changed, or (`fed-ddp run` names itself) it already
    # had. No guess from a parent pid of 1: in a container, torchrun itself may be pid 1.
    launcher = int(os.environ.get("FED_DDP_LAUNCHER_PID", "0"))
    if os.getppid() != parent or (launcher and parent != launcher):
        os.kill(os.getpid(), signal.SIGKILL)


def init_process_group(backend: str, timeout: timedelta, restart: int, **kw) -> None:
    """``init_process_group`` from the launcher's environment. Under torch's elastic agent the ranks share the
    agent's store across restarts, and gloo would read the dead attempt's addresses from it (attempt 1 hangs
    connecting to attempt 0's ports, measured on torch 2.13): each attempt gets keys of its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"fed_ddp/attempt_{restart}", store), rank=rank,
                                world_size=world, timeout=timeout, **kw)
    else:
        dist.init_process_group(backend, timeout=timeout, **kw)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_PROCID" in os.environ:
        die_with_parent()
    try:
        if not argv or argv[0].startswith("-"):
            raise ConfigError("config", argv[0] if argv else None, "usage: fed_ddp.train CONFIG.yaml [key=value ...]")
        files, overrides = split_args(argv)
        cfg = load_config(files, overrides)
        topo = Topology.from_env(cfg.fed.num_workers, cfg.fed.ranks_per_client)
    except ConfigError as e:
        if rank == 0:
            print(f"fed-ddp: config error: {e}", file=sys.stderr)
        return 2
    log = setup_logging(topo.role, topo.rank, cfg.run.log_level)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0 and not cfg.run.resume:  # the launcher restarted every rank after one died: continue the run
        cfg.run.resume = True
        if topo.is_server:
            log.warning("restart %d: resuming from the last complete round", restart)
    torch.set_num_threads(cfg.train.num_threads)
    device = pick_device(cfg, topo.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group(backend, timedelta(seconds=cfg.fed.timeout_s), restart,
                       **({"device_id": device} if device.type == "cuda" else {}))
    try:
        topo = topo.with_groups(deepspeed=cfg.train.engine == "deepspeed")
        run_rank(cfg, topo, device)
    except KeyboardInterrupt:
        log.error("interrupted: the last complete round's checkpoint is in %s", cfg.run.dir / "checkpoints")
        _exit_now(130)
    except Exception as e:
        log.exception("failed")
        from fed_ddp.failures import record

        record(e, topo.role, topo.rank, cfg.run.dir)  # the launcher's error file and RUN_DIR/errors/rank_N.txt
        _exit_now(1)
    dist.destroy_process_group()
    return 0


def _exit_now(code: int) -> None:
    """Leave without tearing the process group down: with a peer hung or dead, ``destroy_process_group`` waits
    on its pending collectives (for fed.timeout_s); the launcher stops the other ranks anyway."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0:  # rank 0 is the server
        # A worker is done (its state files are closed); the interpreter's own teardown would spend about a CPU
        # second per rank collecting garbage while the server still runs its final evaluation on the same cores.
        _exit_now(code)
    sys.exit(code)
