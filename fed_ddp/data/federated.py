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
    if d.path:
        pool = load_imagefolder(d.path, d.resolution, channels, d.label_field)
        train, val = _split(pool, cfg, 0)
        return FederatedData(_partitioned(train, cfg), val)
    clients, vals = [], []
    for c, folder in enumerate(d.client_dirs):
        train, val = _split(load_imagefolder(folder, d.resolution, channels, d.label_field), cfg, c)
        clients.append(train)
        vals.append(val)
    return FederatedData(clients, concat(vals), val_clients=vals)


def concat(parts: list[CaptionedImages]) -> CaptionedImages:
    import torch

    return CaptionedImages(torch.cat([p.images for p in parts]), [c for p in parts for c in p.captions],
                           np.concatenate([p.labels for p in parts]))
