"""Tier 2: real ranks (1 server + 2 clients) over gloo, launched the way torchrun launches them.

The clients record every buffer they received and sent (tests/spy_rank.py); the test recomputes the
server's aggregate from those buffers on its own and compares with the server's checkpoints and its
byte counts.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def launch(nproc: int, args: list[str], env: dict) -> None:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.update(env)
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex[:8],
                       rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2)
    elastic_launch(cfg, sys.executable)(str(HERE / "spy_rank.py"), *args)


@pytest.fixture(scope="module")
def fedavg_run(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    spy = out / "spy"
    spy.mkdir()
    launch(3, [str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}",
               f"run.output_dir={out}", "run.name=fedavg", "fed.rounds=2", "fed.local_steps=2",
               "data.partition=dirichlet", "data.dirichlet_alpha=0.3", "eval.images_per_prompt=2"],
           {"FED_DDP_SPY_DIR": str(spy), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    return out / "fedavg", spy


def _messages(spy: Path, rank: int) -> list[dict]:
    files = sorted(spy.glob(f"rank{rank}_msg*.pt"), key=lambda p: int(p.stem.split("msg")[1]))
    return [torch.load(f) for f in files]


def test_server_global_is_sample_weighted_mean_of_client_deltas(fedavg_run):
    run_dir, spy = fedavg_run
    from fed_ddp.protocol import DOWN_HEADER, UP_FIELDS

    clients = [_messages(spy, r) for r in (1, 2)]
    assert all(len(m) == 3 for m in clients)  # 2 rounds + the stop message
    assert all(m[-1]["up"] is None and m[-1]["down"][0].item() == 1.0 for m in clients)
    nf = len(UP_FIELDS)
    for rnd in (1, 2):
        downs = [m[rnd - 1]["down"] for m in clients]
        assert torch.equal(downs[0], downs[1])  # both clients got the same global
        global_before = downs[0][DOWN_HEADER:].double().numpy()
        deltas = [m[rnd - 1]["up"][:-nf].double().numpy() for m in clients]
        counts = np.array([m[rnd - 1]["up"][-nf].item() for m in clients])
        assert counts[0] != counts[1]  # dirichlet(0.3): the weights really differ
        assert not np.allclose(deltas[0], deltas[1])  # different data, different updates
        expected = global_before + (counts[0] * deltas[0] + counts[1] * deltas[1]) / counts.sum()
        state = torch.load(run_dir / "checkpoints" / f"round_{rnd:04d}" / "server_state.pt", weights_only=False)
        np.testing.assert_allclose(state["global"].double().numpy(), expected, rtol=0, atol=1e-6)
        if rnd == 1:  # what round 2 started from is what round 1 ended with
            next_down = clients[0][1]["down"][DOWN_HEADER:]
            np.testing.assert_array_equal(next_down.numpy(), state["global"].numpy())


def test_bytes_counted_match_buffer_sizes(fedavg_run):
    run_dir, spy = fedavg_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] > 0 and "bytes_up" in r]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        msgs = [_messages(spy, rank)[r["round"] - 1] for rank in (1, 2)]
        sent_up = sum(m["up"].numel() * m["up"].element_size() for m in msgs)
        sent_down = sum(m["down"].numel() * m["down"].element_size() for m in msgs)
        assert r["bytes_up"] == sent_up
        assert r["bytes_down"] == sent_down
        assert set(r["num_examples"].values()) == {int(m["up"][-4].item()) for m in msgs}
