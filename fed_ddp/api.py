"""The Python entry point: ``fed_ddp.run``.

    import fed_ddp
    summary = fed_ddp.run("configs/quickstart.yaml", ["fed.rounds=2"], launch="torchrun")   # or "inprocess"

``launch="torchrun"`` is exactly ``fed-ddp run`` (the same pre-flight, 1 + W ranks over gloo or NCCL, the
closing lines on stdout); ``launch="inprocess"`` runs the same server loop and worker in this process over the
in-memory transport (one worker plays every sampled client in turn: a client's update does not depend on the
worker that plays it, so the final adapter is the same). Both return the run's ``results.RunSummary``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fed_ddp.config import ConfigError, load_config
from fed_ddp.results import RunSummary, read_summary

log = logging.getLogger("fed_ddp.api")
LAUNCHES = ("torchrun", "inprocess")


def run(config: str | os.PathLike | list | None, overrides: list[str] | tuple[str, ...] = (),
        launch: str = "torchrun") -> RunSummary:
    """Run the config (YAML file(s) and ``key=value`` overrides); the run's summary. Bad input raises
    ``ConfigError`` (one line) before anything starts; a failed rank raises ``RuntimeError`` with its line."""
    if launch not in LAUNCHES:
        raise ConfigError("launch", launch, f"must be one of {list(LAUNCHES)}")
    files = [] if config is None else [str(c) for c in (config if isinstance(config, (list, tuple)) else [config])]
    cfg = load_config(files, list(overrides))  # bad input: ConfigError here, before anything starts
    if launch == "torchrun":
        return _torchrun(files, list(overrides), cfg)
    return run_inprocess(cfg)


def _torchrun(files: list[str], overrides: list[str], cfg) -> RunSummary:
    import contextlib
    import io

    from fed_ddp.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the launcher's own lines; a failure's line is raised below
        code = main(["run", *files, *overrides])
    if code != 0:
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("fed-ddp:")]
        raise RuntimeError(lines[-1] if lines else f"fed-ddp run exited with {code}")
    summary = read_summary(cfg.run.dir)
    if summary is None:
        raise RuntimeError(f"{cfg.run.dir}: the run finished without a summary.json")
    return summary


def run_inprocess(cfg) -> RunSummary:
    """The server loop and one worker in this process (``InMemoryTransport``), from a config object."""
    import torch

    from fed_ddp.compare import run_arm
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.families import denoiser
    from fed_ddp.diffusion.lora import get_flat, prepare_trainable
    from fed_ddp.diffusion.models import base_path, load_pipeline, quiet_libraries, training_scheduler
    from fed_ddp.preflight import preflight

    quiet_libraries()
    for warning in preflight(cfg):  # the checks of a launch but its size (one process here)
        log.warning(warning)
    torch.set_num_threads(cfg.train.num_threads)  # as every rank: the same threads, the same bits
    base = base_path(cfg.model)
    pipe = load_pipeline(str(base), torch.device("cpu"), cfg.model.revision, cfg.model.family)
    prepare_trainable(denoiser(pipe), cfg)  # as every rank does
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    return run_arm(cfg, pipe, training_scheduler(pipe), data, get_flat(denoiser(pipe)), str(Path(base)))
