"""A test rank as a function, for ranks forked from a preloaded fork server (test_distributed.launch).

``entry("spy_rank", environ, argv)`` in the forked rank is ``python tests/spy_rank.py ARGV`` run by torchrun: the
environment becomes the launching test's (``environ``, captured at launch time; the fork server's own is from
its start) plus what the agent set for this rank, then the rank script's module is imported (its patches are
its import side effects, so they happen in the rank only, never in the test process that pickles this
function) and ``train.main(argv)`` runs.
"""

import importlib
import os

# what torch's elastic agent sets for each rank (LocalElasticAgent's worker_env; TORCHELASTIC_* as a prefix)
AGENT_KEYS = {"RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
              "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}


def entry(script: str, environ: dict, argv: list[str]) -> int:
    agent = {k: v for k, v in os.environ.items() if k in AGENT_KEYS or k.startswith("TORCHELASTIC_")}
    os.environ.clear()
    os.environ.update({**environ, **agent})
    importlib.import_module(script)
    from fed_ddp import train

    code = train.main(argv)
    if code:
        train._exit_now(code)  # an exit status, as the script's sys.exit gives; a return value would be data
    return code


PRELOAD = ["fed_ddp.train", "fed_ddp.worker", "fed_ddp.server", "diffusers", "peft"]  # no side effects, no rank script


def launch(script: str, nproc: int, argv: list[str], max_restarts: int = 0, forked: bool = True) -> None:
    """``torchrun --nproc-per-node NPROC tests/SCRIPT.py ARGV`` with this process's environment, through torch's
    elastic agent in this process. The ranks are forked from one fork server per test session that imported the
    libraries once (multiprocessing's forkserver, a fresh single-threaded interpreter: nothing of the test
    process is inherited), instead of each rank importing torch, diffusers, peft and transformers afresh: about
    6 CPU-s a rank, most of a tiny launch on 2 cores. Everything after the import is the rank's production path,
    restarts included (the agent forks the ranks anew from the same server). ``forked=False`` starts each rank
    as ``python tests/SCRIPT.py`` as ``fed-ddp run`` starts its ranks, for the tests of what the launcher
    reports when a rank fails (its exit, its stderr), which a function entry point reports differently."""
    import multiprocessing
    import sys
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    multiprocessing.set_forkserver_preload(PRELOAD)
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex[:8],
                       rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=max_restarts,
                       monitor_interval=0.2, start_method="forkserver" if forked else "spawn")
    if forked:
        elastic_launch(cfg, entry)(script, dict(os.environ), list(argv))
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        os.environ["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])
        elastic_launch(cfg, sys.executable)(os.path.join(here, f"{script}.py"), *argv)
