"""One sweep file, two drivers: the W&B agent's command and the SLURM array's grid points agree.

The W&B side is expanded with wandb's own macro code (``create_sweep_command_args``) the way
``wandb agent`` does it; ``fed-ddp run`` itself is replaced by a recorder (the launch is tested elsewhere).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from fed_ddp import sweep as sw
from fed_ddp.config import ConfigError, load_config

SCALING = ROOT / "configs" / "sweeps" / "scaling.yaml"


def agent_command(sweep: dict, point: dict) -> list[str]:
    """The argv ``wandb agent`` runs for one grid point (wandb_agent.Agent._command_run's expansion)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    argv = []
    for c in map(str, sweep["command"]):
        argv += macros.get(c[2:-1]) or [] if c.startswith("${") and c.endswith("}") else [c]
    return argv


def test_scaling_sweep_is_a_valid_grid():
    """Clients x LoRA rank x uplink codec; every point a valid config (needs the comm.uplink key)."""
    sweep = sw.load_sweep(SCALING)
    assert sweep["method"] == "grid" and sweep["metric"]["name"] == "val_loss"
    assert (ROOT / sweep["program"]).is_file()
    points = sw.grid(sweep)
    assert len(points) == 27 and {p["fed.num_clients"] for p in points} == {2, 4, 8}
    assert {p["lora.rank"] for p in points} == {4, 8, 16}
    assert {tuple(p["comm.uplink"]) for p in points} == {(), ("int8",), ("topk", "int8")}
    names = set()
    for i, point in enumerate(points):
        args = sw.point_args(sweep, i)  # loads and validates the config of every point
        cfg = load_config(args[0], args[1:])
        assert cfg.tracking.wandb.group == "scaling" and cfg.tracking.wandb.mode == "online"
        assert (cfg.fed.num_clients, cfg.lora.rank, cfg.comm.uplink) == tuple(point.values())
        names.add(cfg.run.name)
    assert len(names) == 27  # no two runs share a run directory


def test_wandb_agent_and_slurm_array_run_the_same_thing(monkeypatch):
    """For every grid point the W&B agent's argv and the SLURM array task's arguments are the same
    ``fed-ddp run`` call, and the codec list W&B writes (``['topk', 'int8']``) is the config's list."""
    sweep = sw.load_sweep(SCALING)
    calls = []
    monkeypatch.setattr("fed_ddp.cli.main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    for i, point in enumerate(sw.grid(sweep)):
        argv = agent_command(sweep, point)
        assert argv[:5] == ["/usr/bin/env", "python", "-m", "fed_ddp.sweep", "run"]
        assert sw.main(argv[4:]) == 0
        slurm = sw.point_args(sweep, i, env={"SLURM_ARRAY_JOB_ID": "abc123"})
        assert calls[-1] == ["run", *slurm]
    by_name = {c[-1]: c for c in calls}
    assert len(by_name) == 27
    topk = by_name["run.name=scaling-num_clients4-rank8-uplinktopk+int8-abc123"]
    assert "comm.uplink=['topk', 'int8']" in topk
    assert load_config(topk[1], topk[2:]).comm.uplink == ["topk", "int8"]
    assert "run.name=scaling-num_clients2-rank4-uplinkfp32-abc123" in by_name  # [] is dense fp32


def test_a_new_axis_is_one_line(tmp_path):
    text = SCALING.read_text().replace("parameters:\n", "parameters:\n  fed.strategy: {values: [fedavg, fedadam]}\n")
    (tmp_path / "s.yaml").write_text(text)
    sweep = sw.load_sweep(tmp_path / "s.yaml")
    assert len(sw.grid(sweep)) == 54
    assert sw.point_args(sweep, 53)[-1] == "run.name=scaling-strategyfedadam-num_clients8-rank16-uplinktopk+int8"


def test_run_names_are_file_names():
    env = {"SLURM_ARRAY_JOB_ID": "7"}
    tiny = str(ROOT / "configs" / "tiny_test.yaml")
    assert sw.run_name(tiny, ["lora.rank=4", "run.seed=3", "tracking.wandb.group=g"], env=env) == "g-rank4-7"
    assert sw.run_name(tiny, ["train.lr=1e-4"], env={}) == "sweep-lr1e-4"
    assert sw._value_slug("['topk', 'int8']") == sw._value_slug("[topk,int8]") == "topk+int8"
    assert sw._value_slug("[]") == "fp32" and sw._value_slug("a b/c") == "a_b_c"
    # two YAML files before the overrides (merged in order) are kept as files
    two = sw.with_run_name([tiny, tiny, "lora.rank=2"], env={})
    assert two == [tiny, tiny, "lora.rank=2", "run.name=sweep-rank2"]


def test_sweep_errors_are_one_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fed_ddp.sweep", *args], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    p = cli("point", str(SCALING), "27")
    assert p.returncode == 2 and p.stderr.strip() == (
        "fed-ddp: config error: index=27: the sweep has 27 grid points: use 0..26 (sbatch --array=0-26)")
    p = cli("count", str(SCALING))
    assert p.returncode == 0 and p.stdout.strip() == "27"
    bad = yaml.safe_load(SCALING.read_text())
    bad["parameters"]["comm.no_such_codec"] = {"values": ["int8"]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    p = cli("check", str(tmp_path / "bad.yaml"))
    assert p.returncode == 2 and p.stderr.strip() == "fed-ddp: config error: comm.no_such_codec='int8': unknown key"
    with pytest.raises(ConfigError, match="needs {values"):
        sw.grid({"parameters": {"train.lr": {"min": 0.001, "max": 0.1}}})
    with pytest.raises(ConfigError, match="args_no_hyphens"):
        sw.base_args({"command": ["${env}", "python", "-m", "fed_ddp.sweep", "run", "configs/quickstart.yaml"]})
