"""Distrust every update: screening, robust aggregators against numpy references, decoders that refuse
crafted messages, a round whose new adapter is not finite, and poisoned clients over real gloo ranks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fed_ddp.checkpoint import load_state
from fed_ddp.strategies import ClientUpdate, FedAvg, combine, screen
from fed_ddp.strategies.robust import lower_median

P = 50


def _u(cid, scale=1.0, n=10, seed=None, metrics=None):
    g = torch.Generator().manual_seed(cid if seed is None else seed)
    return ClientUpdate(cid, torch.randn(P, generator=g) * scale, n, metrics or {"train_loss": 0.1})


# ----------------------------------------------------------------------------- screening


def test_screen_rejects_each_kind_of_bad_update_with_its_reason():
    nan = _u(0)
    nan.delta[3] = float("nan")
    inf = _u(1)
    inf.delta[0] = float("inf")
    updates = [nan, inf, _u(2, n=10_000_000), _u(3, n=0), _u(4, n=-5), _u(5, scale=1e6),
               ClientUpdate(6, torch.zeros(P + 1), 10), _u(7, metrics={"train_loss": float("nan")}),
               _u(8), _u(9), _u(10)]
    kept, why = screen(updates, P, sizes=np.full(20, 100), norm_factor=10.0)
    assert [u.client_id for u in kept] == [8, 9, 10]
    assert "non-finite" in why[0] and "non-finite" in why[1]
    assert "10000000 examples, holds 100" in why[2] and "claims 0" in why[3] and "claims -5" in why[4]
    assert "median norm" in why[5] and "51 values" in why[6] and "metrics" in why[7]


def test_a_lone_update_is_measured_against_earlier_rounds():
    """With one update left there is no median to compare with: the median norm of earlier rounds serves."""
    lone = [_u(0, scale=1e6)]
    assert screen(lone, P, norm_factor=10.0)[0] == lone  # nothing to compare with
    kept, why = screen(lone, P, norm_factor=10.0, reference_norm=7.0)
    assert kept == [] and "median norm (70)" in why[0]
    assert screen([_u(1)], P, norm_factor=10.0, reference_norm=7.0)[0]  # an ordinary one passes


def test_an_infinite_example_count_is_a_bad_message_not_a_crash():
    from fed_ddp.compression import CommConfig
    from fed_ddp.protocol import UP_TAIL_BYTES, Wire

    wire = Wire(CommConfig(), [("w", (P,))])
    msg = wire.pack_uplink(3, torch.zeros(P), None, 10, {"train_loss": 0.0, "train_seconds": 0.0,
                                                          "client_seconds": 0.0})
    for bad in (float("inf"), float("-inf"), float("nan")):
        msg[-UP_TAIL_BYTES + 4:-UP_TAIL_BYTES + 8] = torch.tensor([bad], dtype=torch.float32).view(torch.uint8)
        with pytest.raises(ValueError, match="num_examples"):
            wire.unpack_uplink(msg)


def test_screen_absolute_bound_and_lower_median():
    kept, why = screen([_u(0), _u(1, scale=3.0)], P, max_norm=12.0)  # norms ~7 and ~21
    assert [u.client_id for u in kept] == [0] and "fed.max_update_norm=12" in why[1]
    kept, why = screen([_u(0), _u(1, scale=1e3)], P, norm_factor=10.0)  # two clients: the lower median holds
    assert [u.client_id for u in kept] == [0] and 1 in why
    assert lower_median([1.0, 5.0]) == 1.0 and lower_median([3.0, 1.0, 2.0]) == 2.0
    kept, _ = screen([_u(i) for i in range(5)], P, norm_factor=10.0)
    assert len(kept) == 5  # honest clients of similar norm all pass


# ----------------------------------------------------------------------------- robust aggregators


def test_aggregators_match_numpy():
    ups = [_u(i, n=i + 1) for i in range(7)]
    x = np.stack([u.delta.double().numpy() for u in ups])
    w = np.arange(1, 8) / 28
    np.testing.assert_allclose(combine(ups, "mean").double().numpy(), (w[:, None] * x).sum(0), atol=1e-6)
    np.testing.assert_allclose(combine(ups, "median").double().numpy(), np.median(x, axis=0), atol=1e-6)
    np.testing.assert_allclose(combine(ups[:6], "median").double().numpy(), np.median(x[:6], axis=0), atol=1e-6)
    s = np.sort(x, axis=0)
    np.testing.assert_allclose(combine(ups, "trimmed_mean", 0.2).double().numpy(), s[1:6].mean(0), atol=1e-6)
    norms = np.linalg.norm(x, axis=1)
    bound = np.sort(norms)[3]
    clipped = x * np.minimum(1.0, bound / norms)[:, None]
    np.testing.assert_allclose(combine(ups, "clipped_mean").double().numpy(), (w[:, None] * clipped).sum(0),
                               atol=1e-6)


@pytest.mark.parametrize("how, claimed", [("median", 10_000), ("trimmed_mean", 10_000), ("clipped_mean", 10)])
def test_one_attacker_of_five_moves_a_robust_aggregate_little(how, claimed):
    """Median and trimmed mean ignore the counts, so even a lying weight gains nothing; the clipped mean
    weighs by count (screening caps counts at what the client holds) and bounds the attacker's norm."""
    honest = [_u(i) for i in range(1, 5)]
    attack = ClientUpdate(0, torch.full((P,), 1e6), claimed)
    mean_h = torch.stack([u.delta for u in honest]).mean(0)
    spread = max(float((u.delta - mean_h).norm()) for u in honest)
    got = combine([attack, *honest], how, trim_fraction=0.2)
    assert float((got - mean_h).norm()) <= spread
    assert float((combine([attack, *honest], "mean") - mean_h).norm()) > 1e5  # the plain mean is captured


def test_strategies_use_the_configured_aggregator():
    ups = [_u(0, scale=1e6), _u(1), _u(2)]
    g = torch.zeros(P)
    new, _ = FedAvg(local_steps=1, lr=1e-3, aggregator="median").aggregate(1, g, ups)
    assert float(new.abs().max()) < 10


# ----------------------------------------------------------------------------- crafted messages


@pytest.mark.parametrize("uplink, field", [(["topk"], "indices"), (["segtopk"], "positions")])
def test_decoders_refuse_out_of_range_positions(uplink, field):
    from fed_ddp.compression import ChainState, CommConfig, uplink_chain

    chain = uplink_chain(CommConfig(uplink=uplink, topk_fraction=0.05, topk_block=64, min_numel=0),
                         [("a.lora_A", (40, 100))])
    msg = chain.encode(torch.randn(4000), ChainState())
    t = msg.pieces[0].fields[field]
    t[-1] = torch.iinfo(t.dtype).max if field == "indices" else 2**31 - 1
    with pytest.raises(ValueError, match="outside|positions"):
        chain.decode(chain.from_bytes(msg.to_bytes()))
    t[-1] = -1 if field == "indices" else -7
    with pytest.raises(ValueError):
        chain.decode(chain.from_bytes(msg.to_bytes()))


# ----------------------------------------------------------------------------- a non-finite round, in process


@pytest.mark.slow
def test_non_finite_global_is_rejected_and_enough_of_them_stop_the_run(tiny_base, tmp_path):
    from inproc_runs import TINY

    from fed_ddp.compression import layout_of
    from fed_ddp.config import load_config
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.lora import attach_lora
    from fed_ddp.diffusion.models import load_pipeline, training_scheduler
    from fed_ddp.protocol import Wire
    from fed_ddp.server import Server
    from fed_ddp.tracking import JsonlLogger, MultiLogger
    from fed_ddp.transport import InMemoryTransport
    from fed_ddp.worker import Worker

    class Exploding(FedAvg):
        def aggregate(self, rnd, global_state, updates):
            new, m = super().aggregate(rnd, global_state, updates)
            return (new * float("inf") if rnd >= 2 else new), m

    cfg = load_config(TINY, [f"model.pretrained={tiny_base}", f"run.output_dir={tmp_path}", "run.name=boom",
                             "fed.rounds=5", "fed.local_steps=1", "fed.max_bad_rounds=2", "eval.images_per_prompt=1",
                             "eval.inference_steps=1", "eval.sample_seeds=[0]", "eval.every=100", "lora.rank=2"])
    pipe = load_pipeline(str(tiny_base), torch.device("cpu"))
    attach_lora(pipe.unet, cfg.lora, seed=0)
    data = build_federated_data(cfg)
    wire = Wire(cfg.comm, layout_of(pipe.unet))
    worker = Worker(0, cfg, pipe, training_scheduler(pipe), data, wire)
    cfg.run.dir.mkdir(parents=True)
    server = Server(cfg, pipe, training_scheduler(pipe), data, Exploding(local_steps=1, lr=1e-3),
                    InMemoryTransport([worker.handle]), MultiLogger(JsonlLogger(cfg.run.dir / "metrics.jsonl")),
                    str(tiny_base), wire=wire)
    with pytest.raises(RuntimeError, match=r"2 rounds in a row .*\(fed.max_bad_rounds=2\)"):
        server.run()
    g = {r: load_state(cfg.run.dir / "checkpoints" / f"round_{r:04d}")["global"]
         for r in (1, 2)}
    assert torch.isfinite(g[1]).all() and torch.equal(g[1], g[2])  # round 2 rejected: round 1's adapter kept
    assert not (cfg.run.dir / "checkpoints" / "round_0003").exists()  # the run stopped in round 3
    rows = [json.loads(x) for x in (cfg.run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r.get("round_rejected")] == [2]


# ----------------------------------------------------------------------------- poisoned clients over gloo

ATTACK_ARGS = ["fed.num_clients=7", "fed.workers=2", "fed.rounds=2", "fed.local_steps=2", "data.partition=iid",
               "comm.uplink=[topk]", "comm.topk_fraction=0.05", "comm.min_numel=0", "lora.rank=4",
               "eval.images_per_prompt=1", "eval.inference_steps=1", "eval.sample_seeds=[0]"]


def _poisoned(tiny_base, out, name, attacks, extra):
    from test_distributed import HERE, ROOT

    spy = out / f"spy_{name}"
    spy.mkdir()
    env = {"FED_DDP_SPY_DIR": str(spy), "FED_DDP_ATTACKS": attacks,
           "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    import forked_rank

    os.environ.update(env)
    forked_rank.launch("poison_rank", 3, [str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}",
                                          f"run.output_dir={out}", f"run.name={name}", *ATTACK_ARGS, *extra])
    os.environ.pop("FED_DDP_ATTACKS")
    return out / name, spy


@pytest.mark.slow
def test_poisoned_clients_are_excluded_and_the_run_completes(tiny_base, tmp_path):
    """NaN, a lying count, a negative count, an out-of-range index and a 1e6 x update (clients 0-4) against
    two honest clients (5, 6): each attacker is rejected with its reason every round, the run ends normally
    and the global adapter is exactly the honest clients' sample-weighted mean."""
    from test_distributed import _messages, _wire_and_init

    run_dir, spy = _poisoned(tiny_base, tmp_path, "attacked", "0:nan,1:count,2:index,3:huge,4:negative", [])
    wire, prev = _wire_and_init(run_dir)
    rows = {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("clients")}
    for rnd in (1, 2):
        rej = rows[rnd]["clients"]["rejected"]
        assert sorted(map(int, rej)) == [0, 1, 2, 3, 4], rej
        assert "non-finite" in rej["0"] and "10000000 examples" in rej["1"] and "undecodable" in rej["2"]
        assert "median norm" in rej["3"] and "claims -5" in rej["4"]
        honest = {}
        for rank in (1, 2):
            m = _messages(spy, rank)[rnd - 1]
            h = wire.unpack_head(m["head"])
            table, _ = wire.unpack_body(m["body"], h.slots)
            for cid, msg in zip(table[rank - 1], wire.split_uplink(m["up"], len(table[rank - 1]))):
                if cid in (5, 6):
                    honest[cid] = wire.unpack_uplink(msg)
        n = np.array([honest[c].num_examples for c in (5, 6)], dtype=np.float64)
        expected = prev.numpy() + (n[0] * honest[5].delta.double().numpy() + n[1] * honest[6].delta.double().numpy()
                                   ) / n.sum()
        got = load_state(run_dir / "checkpoints" / f"round_{rnd:04d}")["global"]
        assert torch.isfinite(got).all()
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=1e-6)
        prev = got.double()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sampling"]["rejected_updates"] == 10


@pytest.mark.slow
def test_median_holds_against_one_huge_attacker_of_five_when_screening_is_off(tiny_base, tmp_path):
    from test_distributed import _wire_and_init

    run_dir, spy = _poisoned(tiny_base, tmp_path, "median", "0:huge",
                             ["fed.num_clients=5", "fed.rounds=1", "fed.norm_factor=0", "fed.aggregator=median",
                              "comm.uplink=[]"])
    _, prev = _wire_and_init(run_dir)
    honest = torch.stack([torch.load(next(spy.glob(f"fit_rank*_round1_client{c}.pt"))).double() for c in (1, 2, 3, 4)])
    mean_h = honest.mean(0)
    spread = max(float((d - mean_h).norm()) for d in honest)
    got = load_state(run_dir / "checkpoints" / "round_0001")["global"].double()
    assert float((got - prev - mean_h).norm()) <= spread
    row = next(r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("clients"))
    assert row["clients"]["rejected"] == {}  # nothing screened out: the median alone held


def test_a_planted_pickle_is_never_loaded(tmp_path):
    """Checkpoints are read as safetensors only: a pickle planted as the old server_state.pt is ignored, and its
    payload never runs."""
    import pickle

    from fed_ddp.checkpoint import latest_checkpoint, load_state

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = tmp_path / "run" / "checkpoints" / "round_0003"
    ckpt.mkdir(parents=True)
    (ckpt / "server_state.pt").write_bytes(pickle.dumps(Payload()))
    assert latest_checkpoint(tmp_path / "run") == ckpt
    with pytest.raises(FileNotFoundError, match="server_state.safetensors"):
        load_state(ckpt)
    assert not marker.exists()


def test_non_finite_hyperparameters_are_refused():
    from fed_ddp.config import ConfigError, load_config

    for key in ("train.lr=inf", "train.lr=nan", "fed.server_lr=inf"):
        with pytest.raises(ConfigError, match="finite"):
            load_config(None, [key])
