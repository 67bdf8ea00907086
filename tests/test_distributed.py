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


TINY_ARGS = ["fed.rounds=2", "fed.local_steps=2", "data.partition=dirichlet", "data.dirichlet_alpha=0.3",
             "eval.images_per_prompt=2", "eval.inference_steps=2", "eval.sample_seeds=[0]"]
# every codec at least once, on both directions; min_numel=0 so even the tiny adapter's tensors compress
CHAINS = {
    "dense": [],
    "topk_int8": ["comm.uplink=[topk,int8]", "comm.downlink=[fp16]", "comm.topk_fraction=0.25"],
    "lowrank_bf16": ["comm.uplink=[lowrank,bf16]", "comm.downlink=[int8]", "comm.lowrank_rank=2", "comm.gather=p2p"],
    "randomk_int4": ["comm.uplink=[randomk,int4]", "comm.downlink=[bf16]", "comm.stochastic_rounding=true",
                     "comm.block_size=16"],
    "segtopk_int4": ["comm.uplink=[segtopk,int4]", "comm.downlink=[fp16]", "comm.topk_fraction=0.09",
                     "comm.topk_block=64"],  # the >= 32x chain of the codec benchmark
}


def _run(tiny_base, out: Path, name: str, extra: list[str]) -> tuple[Path, Path]:
    spy = out / f"spy_{name}"
    spy.mkdir()
    args = [str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}", f"run.output_dir={out}",
            f"run.name={name}", *TINY_ARGS, *(["comm.min_numel=0", *extra] if extra else [])]
    launch(3, args, {"FED_DDP_SPY_DIR": str(spy),
                     "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    return out / name, spy


@pytest.fixture(scope="module")
def chain_runs(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return {name: _run(tiny_base, out, name, extra) for name, extra in CHAINS.items()}


@pytest.fixture(scope="module")
def fedavg_run(chain_runs):
    return chain_runs["dense"]


def _messages(spy: Path, rank: int) -> list[dict]:
    files = sorted(spy.glob(f"rank{rank}_msg*.pt"), key=lambda p: int(p.stem.split("msg")[1]))
    return [torch.load(f) for f in files]


def _wire_and_init(run_dir: Path):
    """The run's Wire and initial adapter, rebuilt here from its saved config and the base model."""
    from fed_ddp.compression import layout_of
    from fed_ddp.config import load_config
    from fed_ddp.diffusion.lora import attach_lora, get_flat
    from fed_ddp.diffusion.models import load_pipeline
    from fed_ddp.protocol import Wire

    cfg = load_config(run_dir / "config.yaml")
    pipe = load_pipeline(cfg.model.pretrained, torch.device("cpu"), cfg.model.revision)
    attach_lora(pipe.unet, cfg.lora, seed=cfg.run.seed)
    return Wire(cfg.comm, layout_of(pipe.unet)), get_flat(pipe.unet).double()


@pytest.mark.parametrize("name", list(CHAINS))
def test_server_aggregate_is_weighted_mean_of_decoded_uplinks(chain_runs, name):
    """Under every codec chain the server's new global = old global + sample-weighted mean of what the
    clients' buffers decode to (decoded here, on their own), and clients saw the global within the
    downlink codec's error."""
    run_dir, spy = chain_runs[name]
    wire, prev = _wire_and_init(run_dir)
    clients = [_messages(spy, r) for r in (1, 2)]
    assert all(len(m) == 3 for m in clients)  # 2 rounds + the stop message
    assert all(m[-1]["up"] is None for m in clients)
    for rnd in (1, 2):
        downs = [m[rnd - 1]["down"] for m in clients]
        assert torch.equal(downs[0], downs[1])  # both clients got the same bytes
        assert downs[0].numel() == wire.down_nbytes
        stop, plan, seen = wire.unpack_downlink(downs[0])
        assert not stop and plan.round == rnd
        tol = 0 if not wire.down.codecs else 2e-2 * prev.abs().max().item()
        assert (seen.double() - prev).abs().max().item() <= tol
        ups = [wire.unpack_uplink(m[rnd - 1]["up"], c) for c, m in enumerate(clients)]
        assert all(m[rnd - 1]["up"].numel() == wire.up_nbytes for m in clients)
        counts = np.array([u.num_examples for u in ups])
        assert counts[0] != counts[1]  # dirichlet(0.3): the weights really differ
        deltas = [u.delta.double().numpy() for u in ups]
        assert not np.allclose(deltas[0], deltas[1])  # different data, different updates
        expected = prev.numpy() + (counts[0] * deltas[0] + counts[1] * deltas[1]) / counts.sum()
        state = torch.load(run_dir / "checkpoints" / f"round_{rnd:04d}" / "server_state.pt", weights_only=False)
        np.testing.assert_allclose(state["global"].double().numpy(), expected, rtol=0, atol=1e-6)
        prev = state["global"].double()


def test_bytes_counted_match_buffer_sizes(chain_runs):
    for name, (run_dir, spy) in chain_runs.items():
        _, init = _wire_and_init(run_dir)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in rows if r["round"] > 0 and "bytes_up" in r]
        assert [r["round"] for r in rounds] == [1, 2]
        for r in rounds:
            msgs = [_messages(spy, rank)[r["round"] - 1] for rank in (1, 2)]
            sent_up = sum(m["up"].numel() * m["up"].element_size() for m in msgs)
            sent_down = sum(m["down"].numel() * m["down"].element_size() for m in msgs)
            assert r["bytes_up"] == r["comm"]["up"]["moved"] == sent_up, name
            assert r["bytes_down"] == r["comm"]["down"]["moved"] == sent_down, name
            up = r["comm"]["up"]
            assert up["payload"] + up["metadata"] == sent_up and up["padding"] == up["sizes"] == 0, name
            assert up["vs_dense_lora"] == pytest.approx(2 * 4 * init.numel() / sent_up), name
            assert up["vs_full_unet"] > up["vs_dense_lora"], name
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["comm"]["up"]["moved"] == summary["bytes_up_total"] == sum(r["bytes_up"] for r in rounds)
    dense, topk = (json.loads((chain_runs[n][0] / "summary.json").read_text()) for n in ("dense", "topk_int8"))
    assert topk["comm"]["up"]["vs_dense_lora"] > 5
    assert 0.99 < dense["comm"]["up"]["vs_dense_lora"] < 1  # dense fp32 plus the 16 B of protocol fields


def test_error_feedback_sent_plus_residual_is_true_delta_sum(chain_runs):
    """Top-k: what the client sent over two rounds plus the residual it keeps (checkpointed in the run
    directory) equals the sum of the deltas it really trained (recorded by the spy)."""
    from fed_ddp.compression import ChainState

    run_dir, spy = chain_runs["topk_int8"]
    wire, _ = _wire_and_init(run_dir)
    msgs = _messages(spy, 1)
    sent = sum(wire.unpack_uplink(msgs[r]["up"], 0).delta.double() for r in (0, 1))
    true = sum(torch.load(spy / f"fit_rank1_round{r}.pt").double() for r in (1, 2))
    saved = torch.load(run_dir / "clients" / "client_000" / "comm_state_round_0002.pt", weights_only=False)
    assert saved["round"] == 2
    state = ChainState()
    state.load_state_dict(saved["state"])
    residual = torch.cat([state.residual[n].reshape(-1) for n, _ in wire.up.layout]).double()
    assert residual.abs().max() > 0  # top-k 25 % really left something behind
    torch.testing.assert_close(sent + residual, true, rtol=0, atol=1e-5)
