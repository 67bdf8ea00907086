"""Finished runs made in this process: the production server loop over in-memory clients (as in
``fed-ddp compare``), writing the same config.yaml / metrics.jsonl / summary.json as ``fed-ddp run``,
without starting 1 + N interpreters. Used by the report and tracking tests.

``study_runs`` makes the three runs of a small scaling study once per test session (number of clients x
uplink codec), each tracked by ``WandbLogger`` against a recording stand-in for the ``wandb`` module:
test_report reads their run directories, test_tracking what reached "W&B".
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

from conftest import ROOT

TINY = str(ROOT / "configs" / "tiny_test.yaml")
STUDY = {"c2-fp32": (2, []), "c2-int8": (2, ["int8"]), "c3-int8": (3, ["int8"])}  # name: clients, uplink codec
STUDY_GROUP = "scaling-test"
_made: dict[Path, dict] = {}


def finished_run(base: Path, out: Path, name: str, *overrides: str) -> Path:
    import torch

    from fed_ddp.compare import run_arm
    from fed_ddp.config import load_config
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.families import denoiser
    from fed_ddp.diffusion.lora import get_flat, prepare_trainable
    from fed_ddp.diffusion.models import load_pipeline, quiet_libraries, training_scheduler

    quiet_libraries()
    torch.set_num_threads(1)  # like every rank (train.num_threads); more threads crawl on a shared 2-core box
    cfg = load_config(TINY, [f"model.pretrained={base}", f"run.output_dir={out}", f"run.name={name}",
                             "eval.images_per_prompt=2", "eval.inference_steps=2", "eval.sample_seeds=[0]",
                             *overrides])
    pipe = load_pipeline(str(base), torch.device("cpu"))
    prepare_trainable(denoiser(pipe), cfg)  # as every rank does
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    run_arm(cfg, pipe, training_scheduler(pipe), data, get_flat(denoiser(pipe)), str(base))
    return cfg.run.dir


class WandbRecorder:
    """The part of the ``wandb`` module that fed_ddp.tracking uses, recording every call."""

    def __init__(self):
        self.init_kwargs, self.logs, self.summary, self.finished = None, [], {}, False

    def module(self) -> types.ModuleType:
        rec = self
        mod = types.ModuleType("wandb")

        class Run:
            summary = rec.summary

            def log(self, data, step=None):
                rec.logs.append((step, dict(data)))

            def finish(self):
                rec.finished = True

        def init(**kwargs):
            rec.init_kwargs = kwargs
            return Run()

        mod.init = init
        mod.Image = lambda path: ("image", path)
        return mod


def tracked_run(base: Path, out: Path, name: str, *overrides: str) -> tuple[Path, WandbRecorder]:
    """``finished_run`` with tracking.wandb.mode=offline, the wandb module replaced by a recorder."""
    rec = WandbRecorder()
    saved = sys.modules.get("wandb")
    sys.modules["wandb"] = rec.module()
    try:
        run_dir = finished_run(base, out, name, "tracking.wandb.mode=offline", f"tracking.wandb.group={STUDY_GROUP}",
                               "tracking.wandb.tags=[a,b]", *overrides)
    finally:
        if saved is None:
            sys.modules.pop("wandb", None)
        else:
            sys.modules["wandb"] = saved
    return run_dir, rec


def study_runs(base: Path, tmp_path_factory) -> dict[str, tuple[Path, WandbRecorder]]:
    """The three study runs ({name: (run directory, recorder)}), made on first use in this session."""
    if base not in _made:
        out = tmp_path_factory.mktemp("study")
        _made[base] = {name: tracked_run(base, out, name, f"fed.num_clients={n}", f"comm.uplink=[{','.join(c)}]",
                                         "comm.min_numel=0", "lora.rank=2")
                       for name, (n, c) in STUDY.items()}
    return _made[base]
