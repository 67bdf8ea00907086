"""Bad input: one clear line on stderr, a non-zero exit, no traceback, no ranks left hanging.

Lines that fail before any rank starts go through ``cli.main`` in this process (conftest.cli_here); a missing
config file and a world of the wrong size are run in a fresh interpreter as the console runs them."""

from __future__ import annotations

import sys
import uuid

import pytest
from conftest import ROOT, cli_here, run_cli

TINY = str(ROOT / "configs" / "tiny_test.yaml")


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fed-ddp:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("override,needles", [
    ("fed.roundz=3", ["fed.roundz", "unknown key"]),
    ("fed.rounds=many", ["fed.rounds", "many"]),
    ("fed.strategy=fedmagic", ["fed.strategy", "fedmagic", "fedavg"]),
    ("lora.rank=0", ["lora.rank", "[1, 4,096]"]),
])
def test_bad_config_values(override, needles):
    _one_line_error(cli_here("run", TINY, override), *needles)


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fed:\n  num_clients: 2\ntrain:\n  learning_rate: 0.1\n")
    _one_line_error(cli_here("run", str(bad)), "train.learning_rate")


def test_missing_data_folder(tmp_path):
    _one_line_error(cli_here("run", TINY, "data.source=imagefolder", f"data.path={tmp_path / 'nope'}"),
                    "data.path", "does not exist")


def test_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fed:\n  rounds: 2\nfed:\n  rounds: 3\n")  # duplicate key
    _one_line_error(cli_here("run", str(bad)), "invalid YAML")


def test_missing_config_file():
    _one_line_error(run_cli("run", "configs/does_not_exist.yaml"), "does_not_exist")


def test_world_size_that_does_not_fit_the_config():
    """Inside a launcher with 2 ranks for a 2-client config (needs 3): every rank exits at once."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    line = _one_line_error(run_cli("run", TINY, env=env, timeout=120), "fed.workers", "3 ranks", "has 2")
    assert "config error" in line


@pytest.mark.slow
def test_world_size_mismatch_under_the_launcher_does_not_hang():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=uuid.uuid4().hex[:8],
                       rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2)
    with pytest.raises(ChildFailedError) as info:
        elastic_launch(cfg, sys.executable)("-m", "fed_ddp.train", TINY)
    # the first rank to notice exits 2; the launcher then stops the others instead of letting them hang
    assert info.value.get_first_failure()[1].exitcode == 2


@pytest.mark.parametrize("overrides,needles", [
    (["fed.num_clients=5000", "fed.clients_per_round=10"], ["data", "5000 clients", "samples"]),
    (["fed.num_clients=10", "fed.clients_per_round=20"], ["fed.clients_per_round", "20"]),
    (["fed.sampling=poisson", "fed.sample_rate=2"], ["fed.sample_rate", "(0, 1]"]),
    (["fed.workers=3"], ["fed.workers", "fed.num_clients=2"]),
])
def test_bad_population_is_one_line_before_any_rank(overrides, needles):
    """Too many clients for the examples, m > N, q outside (0, 1], W > N: one line, nothing launched."""
    proc = cli_here("run", TINY, *overrides, "run.output_dir=/nonexistent/never_made")
    _one_line_error(proc, *needles)
    assert "launching" not in proc.stderr


def _folder(tmp_path, lines: list[str], images: int = 12, corrupt: bool = False):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(images):
        Image.new("L", (8, 8), color=i * 10).save(d / f"{i}.png")
    if corrupt:
        (d / "0.png").write_bytes(b"not a png at all")
    body = [f'{{"file_name": "{i}.png", "text": "a handwritten digit five"}}' for i in range(images)]
    (d / "metadata.jsonl").write_text("\n".join(body + lines) + "\n")
    return d


@pytest.mark.parametrize("extra, corrupt, needles", [
    (['{"file_name": "missing.png", "text": "x"}'], False, ["metadata.jsonl:13", "missing.png", "does not exist"]),
    (["{not json"], False, ["metadata.jsonl:13", "not a JSON object"]),
    (['{"file_name": "1.png", "text": null}'], False, ["metadata.jsonl:13", "caption", "None"]),
    ([], True, ["metadata.jsonl:1", "0.png", "does not decode"]),
])
def test_bad_image_folder_is_one_line_before_any_rank(tmp_path, extra, corrupt, needles):
    d = _folder(tmp_path, extra, corrupt=corrupt)
    proc = cli_here("run", TINY, "data.source=imagefolder", f"data.path={d}", f"run.output_dir={tmp_path}/runs")
    _one_line_error(proc, *needles)
    assert "launching" not in proc.stderr


def test_empty_validation_split_is_one_line(tmp_path):
    d = _folder(tmp_path, [], images=4)
    proc = cli_here("run", TINY, "data.source=imagefolder", f"data.path={d}", "data.val_fraction=0.1",
                   "data.partition=iid", f"run.output_dir={tmp_path}/runs")
    _one_line_error(proc, "empty validation split")


def test_run_directory_is_owned(tmp_path):
    """A fresh run refuses a directory that holds a run; a locked directory names its owner; run.name is plain."""
    from fed_ddp.rundir import RunLock

    run = tmp_path / "runs" / "taken"
    (run / "checkpoints" / "round_0001").mkdir(parents=True)
    (run / ".fed_ddp_run").write_text("{}\n")
    (run / "metrics.jsonl").write_text("{}\n")
    proc = cli_here("run", TINY, f"run.output_dir={tmp_path}/runs", "run.name=taken")
    _one_line_error(proc, "already holds a run", "run.resume=true", "run.overwrite=true")
    (run / ".fed_ddp_run").unlink()  # the same files without the marker: not ours, refused even with overwrite
    proc = cli_here("run", TINY, f"run.output_dir={tmp_path}/runs", "run.name=taken", "run.overwrite=true")
    _one_line_error(proc, "no fed_ddp run wrote", "neither overwrites nor deletes")
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    with RunLock(tmp_path / "runs" / "busy"):
        proc = cli_here("run", TINY, f"run.output_dir={tmp_path}/runs", "run.name=busy")
        _one_line_error(proc, "in use by host", "pid")
    for bad in ("..", ".hidden", "a/b"):
        _one_line_error(cli_here("run", TINY, f"run.name={bad}"), "run.name", "plain folder name")
