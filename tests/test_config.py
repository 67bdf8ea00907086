"""Configuration loading and validation (one-line ConfigError naming the key), and the launch topology."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fed_ddp.config import ConfigError, RunConfig, load_config, to_dict
from fed_ddp.distributed.topology import Topology

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(CONFIG_DIR.glob("*.yml"))


def _one_line(e: ConfigError) -> str:
    msg = str(e)
    assert "\n" not in msg and "\r" not in msg, f"ConfigError must be one line, got {msg!r}"
    return msg


def _leaves(d, prefix=""):
    """Flatten a nested YAML mapping into (dotted.key, value) pairs."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], d


# ----------------------------------------------------------------------------- shipped configs

def test_config_dir_has_yaml_files():
    assert CONFIG_FILES, f"no YAML files under {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_config_loads_validates_and_applies_its_values(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.world_size == 1 + cfg.fed.num_workers * cfg.fed.ranks_per_client
    # every value written in the file is what the typed config holds
    flat = to_dict(cfg)
    raw = yaml.safe_load(path.read_text()) or {}
    for key, value in _leaves(raw):
        node = flat
        for part in key.split("."):
            node = node[part]
        assert node == value, f"{path.name}: {key} is {node!r}, file says {value!r}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_config_accepts_overrides(path):
    cfg = load_config(path, ["fed.rounds=3", "lora.rank=2"])
    assert cfg.fed.rounds == 3 and cfg.lora.rank == 2


def test_defaults_load_without_file():
    cfg = load_config(None, [])
    assert cfg.fed.strategy == "fedavg" and cfg.fed.num_clients == 4


def test_later_override_wins():
    cfg = load_config(None, ["fed.num_clients=5", "fed.num_clients=2"])
    assert cfg.fed.num_clients == 2


# ----------------------------------------------------------------------------- unknown keys

def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("fed:\n  num_clients: 2\n  roundz: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = _one_line(ei.value)
    assert "fed.roundz" in msg and "unknown key" in msg
    assert ei.value.key == "fed.roundz"


def test_unknown_top_level_section_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("federation:\n  rounds: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "federation" in _one_line(ei.value)


@pytest.mark.parametrize("override,key", [("fed.roundz=3", "fed.roundz"), ("bogus.x=1", "bogus.x"),
                                          ("tracking.wandb.moed=online", "tracking.wandb.moed")])
def test_unknown_key_as_override(override, key):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    msg = _one_line(ei.value)
    assert key in msg and "unknown key" in msg
    assert ei.value.key == key


# ----------------------------------------------------------------------------- wrong types / bad values

def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["fed.rounds=abc"])
    msg = _one_line(ei.value)
    assert "fed.rounds" in msg and "abc" in msg
    assert ei.value.key == "fed.rounds"


def test_wrong_type_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("lora:\n  rank: four\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = _one_line(ei.value)
    assert "lora.rank" in msg and "four" in msg


BAD_VALUES = [
    (["fed.num_clients=0"], "fed.num_clients", ["0", "must be in [1, "]),
    (["fed.strategy=nope"], "fed.strategy", ["nope", "fedavg", "fedprox", "fedadam", "fedavgm", "fedadagrad", "fedyogi"]),
    (["lora.rank=-1"], "lora.rank", ["-1", "must be in [1, "]),
    (["data.partition=bogus"], "data.partition", ["bogus", "iid", "dirichlet", "shards"]),
    (["tracking.wandb.mode=sometimes"], "tracking.wandb.mode", ["sometimes", "online", "offline", "disabled"]),
    (["fed.beta1=1.0"], "fed.beta1", ["1.0", "[0, 1)"]),
    (["fed.server_momentum=1.0"], "fed.server_momentum", ["1.0", "[0, 1)"]),
    (["fed.server_momentum=-0.1"], "fed.server_momentum", ["-0.1", "[0, 1)"]),
    (["run.name=a/b"], "run.name", ["a/b"]),
]


@pytest.mark.parametrize("overrides,key,fragments", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_value_names_key_value_and_allowed(overrides, key, fragments):
    with pytest.raises(ConfigError) as ei:
        load_config(None, overrides)
    msg = _one_line(ei.value)
    assert msg.startswith(key + "=")
    assert ei.value.key == key
    for f in fragments:
        assert f in msg, f"{f!r} missing from {msg!r}"


def test_bad_value_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("fed:\n  num_clients: 0\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert _one_line(ei.value).startswith("fed.num_clients=0")


def test_imagefolder_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["data.source=imagefolder", f"data.path={missing}"])
    msg = _one_line(ei.value)
    assert ei.value.key == "data.path"
    assert str(missing) in msg and "does not exist" in msg


def test_imagefolder_without_metadata(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["data.source=imagefolder", f"data.path={folder}"])
    msg = _one_line(ei.value)
    assert ei.value.key == "data.path"
    assert str(folder) in msg and "metadata.jsonl" in msg


def test_imagefolder_with_metadata_is_accepted(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    cfg = load_config(None, ["data.source=imagefolder", f"data.path={folder}"])
    assert cfg.data.path == str(folder)


def test_imagefolder_needs_path_or_client_dirs():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["data.source=imagefolder"])
    assert ei.value.key == "data.path"
    _one_line(ei.value)


@pytest.mark.parametrize("item", ["fed.rounds", "fedrounds3"])
def test_override_without_equals(item):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [item])
    msg = _one_line(ei.value)
    assert item in msg and "key=value" in msg


def test_missing_config_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(missing)
    msg = _one_line(ei.value)
    assert str(missing) in msg and "does not exist" in msg


def test_malformed_yaml_is_a_one_line_config_error(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("fed: [1, 2\n")  # yaml's own error message spans several lines
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = _one_line(ei.value)
    assert str(p) in msg


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_config(None, ["fed.num_clients=0"])


# ----------------------------------------------------------------------------- malformed input

def test_non_mapping_yaml_is_a_config_error(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        load_config(p)


def test_scalar_for_section_names_the_section():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["fed=3"])
    assert ei.value.key == "fed"


# ----------------------------------------------------------------------------- topology

def test_topology_wrong_world_size_names_expected_size():
    with pytest.raises(ConfigError) as ei:
        Topology.from_env(num_workers=2, env={"RANK": "0", "WORLD_SIZE": "2"})
    msg = _one_line(ei.value)
    assert ei.value.key == "fed.workers"
    assert "3" in msg.replace("fed.workers=2", "")  # the expected world size, not the worker count
    assert "= 3 ranks" in msg and "has 2" in msg


@pytest.mark.parametrize("rank,is_server,worker_id,role", [
    (0, True, None, "server"),
    (1, False, 0, "worker0"),
    (2, False, 1, "worker1"),
])
def test_topology_roles(rank, is_server, worker_id, role):
    t = Topology.from_env(num_workers=2, env={"RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(rank)})
    assert (t.rank, t.world_size, t.local_rank, t.num_workers) == (rank, 3, rank, 2)
    assert t.is_server is is_server
    assert t.worker_id == worker_id
    assert t.role == role


def test_topology_reads_slurm_variables():
    t = Topology.from_env(num_workers=3, env={"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"})
    assert (t.rank, t.world_size, t.local_rank) == (2, 4, 1)
    assert t.role == "worker1"


def test_topology_defaults_to_single_process_world():
    with pytest.raises(ConfigError) as ei:
        Topology.from_env(num_workers=1, env={})
    assert "= 2 ranks" in _one_line(ei.value)
