"""Who holds what: each client's private data, the shared replay pool, and the server's validation sets.

Deterministic from ``run.seed``, so every rank computes the same split without sending it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fed_ddp.config import RunConfig
from fed_ddp.data.digits import CaptionedImages, load_digits_dataset, split_indices
from fed_ddp.data.imagefolder import load_imagefolder
from fed_ddp.data.partition import partition


@dataclass
class FederatedData:
    clients: list[CaptionedImages]  # private data of each client
    val: CaptionedImages  # held out: the concepts the clients teach
    replay: CaptionedImages | None = None  # concepts the base already knows, mixed into local batches
    val_base: CaptionedImages | None = None  # held out: the base's concepts (forgetting check)
    val_clients: list[CaptionedImages] | None = None  # held out per client (data.client_dirs: each folder's own split)

    def summary(self) -> dict:
        def counts(d: CaptionedImages) -> dict[str, int]:
            vals, n = np.unique(d.labels, return_counts=True)
            return {str(v): int(c) for v, c in zip(vals, n)}

        return {"clients": [{"client": c, "num_examples": len(d), "label_counts": counts(d)}
                            for c, d in enumerate(self.clients)],
                "val": len(self.val), "replay": len(self.replay) if self.replay else 0}


def _split(data: CaptionedImages, cfg: RunConfig, seed_offset: int) -> tuple[CaptionedImages, CaptionedImages]:
    val_idx, train_idx = split_indices(len(data), (cfg.data.val_fraction,), cfg.run.seed + seed_offset)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise ValueError(f"{len(data)} examples leave an empty {'validation' if len(val_idx) == 0 else 'training'} "
                         f"split at data.val_fraction={cfg.data.val_fraction}")
    return data.subset(np.sort(train_idx)), data.subset(np.sort(val_idx))


def _partitioned(pool: CaptionedImages, cfg: RunConfig) -> list[CaptionedImages]:
    d = cfg.data
    parts = partition(d.partition, pool.labels, cfg.fed.num_clients, cfg.run.seed, d.dirichlet_alpha,
                      d.shards_per_client)
    return [pool.subset(p) for p in parts]


def build_federated_data(cfg: RunConfig, channels: int = 1) -> FederatedData:
    d = cfg.data
    if d.source == "digits":
        everything = load_digits_dataset()
        mine = everything.subset(np.flatnonzero(np.isin(everything.labels, d.digits)))
        train, val = _split(mine, cfg, 0)
        base_digits = [x for x in cfg.model.tiny.digits if x not in d.digits]
        replay = val_base = None
        if base_digits:
            base = everything.subset(np.flatnonzero(np.isin(everything.labels, base_digits)))
            replay, val_base = _split(base, cfg, 1)
        return FederatedData(_partitioned(train, cfg), val, replay if d.replay_fraction > 0 else None, val_base)
    if d.path and d.partition == "natural":
        return _natural(cfg, channels)
    if d.path:
        pool = load_imagefolder(d.path, d.resolution, channels, d.label_field, None, d.image_column, d.caption_column)
        train, val = _split(pool, cfg, 0)
        return FederatedData(_partitioned(train, cfg), val)
    clients, vals = [], []
    for c, folder in enumerate(d.client_dirs):
        train, val = _split(load_imagefolder(folder, d.resolution, channels, d.label_field, None, d.image_column,
                                                d.caption_column), cfg, c)
        clients.append(train)
        vals.append(val)
    return FederatedData(clients, concat(vals), val_clients=vals)


def natural_clients(rows: list[dict], column: str, num_clients: int, meta) -> tuple[list[str], list[np.ndarray]]:
    """data.partition=natural: the distinct values of ``column`` in a folder's metadata lines ``rows`` (sorted: client
    i holds the i-th) and each one's row indices; one line if a row lacks it or the count is not N."""
    from fed_ddp.config import ConfigError
    from fed_ddp.data.imagefolder import require_field

    require_field(rows, column, "data.client_column", meta)
    values = np.array([str(r[column]) for r in rows])
    names = sorted(set(values.tolist()))
    if len(names) != num_clients:
        raise ConfigError("data.client_column", column, f"has {len(names)} distinct values in {meta}, "
                          f"so data.partition=natural gives {len(names)} clients: set fed.num_clients={len(names)} "
                          f"(it is {num_clients})")
    return names, [np.flatnonzero(values == v) for v in names]


def _natural(cfg: RunConfig, channels: int) -> FederatedData:
    """One client per distinct data.client_column value, each holding out its own validation share (at least one
    image; as data.client_dirs does), so the server has a held-out set per client too."""
    d = cfg.data
    from pathlib import Path

    from fed_ddp.data.imagefolder import read_metadata

    rows = read_metadata(d.path, d.image_column, d.caption_column)  # once: the clients, then the images
    names, parts = natural_clients(rows, d.client_column, cfg.fed.num_clients, Path(d.path) / "metadata.jsonl")
    pool = load_imagefolder(d.path, d.resolution, channels, d.label_field, rows=rows)
    clients, vals = [], []
    for c, idx in enumerate(parts):
        if len(idx) < 2:
            raise ValueError(f"data.client_column={d.client_column!r}: client {c} ({names[c]!r}) has {len(idx)} image: "
                             "each needs at least 2 (one is held out for validation)")
        # at least one held out per client, however few images it has (natural clients are often small)
        perm = np.random.default_rng(cfg.run.seed + c).permutation(idx)
        k = min(len(idx) - 1, max(1, round(d.val_fraction * len(idx))))
        clients.append(pool.subset(np.sort(perm[k:])))
        vals.append(pool.subset(np.sort(perm[:k])))
    return FederatedData(clients, concat(vals), val_clients=vals)


def concat(parts: list[CaptionedImages]) -> CaptionedImages:
    import torch

    return CaptionedImages(torch.cat([p.images for p in parts]), [c for p in parts for c in p.captions],
                           np.concatenate([p.labels for p in parts]))
