"""Tier 2: real ranks (1 server + 2 clients) over gloo, launched the way torchrun launches them.

The clients record every buffer they received and sent (tests/spy_rank.py); the test recomputes the
server's aggregate from those buffers on its own and compares with the server's checkpoints and its
byte counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fed_ddp.checkpoint import load_state

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def launch(nproc: int, args: list[str], env: dict) -> None:
    """``torchrun --nproc-per-node NPROC tests/spy_rank.py ARGS`` with ENV (forked_rank.launch: forked ranks)."""
    import forked_rank

    os.environ.update(env)
    forked_rank.launch("spy_rank", nproc, args)


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


# the same aggregation test under a non-SD family: Flux's transformer, its default targets, a compressed uplink
FAMILY_CHAINS = {"flux_topk_int8": ("flux", ["model.family=flux", "comm.uplink=[topk,int8]", "comm.downlink=[fp16]",
                                             "comm.topk_fraction=0.25"])}


def _run(tiny_base, out: Path, name: str, extra: list[str]) -> tuple[Path, Path]:
    spy = out / f"spy_{name}"
    spy.mkdir()
    args = [str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}", f"run.output_dir={out}",
            f"run.name={name}", *TINY_ARGS, *(["comm.min_numel=0", *extra] if extra else [])]
    launch(3, args, {"FED_DDP_SPY_DIR": str(spy),
                     "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    return out / name, spy


@pytest.fixture(scope="module")
def chain_runs(tiny_base, family_base, tmp_path_factory, dense_chain_run):
    out = tmp_path_factory.mktemp("dist")
    runs = {"dense": dense_chain_run}  # launched once per session: test_deepspeed's reference too (conftest.py)
    runs.update({name: _run(tiny_base, out, name, extra) for name, extra in CHAINS.items() if name != "dense"})
    runs.update({name: _run(family_base(fam), out, name, extra) for name, (fam, extra) in FAMILY_CHAINS.items()})
    return runs


@pytest.fixture(scope="module")
def fedavg_run(chain_runs):
    return chain_runs["dense"]


def dense_global(msg: dict, workers: int) -> torch.Tensor:
    """The global adapter in a recorded downlink whose chain is dense fp32: the body after the table."""
    slots = int(msg["head"].clone().view(torch.float32)[5].item())
    return msg["body"][8 * workers * slots:].clone().view(torch.float32)


def _messages(spy: Path, rank: int) -> list[dict]:
    files = sorted(spy.glob(f"rank{rank}_msg*.pt"), key=lambda p: int(p.stem.split("msg")[1]))
    return [torch.load(f) for f in files]


def _wire_and_init(run_dir: Path):
    """The run's Wire and initial adapter, rebuilt here from its saved config and the base model."""
    from fed_ddp.compression import layout_of
    from fed_ddp.config import load_config
    from fed_ddp.diffusion.families import denoiser
    from fed_ddp.diffusion.lora import attach_lora, get_flat
    from fed_ddp.diffusion.models import load_pipeline
    from fed_ddp.protocol import Wire

    cfg = load_config(run_dir / "config.yaml")
    pipe = load_pipeline(cfg.model.pretrained, torch.device("cpu"), cfg.model.revision)
    attach_lora(denoiser(pipe), cfg.lora, seed=cfg.run.seed)
    return Wire(cfg.comm, layout_of(denoiser(pipe)), cfg.fed.num_workers), get_flat(denoiser(pipe)).double()


@pytest.mark.parametrize("name", [*CHAINS, *FAMILY_CHAINS])
def test_server_aggregate_is_weighted_mean_of_decoded_uplinks(chain_runs, name):
    """Under every codec chain the server's new global = old global + sample-weighted mean of what the
    clients' buffers decode to (decoded here, on their own), and clients saw the global within the
    downlink codec's error."""
    run_dir, spy = chain_runs[name]
    wire, prev = _wire_and_init(run_dir)
    workers = [_messages(spy, r) for r in (1, 2)]
    assert all(len(m) == 2 for m in workers)  # 2 rounds (the stop head asks for no answer)
    for rnd in (1, 2):
        msgs = [m[rnd - 1] for m in workers]
        assert torch.equal(msgs[0]["head"], msgs[1]["head"]) and torch.equal(msgs[0]["body"], msgs[1]["body"])
        head = wire.unpack_head(msgs[0]["head"])
        assert not head.stop and head.plan.round == rnd and head.slots == 1
        table, seen = wire.unpack_body(msgs[0]["body"], head.slots)
        assert table == [[0], [1]]  # N = W = m: worker w plays client w, as before populations
        tol = 0 if not wire.down.codecs else 2e-2 * prev.abs().max().item()
        assert (seen.double() - prev).abs().max().item() <= tol
        assert all(m["up"].numel() == wire.up_nbytes for m in msgs)
        ups = [wire.unpack_uplink(m["up"]) for m in msgs]
        assert [u.client_id for u in ups] == [0, 1]
        counts = np.array([u.num_examples for u in ups])
        assert counts[0] != counts[1]  # dirichlet(0.3): the weights really differ
        deltas = [u.delta.double().numpy() for u in ups]
        assert not np.allclose(deltas[0], deltas[1])  # different data, different updates
        expected = prev.numpy() + (counts[0] * deltas[0] + counts[1] * deltas[1]) / counts.sum()
        state = load_state(run_dir / "checkpoints" / f"round_{rnd:04d}")
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
            sent_up = sum(m["up"].numel() for m in msgs)
            sent_down = sum(m["head"].numel() + m["body"].numel() for m in msgs)
            cluster, air = r["comm"]["cluster"], r["comm"]["air"]
            assert r["bytes_up"] == cluster["up"]["moved"] == sent_up, name
            assert r["bytes_down"] == cluster["down"]["moved"] == sent_down, name
            assert cluster["up"]["padding"] == cluster["up"]["sizes"] == 0, name
            up = air["up"]  # one message per client; here one client per worker, so the same bytes
            assert up["messages"] == 2 and up["payload"] + up["metadata"] == up["total"] == sent_up, name
            assert up["vs_dense_lora"] == pytest.approx(2 * 4 * init.numel() / sent_up), name
            assert up["vs_full_unet"] > up["vs_dense_lora"], name
            down = air["down"]  # what the 2 clients need: plan fields + the global adapter (no assignment table)
            assert down["messages"] == 2 and down["total"] == 2 * (20 + msgs[0]["body"].numel() - 8 * 2), name
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["comm"]["cluster"]["up"]["moved"] == summary["bytes_up_total"] == sum(r["bytes_up"] for r in rounds)
    dense, topk = (json.loads((chain_runs[n][0] / "summary.json").read_text()) for n in ("dense", "topk_int8"))
    assert topk["comm"]["air"]["up"]["vs_dense_lora"] > 5
    assert 0.99 < dense["comm"]["air"]["up"]["vs_dense_lora"] < 1  # dense fp32 plus the 20 B of protocol fields


def test_error_feedback_sent_plus_residual_is_true_delta_sum(chain_runs):
    """Top-k: what the client sent over two rounds plus the residual it keeps (checkpointed in the run
    directory) equals the sum of the deltas it really trained (recorded by the spy)."""
    from fed_ddp.compression import ChainState
    from fed_ddp.population import ClientStateStore

    run_dir, spy = chain_runs["topk_int8"]
    wire, _ = _wire_and_init(run_dir)
    msgs = _messages(spy, 1)
    sent = sum(wire.unpack_uplink(msgs[r]["up"]).delta.double() for r in (0, 1))
    true = sum(torch.load(spy / f"fit_rank1_round{r}_client0.pt").double() for r in (1, 2))
    state = ChainState()
    rnd, tensors, meta = ClientStateStore(run_dir / "clients").load(0, max_round=2)
    assert rnd == 2
    state.load_tensors(tensors, meta)
    residual = torch.cat([state.residual[n].reshape(-1) for n, _ in wire.up.layout]).double()
    assert residual.abs().max() > 0  # top-k 25 % really left something behind
    torch.testing.assert_close(sent + residual, true, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- a population on 2 workers

POP_ARGS = ["fed.num_clients=12", "fed.clients_per_round=5", "fed.workers=2", "fed.rounds=3", "fed.local_steps=2",
            "data.partition=dirichlet", "data.dirichlet_alpha=0.5", "comm.uplink=[topk,int8]",
            "comm.topk_fraction=0.25", "comm.min_numel=0", "eval.images_per_prompt=2", "eval.inference_steps=2",
            "eval.sample_seeds=[0]"]


@pytest.fixture(scope="module")
def population_run(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("pop")
    spy = out / "spy"
    spy.mkdir()
    launch(3, [str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}", f"run.output_dir={out}",
               "run.name=pop", *POP_ARGS],
           {"FED_DDP_SPY_DIR": str(spy), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    return out / "pop", spy


def _sampled_by_seed(seed: int, rnd: int, n: int, m: int) -> list[int]:
    """Uniform sampling as documented: m of n without replacement from numpy's stream keyed (seed, round, 2)."""
    return sorted(np.random.default_rng([seed, rnd, 2]).choice(n, size=m, replace=False).tolist())


def test_population_round_is_weighted_mean_of_exactly_the_sampled_clients(population_run):
    """N = 12, m = 5, W = 2: each round the server's new global = old + the sample-weighted mean of the 5
    sampled clients' decoded messages (decoded here), the clients are those the seed says, each sent by the
    worker the table names; over the air 5 messages, in the cluster what the gather really moved."""
    run_dir, spy = population_run
    wire, prev = _wire_and_init(run_dir)
    assert wire.workers == 2
    rows = {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "seconds" in r}
    workers = [_messages(spy, r) for r in (1, 2)]
    assert all(len(m) == 3 for m in workers)
    for rnd in (1, 2, 3):
        want = _sampled_by_seed(0, rnd, 12, 5)
        head = wire.unpack_head(workers[0][rnd - 1]["head"])
        table, _ = wire.unpack_body(workers[0][rnd - 1]["body"], head.slots)
        assert sorted(table[0] + table[1]) == want and sorted(len(t) for t in table) == [2, 3]  # balanced
        assert rows[rnd]["clients"]["sampled"] == want == rows[rnd]["clients"]["arrived"]
        updates = []
        for w in (0, 1):
            up = workers[w][rnd - 1]["up"]
            assert up.numel() == len(table[w]) * wire.up_nbytes
            for cid, msg in zip(table[w], wire.split_uplink(up, len(table[w]))):
                u = wire.unpack_uplink(msg)
                assert u.client_id == cid
                updates.append(u)
        counts = np.array([u.num_examples for u in updates], dtype=np.float64)
        assert len(set(counts)) > 1  # the weights really differ
        expected = prev.numpy() + sum(c * u.delta.double().numpy() for c, u in zip(counts, updates)) / counts.sum()
        state = load_state(run_dir / "checkpoints" / f"round_{rnd:04d}")
        np.testing.assert_allclose(state["global"].double().numpy(), expected, rtol=0, atol=1e-6)
        prev = state["global"].double()
        air, cluster = rows[rnd]["comm"]["air"], rows[rnd]["comm"]["cluster"]
        assert air["up"]["messages"] == 5 and air["up"]["total"] == 5 * wire.up_nbytes
        sent = sum(workers[w][rnd - 1]["up"].numel() for w in (0, 1))
        padding = 2 * max(len(t) for t in table) * wire.up_nbytes - sent  # native gather pads to the largest
        assert cluster["up"]["moved"] == sent + padding and cluster["up"]["padding"] == padding
        assert rows[rnd]["bytes_up"] == cluster["up"]["moved"]


def test_population_client_keeps_its_residual_across_a_skipped_round(population_run):
    """A client sampled in rounds 1 and 3 but not 2 starts round 3 with its round-1 residual, whichever
    worker plays it: what it sent in rounds 1 and 3 plus the residual it keeps equals what it trained."""
    from fed_ddp.compression import ChainState
    from fed_ddp.population import ClientStateStore

    run_dir, spy = population_run
    wire, _ = _wire_and_init(run_dir)
    s1, s2, s3 = (set(_sampled_by_seed(0, r, 12, 5)) for r in (1, 2, 3))
    skippers = sorted((s1 & s3) - s2)
    assert skippers, "seed 0 must sample some client in rounds 1 and 3 only"
    sent = {}
    for rank in (1, 2):
        for rnd, m in enumerate(_messages(spy, rank), start=1):
            head = wire.unpack_head(m["head"])
            table, _ = wire.unpack_body(m["body"], head.slots)
            for cid, msg in zip(table[rank - 1], wire.split_uplink(m["up"], len(table[rank - 1]))):
                sent[(cid, rnd)] = wire.unpack_uplink(msg).delta.double()
    store = ClientStateStore(run_dir / "clients")
    for c in skippers:
        trained = sum(torch.load(next(spy.glob(f"fit_rank*_round{r}_client{c}.pt"))).double() for r in (1, 3))
        rnd, tensors, meta = store.load(c, max_round=3)
        assert rnd == 3 and store.rounds(c) == [1, 3]  # the newest state and the one before it
        state = ChainState()
        state.load_tensors(tensors, meta)
        residual = torch.cat([state.residual[n].reshape(-1) for n, _ in wire.up.layout]).double()
        torch.testing.assert_close(sent[(c, 1)] + sent[(c, 3)] + residual, trained, rtol=0, atol=1e-5)
        # without the round-1 residual, round 3 alone would not add up
        assert (sent[(c, 3)] + residual - torch.load(next(spy.glob(f"fit_rank*_round3_client{c}.pt")))).abs().max() > 1e-4
    never = set(range(12)) - s1 - s2 - s3
    assert all(store.rounds(c) == [] for c in never)  # disk grows only with clients that took part
