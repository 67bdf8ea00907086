"""Metrics to local files (always) and Weights & Biases (server rank only), logs tagged by role and rank.

One small interface (``log``, ``log_images``, ``finish``); W&B enters through ``maybe_wandb`` and is a
no-op when ``tracking.wandb.mode=disabled``, so the round loop never branches on it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from fed_ddp.files import open_new


def setup_logging(role: str, rank: int, level: str = "INFO") -> logging.Logger:
    fmt = f"%(asctime)s [{role} r{rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    return logging.getLogger("fed_ddp")


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _flat(d: dict, prefix: str = "") -> dict:
    """Numbers of a nested metrics dict under W&B's key convention, at any depth:
    ``{"seconds": {"round": 1.0}, "final": {"gen_acc": {"5": 0.4}}}`` -> ``seconds/round``, ``final/gen_acc/5``.
    Strings, lists and None are left out: W&B charts numbers (a NaN is sent; metrics.jsonl writes it null)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


class JsonlLogger:
    """One JSON object per line; flushed at once so nothing is lost if the run dies."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open_new(self.path, append=append)  # never through a planted link; closed in finish

    def log(self, metrics: dict, step: int) -> None:
        self._f.write(json.dumps(_clean(metrics)) + "\n")
        self._f.flush()

    def log_images(self, images: dict[str, str], step: int) -> None:
        pass  # the PNGs are already in the run directory

    def finish(self, summary: dict | None = None) -> None:
        self._f.close()


PER_CLIENT = ("clients", "train_loss", "train_loss_mean", "num_examples", "train_seconds")
QUALITY_CLIENTS = ("fid_clients_", "kid_clients_", "clip_score_clients_")  # eval.metrics per client (and their means)


def public_row(row: dict, per_client=()) -> dict:
    """A round's row without what names or describes single clients (who was sampled, each one's loss,
    examples and time, ``per_client``: the objective's metrics, eval.metrics' per-client figures, the exact
    count of unclipped updates): what
    leaves the server under differential privacy. ``metrics.jsonl`` (the server's own log) keeps the full row."""
    # sim_*: the simulated cell is rebuilt from the config's seed, so any per-round figure of it (the broadcast
    # rate is the weakest scheduled client's, the slowest client's split names its class) says who was sampled
    out = {k: v for k, v in row.items() if k not in PER_CLIENT and k not in per_client
           and not k.startswith(("sim_", *QUALITY_CLIENTS))}
    if isinstance(out.get("privacy"), dict):
        out["privacy"] = {k: v for k, v in out["privacy"].items() if k != "unclipped"}
    return out


class WandbLogger:
    def __init__(self, cfg, run_dir: Path, config_dict: dict):
        import wandb

        from fed_ddp.objectives import lookup

        self.private = cfg.privacy.dp.enabled  # rows go out without per-client data (public_row)
        self.per_client = lookup(cfg.train.objective).metrics  # train.objective's metrics: one value per client
        w = cfg.tracking.wandb
        self._wandb = wandb
        self.run = wandb.init(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags) or None,
                              name=cfg.run.name, mode=w.mode, dir=str(run_dir), config=config_dict,
                              resume="allow" if cfg.run.resume else None)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_flat(public_row(metrics, self.per_client) if self.private else metrics), step=step)

    def log_images(self, images: dict[str, str], step: int) -> None:
        self.run.log({k: self._wandb.Image(p) for k, p in images.items()}, step=step)

    def finish(self, summary: dict | None = None) -> None:
        if summary and self.private:  # the final evaluation's per-client quality figures stay in summary.json
            summary = {**summary, "final": public_row(summary.get("final") or {})}
        if summary:  # summary.json's strings and its numbers at any depth (seconds_total/round, ...)
            for k, v in {**{k: v for k, v in summary.items() if isinstance(v, str)}, **_flat(summary)}.items():
                self.run.summary[k] = v
        self.run.finish()


class MultiLogger:
    def __init__(self, *loggers):
        self.loggers = [lg for lg in loggers if lg is not None]

    def log(self, metrics: dict, step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def log_images(self, images: dict[str, str], step: int) -> None:
        for lg in self.loggers:
            lg.log_images(images, step)

    def finish(self, summary: dict | None = None) -> None:
        for lg in self.loggers:
            lg.finish(summary)


def maybe_wandb(cfg, run_dir: Path, config_dict: dict):
    return None if cfg.tracking.wandb.mode == "disabled" else WandbLogger(cfg, run_dir, config_dict)
