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


def test_natural_partition_is_one_client_per_distinct_value_of_the_client_column(tmp_path):
    """The reference groups the metadata lines by owner with a plain dict (pandas' groupby, without pandas): client i
    holds exactly the images of the i-th owner in sorted order, each client holding out its own share."""
    f = tmp_path / "owners"
    f.mkdir()
    rng = np.random.default_rng(0)
    owners = rng.choice(["ann", "bo", "cy", "dee", "eve"], size=40).tolist()
    rows = []
    for i, who in enumerate(owners):
        Image.fromarray(np.full((10, 10, 3), 6 * i, dtype=np.uint8)).save(f / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"photo {i}", "owner": who})
    (f / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    groups: dict[str, set[str]] = {}
    for r in rows:
        groups.setdefault(r["owner"], set()).add(r["text"])
    base = ["data.source=imagefolder", f"data.path={f}", "data.partition=natural", "data.client_column=owner"]
    fd = build_federated_data(load_config(None, [*base, f"fed.num_clients={len(groups)}"]), channels=3)
    assert len(fd.clients) == len(groups) == 5
    for c, owner in enumerate(sorted(groups)):
        held = set(fd.clients[c].captions) | set(fd.val_clients[c].captions)
        assert held == groups[owner] and not set(fd.clients[c].captions) & set(fd.val_clients[c].captions)
        assert len(fd.val_clients[c]) >= 1
    assert sorted(fd.val.captions) == sorted(x for v in fd.val_clients for x in v.captions)

    from fed_ddp.config import ConfigError

    with pytest.raises(ConfigError) as e:
        build_federated_data(load_config(None, [*base, "fed.num_clients=4"]), channels=3)
    assert str(e.value).startswith("data.client_column='owner': has 5 distinct values in") and \
        "set fed.num_clients=5 (it is 4)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"data.client_column='user': no line of .*metadata.jsonl has it \(fields: "
                                          r"file_name, owner, text\)"):
        build_federated_data(load_config(None, [*base[:-1], "data.client_column=user", "fed.num_clients=5"]), 3)
    with pytest.raises(ConfigError, match="data.partition=natural needs the metadata field"):
        load_config(None, base[:-1])
    with pytest.raises(ConfigError, match="natural needs data.source=imagefolder with data.path"):
        load_config(None, ["data.partition=natural", "data.client_column=owner"])


def test_image_and_caption_columns_are_the_user_s(tmp_path):
    """metadata.jsonl with `image` / `caption` fields (and an unrelated `text`): data.image_column and
    data.caption_column read them; a missing column is one line naming it and the fields present."""
    f = make_folder(tmp_path / "f", n=12)
    rows = [json.loads(x) for x in (f / "metadata.jsonl").read_text().splitlines()]
    renamed = [{"image": r["file_name"], "caption": r["text"].upper(), "text": "not the caption", "label": r["label"]}
               for r in rows]
    (f / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in renamed) + "\n")
    cfg = load_config(None, ["data.source=imagefolder", f"data.path={f}", "data.partition=iid", "fed.num_clients=2",
                             "data.image_column=image", "data.caption_column=caption"])
    fd = build_federated_data(cfg, channels=3)
    got = sorted(x for c in fd.clients for x in c.captions) + fd.val.captions
    assert sorted(got) == sorted(r["caption"] for r in renamed)
    with pytest.raises(ValueError) as e:
        build_federated_data(load_config(None, ["data.source=imagefolder", f"data.path={f}", "fed.num_clients=2",
                                                "data.partition=iid"]), channels=3)
    assert "metadata.jsonl:1: each line needs 'file_name' and 'text' (data.image_column, data.caption_column), " \
           "got ['caption', 'image', 'label', 'text']" in str(e.value) and "\n" not in str(e.value)
