"""User data in the imagefolder layout, and the federated split built from the config."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fed_ddp.config import ConfigError, load_config
from fed_ddp.data.federated import build_federated_data
from fed_ddp.data.imagefolder import load_imagefolder


def make_folder(root, n=12, labels=("cat", "dog", "fox"), size=20):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        lab = labels[i % len(labels)]
        a = np.full((size, size + 6, 3), 40 * (i % 6), dtype=np.uint8)
        Image.fromarray(a).save(root / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"a photo of a {lab}", "label": lab})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_load_imagefolder_resizes_scales_and_labels(tmp_path):
    d = load_imagefolder(make_folder(tmp_path / "f"), resolution=8, channels=3, label_field="label")
    assert d.images.shape == (12, 3, 8, 8)
    assert d.images.min() >= -1 and d.images.max() <= 1
    assert abs(d.images[1].mean().item() - (40 / 127.5 - 1)) < 1e-5  # a flat grey image keeps its level
    assert d.captions[0] == "a photo of a cat"
    assert list(d.labels[:3]) == [0, 1, 2]  # sorted label names: cat, dog, fox


def test_bad_metadata_names_the_line(tmp_path):
    f = make_folder(tmp_path / "f", n=3)
    (f / "metadata.jsonl").write_text('{"file_name": "000.png"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        load_imagefolder(f, 8)
    (f / "metadata.jsonl").write_text('{"file_name": "nope.png", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_imagefolder(f, 8)


def test_one_folder_partitioned_by_label(tmp_path):
    f = make_folder(tmp_path / "f", n=60)
    cfg = load_config(None, ["data.source=imagefolder", f"data.path={f}", "data.partition=shards",
                             "data.shards_per_client=1", "data.label_field=label", "fed.num_clients=3"])
    fd = build_federated_data(cfg, channels=3)
    sizes = [len(c) for c in fd.clients]
    assert sum(sizes) + len(fd.val) == 60 and len(fd.val) == 6
    assert all(len(np.unique(c.labels)) <= 2 for c in fd.clients)  # one label-sorted shard each
    again = build_federated_data(cfg, channels=3)
    assert all(np.array_equal(a.labels, b.labels) and a.captions == b.captions for a, b in zip(fd.clients, again.clients))


def test_one_folder_per_client(tmp_path):
    dirs = [make_folder(tmp_path / f"c{i}", n=10 + 5 * i) for i in range(2)]
    cfg = load_config(None, ["data.source=imagefolder", f"data.client_dirs=[{dirs[0]},{dirs[1]}]",
                             "fed.num_clients=2"])
    fd = build_federated_data(cfg, channels=1)
    assert [len(c) for c in fd.clients] == [9, 13] and len(fd.val) == 1 + 2
    assert fd.clients[0].images.shape[1] == 1
    with pytest.raises(ConfigError, match="one folder per client"):
        load_config(None, ["data.source=imagefolder", f"data.client_dirs=[{dirs[0]}]", "fed.num_clients=2"])


def test_digits_split_keeps_client_and_base_concepts_apart():
    cfg = load_config("configs/quickstart.yaml", [])
    fd = build_federated_data(cfg)
    for c in fd.clients:
        assert set(np.unique(c.labels)) <= {5, 6, 7, 8, 9} and len(np.unique(c.labels)) <= 3
    assert set(np.unique(fd.replay.labels)) == {0, 1, 2, 3, 4}
    assert set(np.unique(fd.val.labels)) <= {5, 6, 7, 8, 9}
    all_idx = sum(len(c) for c in fd.clients) + len(fd.val)
    assert all_idx == int(np.isin(__import__("sklearn.datasets").datasets.load_digits().target, [5, 6, 7, 8, 9]).sum())
