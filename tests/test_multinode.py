"""Two torchrun agents ("nodes") on loopback, launched by launch/multi_node.sh, give the same run as one node.

World of 3 ranks (1 server + 2 workers): node rank 0 runs 2 of them and node rank 1 runs 1 (torchrun
agents may run different numbers of workers). The same config through launch/single_node.sh runs at
the same time; the final adapters must be bit-identical and the metrics equal except for timings.

Both use a strategy and a callback from files outside the package (examples/fedema.py, examples/probes.py,
named by run.plugins and run.callbacks): user code reaches every rank under plain torchrun too, and the
single-node launch gives the adapter the same config gives in-process (test_plugins checks that rule against
numpy).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid

import pytest
import yaml
from conftest import ROOT

from fed_ddp.checkpoint import load_state

pytestmark = pytest.mark.slow
TINY = str(ROOT / "configs" / "tiny_test.yaml")
PLUGIN = [f"run.plugins=[{ROOT / 'examples' / 'fedema.py'}]", "fed.strategy=fedema", "fed.strategy_args.beta=0.5",
          f"run.callbacks=[{ROOT / 'examples' / 'probes.py'}:DeltaNorm]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK")}
    return {**env, "FED_DDP_PYTHON": sys.executable, **extra}


@pytest.fixture(scope="module")
def two_launches(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    args = [TINY, f"model.pretrained={tiny_base}", f"run.output_dir={out}", "fed.local_steps=2",
            "eval.images_per_prompt=2", "eval.inference_steps=2", "eval.sample_seeds=[0]",
            "data.partition=dirichlet", "data.dirichlet_alpha=0.3", *PLUGIN]
    rdzv = {"NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}", "RDZV_ID": uuid.uuid4().hex[:8]}
    procs = {
        "single": subprocess.Popen(["bash", "launch/single_node.sh", *args, "run.name=single"], cwd=ROOT,
                                   env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        **{f"node{i}": subprocess.Popen(["bash", "launch/multi_node.sh", *args, "run.name=multi"], cwd=ROOT,
                                        env=_env(NODE_RANK=str(i), **rdzv), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True) for i in (0, 1)},
    }
    logs, codes = {}, {}
    try:
        for name, p in procs.items():
            logs[name], _ = p.communicate(timeout=420)
            codes[name] = p.returncode
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return out, codes, logs


def _ranks(log: str) -> set[str]:
    return set(re.findall(r"\[(server|worker\d+) r(\d+)\]", log))


def test_both_launches_succeed_and_ranks_are_spread(two_launches):
    _, codes, logs = two_launches
    assert codes == {"single": 0, "node0": 0, "node1": 0}, {k: v[-2000:] for k, v in logs.items()}
    assert "ranks per node 2 1" in logs["node0"]
    on0, on1 = _ranks(logs["node0"]), _ranks(logs["node1"])
    assert len(on0) == 2 and len(on1) == 1, (on0, on1)
    assert on0 | on1 == {("server", "0"), ("worker0", "1"), ("worker1", "2")} == _ranks(logs["single"])


def test_same_adapter_and_metrics_as_one_node(two_launches):
    import torch

    out, codes, _ = two_launches
    assert set(codes.values()) == {0}
    for ckpt in ("round_0001", "round_0002", "final"):
        a, b = (load_state(out / run / "checkpoints" / ckpt)["global"]
                for run in ("single", "multi"))
        assert a.numel() > 0 and torch.equal(a, b), f"{ckpt}: max difference {(a - b).abs().max()}"

    def rows(run):
        rs = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
        for r in rs:
            r.pop("seconds", None)
            r.pop("train_seconds", None)  # wall clocks differ between launches
            r.pop("started_at", None)
            r.pop("base_eval_cached", None)  # the second launch may reuse the first's base evaluation
        return rs

    single, multi = rows("single"), rows("multi")
    assert [r["round"] for r in single] == [0, 1, 2]  # base, two rounds (the final evaluation: summary.json)
    assert single == multi
    assert single[1]["num_examples"]["0"] != single[1]["num_examples"]["1"]  # clients really differ


@pytest.mark.usefixtures("registries_restored")
def test_a_plugin_under_plain_torchrun_gives_the_in_process_adapter(two_launches, tmp_path):
    import torch
    from safetensors.torch import load_file

    import fed_ddp

    out, codes, logs = two_launches
    assert codes["single"] == 0, logs["single"][-2000:]
    saved = out / "single" / "config.yaml"  # what the ranks ran: the plug-in's names and settings included
    assert yaml.safe_load(saved.read_text())["fed"]["strategy"] == "fedema"
    summary = fed_ddp.run(saved, [f"run.output_dir={tmp_path}", "run.name=here"], launch="inprocess")
    assert summary.rounds == 2
    a, b = (load_file(d / "checkpoints" / "final" / "pytorch_lora_weights.safetensors")
            for d in (out / "single", tmp_path / "here"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (out / "single" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step_norm"] > 0 for r in rows if r["round"] > 0)  # the callback ran on the server rank


def test_launch_errors_are_one_line(tmp_path):
    def run(cmd, **env):
        return subprocess.run(["bash", *cmd], check=False, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=120)

    p = run(["launch/multi_node.sh", TINY])
    assert p.returncode == 2 and "NNODES is not set" in p.stderr
    p = run(["launch/multi_node.sh", TINY], NNODES="4", NODE_RANK="0", RDZV_ENDPOINT="127.0.0.1:1")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        ("fed-ddp: config error: --nnodes=4: a world of 3 ranks (1 server + 2 workers) for 2 clients cannot fill "
         "4 nodes; use at most 3 nodes or raise fed.workers")]
    p = run(["launch/single_node.sh", TINY, "fed.num_clients=0"])
    assert p.returncode == 2 and p.stderr.strip() == "fed-ddp: config error: fed.num_clients=0: must be in [1, 10,000,000]"


def test_ranks_per_node():
    from fed_ddp.config import ConfigError
    from fed_ddp.distributed.nodes import plan, procs_per_node

    assert procs_per_node(3, 1) == [3]
    assert procs_per_node(3, 2) == [2, 1]
    assert procs_per_node(9, 4) == [3, 2, 2, 2]
    assert procs_per_node(4, 4) == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="cannot fill 5 nodes"):
        procs_per_node(4, 5)
    counts, text = plan(TINY, ["fed.num_clients=5"], nnodes=2, gpus=3)  # 6 ranks on 2 nodes x 3 GPUs: fits
    assert counts == [3, 3] and "3 GPU(s) per node" in text
    with pytest.raises(ConfigError, match="4 ranks on a node with 3 GPU"):
        plan(TINY, ["fed.num_clients=6"], nnodes=2, gpus=3)
    assert plan(TINY, ["fed.num_clients=6", "train.device=cpu"], nnodes=2, gpus=3)[0] == [4, 3]  # CPU ranks: no limit


def test_fed_ddp_run_refuses_more_ranks_than_gpus(monkeypatch, capsys):
    """`fed-ddp run` on one node checks ranks vs GPUs the way the launch scripts do: one line, nothing started."""
    from fed_ddp import cli

    monkeypatch.setattr("fed_ddp.distributed.nodes.local_gpus", lambda: 2)
    monkeypatch.setattr("fed_ddp.diffusion.models.base_path", lambda *a, **k: pytest.fail("must not get this far"))
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert cli.main(["run", TINY]) == 2
    assert capsys.readouterr().err.strip() == (
        "fed-ddp: config error: fed.workers=2: 3 ranks on a node with 2 GPU(s): NCCL needs one GPU per rank; "
        "use more nodes, more GPUs per node, fewer workers, or train.device=cpu")
