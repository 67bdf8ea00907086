"""Shared fixtures: a random-init tiny base pipeline (no pretraining, no download) and CLI helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A StableDiffusionPipeline directory of the tiny architecture with random weights."""
    import torch

    from fed_ddp.diffusion.models import quiet_libraries
    from fed_ddp.diffusion.tiny import build_pipeline

    quiet_libraries()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "tiny-random"
    build_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def family_base(tmp_path_factory):
    """family name -> a directory holding that family's tiny pipeline with random weights (built once)."""
    import torch

    from fed_ddp.diffusion.families import get_family
    from fed_ddp.diffusion.models import quiet_libraries

    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            quiet_libraries()
            torch.manual_seed(0)
            made[name] = tmp_path_factory.mktemp("base") / f"tiny-{name}-random"
            get_family(name).tiny_pipeline().save_pretrained(made[name])
        return made[name]

    return make


@pytest.fixture(scope="session")
def dense_chain_run(tiny_base, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, spy directory) of one real launch over gloo (1 server + 2 workers, torch engine,
    1 rank per client, dense fp32 wire; tests/spy_rank.py records every buffer), read by two modules:

    * test_distributed.py: its "dense" codec chain (the server's aggregate and the byte counts);
    * test_deepspeed.py: its reference "torch_r1", against which every engine and rank layout must end.

    Both wanted the same thing, the tiny config's plain FedAvg round on two clients as the production path
    runs it, so one launch (test_distributed's TINY_ARGS) serves both instead of two."""
    from test_distributed import CHAINS, _run

    return _run(tiny_base, tmp_path_factory.mktemp("dense"), "dense", CHAINS["dense"])


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``fed-ddp ARGS`` the way a user does (a fresh interpreter), from the repository root."""
    full_env = {**os.environ, **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if env is None or k not in env:
            full_env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "fed_ddp.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """``fed-ddp ARGS`` through ``fed_ddp.cli.main`` in this process, from the repository root, its stdout and stderr
    captured: for lines that must fail before any rank starts (what a fresh interpreter adds is only its start-up,
    ~2 s a line; ``run_cli`` keeps the console's view for the tests that need it). An exception that escapes
    ``main`` is a traceback on stderr and exit 1, as the console script would show it."""
    import contextlib
    import io
    import traceback

    from fed_ddp.cli import main

    assert "RANK" not in os.environ, "cli_here must not join a launched world"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 - shown as the console script would show it
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["fed-ddp", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def registries_restored():
    """Plug-ins a test module imports (run.plugins) register names in this process; afterwards the registries,
    the plug-in file cache and sys.modules are as before, so no later test sees them."""
    from fed_ddp import callbacks, objectives, plugins, strategies
    from fed_ddp.compression import registry as codecs
    from fed_ddp.diffusion import families
    from fed_ddp.population import sampling

    saved = [(r, dict(r)) for r in (strategies.REGISTRY, callbacks.REGISTRY, objectives.REGISTRY, sampling.REGISTRY,
                                    families.REGISTRY, codecs.REGISTRY)]
    files, modules = dict(plugins._files), set(sys.modules)
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)
    plugins._files.clear()
    plugins._files.update(files)
    for name in set(sys.modules) - modules:
        if name.startswith("fed_ddp_plugin_"):
            del sys.modules[name]
