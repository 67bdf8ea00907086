"""The population, without processes: sampling modes, assignment balance, dropouts, the state store, and
a whole in-process population run (the server loop and ``Worker`` over the in-memory transport): dropout
renormalisation, an empty round, and a resume that ends bit for bit where the uninterrupted run ends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from fed_ddp.checkpoint import load_state
from fed_ddp.config import ConfigError, load_config
from fed_ddp.population import ClientStateStore, assign, available, dropouts, read_trace, sample, select_round

# ----------------------------------------------------------------------------- sampling


def test_uniform_is_without_replacement_deterministic_and_fair():
    ids = np.arange(50)
    picks = [sample("uniform", r, 3, ids, m=10) for r in range(1, 2001)]
    assert all(len(p) == 10 == len(set(p.tolist())) and list(p) == sorted(p) for p in picks)
    assert np.array_equal(sample("uniform", 7, 3, ids, m=10), picks[6])  # same seed and round, same clients
    assert not np.array_equal(picks[0], picks[1])  # rounds differ
    assert not np.array_equal(sample("uniform", 1, 4, ids, m=10), picks[0])  # seeds differ
    freq = np.bincount(np.concatenate(picks), minlength=50) / 2000
    assert np.abs(freq - 0.2).max() < 0.04  # each client in ~ m/N = 20 % of rounds (binomial sd 0.9 %)


def test_poisson_rate_and_varying_round_size():
    ids = np.arange(1000)
    sizes = np.array([len(sample("poisson", r, 0, ids, q=0.05)) for r in range(1, 401)])
    assert abs(sizes.mean() / 1000 - 0.05) < 0.003  # sd of the mean rate: sqrt(.05*.95/4e5) = 0.00034
    assert sizes.std() > 3  # binomial(1000, .05): sd 6.9; the round size really varies
    assert len(sample("poisson", 1, 0, ids, q=1.0)) == 1000


def test_weighted_prefers_large_clients_in_proportion():
    sizes = np.array([1] * 10 + [9] * 10)
    ids = np.arange(20)
    counts = np.zeros(20)
    for r in range(1, 3001):
        counts[sample("weighted", r, 1, ids, m=1, sizes=sizes)] += 1
    big, small = counts[10:].sum() / 3000, counts[:10].sum() / 3000
    assert abs(big - 0.9) < 0.02 and abs(small - 0.1) < 0.02  # p proportional to size: 90/100 on the big ten
    two = sample("weighted", 5, 1, ids, m=5, sizes=sizes)
    assert len(set(two.tolist())) == 5  # without replacement


def test_all_and_fewer_candidates_than_m():
    assert sample("all", 1, 0, np.array([2, 5, 9])).tolist() == [2, 5, 9]
    assert sample("uniform", 1, 0, np.array([2, 5]), m=4).tolist() == [2, 5]


def test_availability_probability_and_trace(tmp_path):
    rates = [len(available(r, 0, 1000, 0.3)) / 1000 for r in range(1, 101)]
    assert abs(np.mean(rates) - 0.3) < 0.01
    trace = tmp_path / "trace.txt"
    trace.write_text("# client availability\n10\n01\n111\n")
    t = read_trace(trace, 3)
    assert available(1, 0, 3, t).tolist() == [0, 2] and available(2, 0, 3, t).tolist() == [1, 2]
    assert available(3, 0, 3, t).tolist() == [0, 2]  # rounds wrap around each line
    with pytest.raises(ValueError, match="one per client"):
        read_trace(trace, 4)
    trace.write_text("1x\n1\n1\n")
    with pytest.raises(ValueError, match="client 0"):
        read_trace(trace, 3)


def test_dropouts_rate_and_independence_from_who_else_was_sampled():
    sampled = np.arange(0, 2000, 2)
    lost = dropouts(1, 0, sampled, 0.25)
    assert set(lost.tolist()) <= set(sampled.tolist()) and abs(len(lost) / len(sampled) - 0.25) < 0.04
    assert set(dropouts(1, 0, sampled[:100], 0.25).tolist()) == set(lost.tolist()) & set(sampled[:100].tolist())
    assert len(dropouts(1, 0, sampled, 0.0)) == 0


def test_select_round_reads_the_fed_section():
    cfg = load_config(None, ["fed.num_clients=30", "fed.clients_per_round=6", "fed.dropout_rate=0.5"])
    sel = select_round(cfg.fed, 2, 0, np.ones(30))
    assert len(sel.sampled) == 6 and set(sel.dropped) <= set(sel.sampled) and sel.reachable == 30
    assert sel.playing == [c for c in sel.sampled if c not in sel.dropped]


# ----------------------------------------------------------------------------- assignment


def test_assignment_is_balanced_and_complete():
    for n, w in ((5, 2), (10, 3), (8, 8), (3, 5), (1000, 7)):
        clients = list(range(100, 100 + n))
        out = assign(clients, w)
        assert len(out) == w and sorted(c for row in out for c in row) == clients
        loads = [len(r) for r in out]
        assert max(loads) - min(loads) <= 1, (n, w, loads)
    work = {0: 10.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 6.0}
    out = assign(list(work), 2, work)
    loads = sorted(sum(work[c] for c in row) for row in out)
    assert loads == [10.0, 10.0]  # LPT: {0} and {5, 1..4}
    assert assign([3, 1, 2], 2) == assign([1, 2, 3], 2)  # order of the input does not matter


def test_assignment_seats_clients_where_their_data_is_encoded_without_unbalancing():
    from fed_ddp.population import WorkerCaches

    assert assign(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]  # no homes: as before
    home = {0: 2, 1: 2, 2: 2, 3: 2, 4: 0, 9: 1}
    out = assign(list(range(7)), 3, home=home)
    assert sorted(len(r) for r in out) == [2, 2, 3] and sorted(c for r in out for c in r) == list(range(7))
    assert sum(home.get(c) == w for w, r in enumerate(out) for c in r) == 4  # worker 2 takes 3 of its 4, 4 -> 0
    assert out[2] == [0, 1, 2] and 4 in out[0]
    work = {0: 3.0, 1: 3.0, 2: 1.0, 3: 1.0}  # LPT: homes only break ties between equal loads
    plain, homed = assign(list(work), 2, work), assign(list(work), 2, work, home={0: 1, 1: 0, 2: 0})
    assert sorted(sum(work[c] for c in r) for r in plain) == sorted(sum(work[c] for c in r) for r in homed) == [4.0, 4.0]
    assert 0 in homed[1] and 1 in homed[0]
    caches = WorkerCaches(2, size=2)  # each worker keeps its last 2 clients, as Worker.trainer's LRU does
    caches.played([[1, 2, 3], [4]])
    assert caches.home([1, 2, 3, 4, 5]) == {2: 0, 3: 0, 4: 1}
    caches.played([[2], [5, 6]])
    assert caches.home([2, 3, 4, 6]) == {2: 0, 3: 0, 6: 1}


# ----------------------------------------------------------------------------- the state store


def test_store_round_trip_pruning_and_max_round(tmp_path):
    store = ClientStateStore(tmp_path / "clients", cache_size=2)
    assert store.load(7, max_round=10) is None
    for rnd in (1, 4, 6):
        store.save(7, rnd, {"residual|a": torch.full((3,), float(rnd))}, {"step": rnd})
    assert store.rounds(7) == [4, 6]  # the newest and the one before it
    rnd, t, meta = store.load(7, max_round=10)
    assert rnd == 6 and torch.equal(t["residual|a"], torch.full((3,), 6.0)) and meta == {"step": "6"}
    rnd, t, _ = store.load(7, max_round=5)  # a resume from checkpoint 5 never sees round 6
    assert rnd == 4 and t["residual|a"][0] == 4
    t["residual|a"] += 1  # callers get copies
    assert store.load(7, max_round=5)[1]["residual|a"][0] == 4
    assert store.clients() == [7] and store.disk_bytes() > 0


def test_store_write_is_atomic_and_cache_never_stale(tmp_path, monkeypatch):
    root = tmp_path / "clients"
    a, b = ClientStateStore(root, cache_size=4), ClientStateStore(root, cache_size=4)  # two workers, one disk
    a.save(1, 1, {"x": torch.zeros(2)})
    assert a.load(1, 9)[0] == 1 and a.reads == 0  # served from a's cache
    b.save(1, 3, {"x": torch.ones(2)})  # another worker plays client 1 later
    rnd, t, _ = a.load(1, 9)
    assert rnd == 3 and t["x"].sum() == 2 and a.reads == 1  # a's cached round 1 is not the newest: re-read

    import fed_ddp.population.store as mod

    def crash(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(mod.os, "replace", crash)
    with pytest.raises(OSError):
        a.save(1, 5, {"x": torch.full((2,), 5.0)})
    monkeypatch.undo()
    assert ClientStateStore(root).load(1, 9)[0] == 3  # the half-written round 5 is invisible
    assert any(p.name.startswith(".") for p in (root / "client_000001").iterdir())


def test_store_cache_is_bounded(tmp_path):
    store = ClientStateStore(tmp_path, cache_size=3)
    for c in range(50):
        store.save(c, 1, {"x": torch.zeros(1000)})
    assert len(store._cache) == 3
    assert store.load(0, 1) is not None and store.reads == 1  # evicted long ago: read from disk


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, words", [
    (["fed.num_clients=10", "fed.clients_per_round=11"], ["fed.clients_per_round", "11", "[1, fed.num_clients=10]"]),
    (["fed.sampling=poisson", "fed.sample_rate=0"], ["fed.sample_rate", "(0, 1]"]),
    (["fed.sampling=poisson", "fed.sample_rate=1.5"], ["fed.sample_rate", "1.5"]),
    (["fed.sample_rate=0.5"], ["fed.sample_rate", "poisson only"]),
    (["fed.sampling=poisson", "fed.sample_rate=0.5", "fed.clients_per_round=3"], ["fed.clients_per_round", "poisson"]),
    (["fed.num_clients=4", "fed.workers=5"], ["fed.workers", "5", "fed.num_clients=4"]),
    (["fed.availability=0"], ["fed.availability", "(0, 1]"]),
    (["fed.availability=/no/such/trace.txt"], ["fed.availability", "does not exist"]),
    (["fed.dropout_rate=1"], ["fed.dropout_rate", "[0, 1)"]),
    (["fed.sampling=sometimes"], ["fed.sampling", "poisson"]),
])
def test_bad_population_config_is_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_default_workers_and_world_size():
    assert load_config(None, ["fed.num_clients=4"]).world_size == 5  # the quickstart: W = N
    cfg = load_config(None, ["fed.num_clients=200", "fed.clients_per_round=20"])
    assert cfg.fed.num_workers == 8 and cfg.world_size == 9
    cfg = load_config(None, ["fed.num_clients=200", "fed.clients_per_round=3", "fed.ranks_per_client=2"])
    assert cfg.fed.num_workers == 3 and cfg.world_size == 7
    w = load_config(None, ["fed.num_clients=100", "fed.clients_per_round=2", "fed.workers=4"]).fed
    assert "idle" in w.idle_workers_warning()


def test_fed_ddp_run_caps_null_workers_at_the_cpu_cores():
    """fed.workers=null on CPU: no more single-thread worker ranks than cores (the server waits while they
    train); an explicit fed.workers, a GPU machine or enough cores leave the config's W."""
    from fed_ddp.distributed.nodes import auto_workers

    def w(cores, *overrides, gpus=0):
        return auto_workers(load_config(None, ["fed.num_clients=4", *overrides]), gpus=gpus, cores=cores)

    assert w(2) == 2 and w(3) == 3 and w(1) == 1
    assert w(4) is None and w(64) is None  # 4 workers fit
    assert w(2, "fed.workers=4") is None  # asked for
    assert w(2, gpus=2) is None and w(2, "train.device=cpu", gpus=2) == 2  # GPUs: one per rank, checked elsewhere
    assert w(4, "train.num_threads=2") == 2 and w(2, "train.num_threads=4") == 1
    assert w(4, "fed.ranks_per_client=2", "fed.num_clients=3") == 2  # min(N=3, 8) = 3 workers x 2 ranks > 4 cores


# ----------------------------------------------------------------------------- in-process population runs

POP = ["fed.num_clients=6", "fed.clients_per_round=3", "fed.rounds=3", "fed.local_steps=2", "data.partition=iid",
       "comm.uplink=[topk,int8]", "comm.topk_fraction=0.2", "comm.min_numel=0", "eval.images_per_prompt=1",
       "eval.inference_steps=1", "eval.sample_seeds=[0]", "eval.every=100", "lora.rank=2"]


def _run(tiny_base, out: Path, name: str, *extra: str, parts: list | None = None) -> tuple[Path, dict]:
    from inproc_runs import TINY

    from fed_ddp.compare import run_arm
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.lora import attach_lora, get_flat
    from fed_ddp.diffusion.models import load_pipeline, training_scheduler

    torch.set_num_threads(1)
    cfg = load_config(TINY, [f"model.pretrained={tiny_base}", f"run.output_dir={out}", f"run.name={name}", *POP, *extra])
    pipe = load_pipeline(str(tiny_base), torch.device("cpu"))
    attach_lora(pipe.unet, cfg.lora, seed=cfg.run.seed)
    data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
    init = get_flat(pipe.unet)
    summary = run_arm(cfg, pipe, training_scheduler(pipe), data, init, str(tiny_base)).to_json()  # as summary.json holds it
    if parts is not None:
        parts.extend([cfg, pipe, data, init])
    return cfg.run.dir, summary


def _global(run_dir: Path, rnd: int) -> torch.Tensor:
    return load_state(run_dir / "checkpoints" / f"round_{rnd:04d}")["global"]


@pytest.mark.slow
def test_resume_is_bit_identical_with_residuals_across_the_stop(tiny_base, tmp_path):
    """Stop after round 2 (with a half-written round 3 left behind by a crash), resume to round 3: the final
    adapter equals the uninterrupted run's bit for bit, so sampling and every client's residual continued."""
    full, _ = _run(tiny_base, tmp_path, "full")
    part, _ = _run(tiny_base, tmp_path, "part", "fed.rounds=2")
    carried = [c for c in ClientStateStore(part / "clients").clients()]
    assert carried  # some clients' residuals cross the stop
    # what a crash in the middle of round 3 leaves: a client's state of round 3, but no checkpoint 3
    ClientStateStore(part / "clients").save(carried[0], 3, {"residual|junk": torch.ones(1)}, {"seed": 0, "step": 9})
    with pytest.raises(ConfigError, match=r"run.seed \(0 -> 5\)"):  # a resume with other settings is refused
        _run(tiny_base, tmp_path, "part", "run.resume=true", "run.seed=5")
    _, summary = _run(tiny_base, tmp_path, "part", "run.resume=true")
    assert torch.equal(_global(full, 3), _global(part, 3))
    full_summary = json.loads((full / "summary.json").read_text())
    assert summary["base"] == full_summary["base"] and summary["base"]  # the base evaluation survives the resume
    for k in ("clients_sampled", "distinct_clients"):
        assert summary["sampling"][k] == full_summary["sampling"][k]  # all 3 rounds, not only the resumed one
    assert summary["comm"]["air"] == full_summary["comm"]["air"]
    assert not torch.equal(_global(full, 2), _global(full, 3))
    rows = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"]["sampled"] for r in rows if r.get("clients")] == \
        [r["clients"]["sampled"] for r in full_rows if r.get("clients")]


@pytest.mark.slow
def test_dropouts_renormalise_and_an_empty_round_keeps_the_global(tiny_base, tmp_path):
    from fed_ddp.client import LocalTrainer
    from fed_ddp.diffusion.models import training_scheduler
    from fed_ddp.strategies import RoundPlan

    parts: list = []
    run_dir, summary = _run(tiny_base, tmp_path, "drop", "fed.dropout_rate=0.5", "fed.rounds=3",
                            "comm.uplink=[]", parts=parts)
    rows = {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("clients")}
    assert any(r["clients"]["dropped"] for r in rows.values())
    for rnd, r in rows.items():
        c = r["clients"]
        assert c["arrived"] == [x for x in c["sampled"] if x not in c["dropped"]]
        assert sorted(map(int, r["num_examples"])) == c["arrived"]  # only arrivals were aggregated
        assert r["comm"]["air"]["up"]["messages"] == len(c["arrived"])
        assert r["comm"]["air"]["down"]["messages"] == len(c["sampled"])
    # round 1, recomputed here: the sample-weighted mean over the clients that arrived, weights renormalised
    cfg, pipe, data, init = parts
    arrived = rows[1]["clients"]["arrived"]
    assert 0 < len(arrived) < len(rows[1]["clients"]["sampled"])  # seed 0: someone dropped in round 1
    sched = training_scheduler(pipe)
    deltas = [LocalTrainer(pipe, sched, data.clients[c], cfg.train, cfg.run.seed, data.replay,
                           cfg.data.replay_fraction, client_id=c).fit(init, RoundPlan(1, 2, cfg.train.lr))[0].double()
              for c in arrived]
    counts = [len(data.clients[c]) for c in arrived]
    expected = init.double() + sum(n * d for n, d in zip(counts, deltas)) / sum(counts)
    # (1e-5: the worker encodes captions in other batches than this fresh trainer; a weight error is ~1e-2)
    torch.testing.assert_close(_global(run_dir, 1).double(), expected, rtol=0, atol=1e-5)
    # availability so low that some round has nobody: the adapter is kept, the run goes on
    run_dir, summary = _run(tiny_base, tmp_path, "empty", "fed.availability=0.05", "fed.rounds=3", "comm.uplink=[]")
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("clients")]
    empty = [r["round"] for r in rows if r.get("empty_round")]
    assert empty and summary["sampling"]["empty_rounds"] == len(empty)
    for rnd in empty:
        prev = _global(run_dir, rnd - 1) if rnd > 1 else None
        if prev is not None:
            assert torch.equal(prev, _global(run_dir, rnd))
        assert next(r for r in rows if r["round"] == rnd)["train_loss_mean"] is None


# ----------------------------------------------------------------------------- seeds and workers


def test_client_training_seeds_never_collide():
    from fed_ddp.seeds import client_round

    seen = {client_round(0, r, c) for r in range(1, 41) for c in range(0, 20_000, 7)}
    assert len(seen) == 40 * len(range(0, 20_000, 7))  # (r + 1, c) and (r, c + 1009) used to share streams
    assert client_round(0, 3, 5) == 3 * 1_009 + 5  # the first 1,009 clients keep the original formula
    assert all(0 <= s < 2 ** 63 for s in seen)


@pytest.fixture()
def worker(tiny_base, tmp_path):
    from fed_ddp.compression import layout_of
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.lora import attach_lora
    from fed_ddp.diffusion.models import load_pipeline, training_scheduler
    from fed_ddp.protocol import Wire
    from fed_ddp.worker import Worker

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "fed.num_clients=6", "lora.rank=2", "lora.dropout=0.2",
                             "comm.uplink=[topk]", "comm.min_numel=0", "train.batch_size=4"])
    pipe = load_pipeline(str(tiny_base), torch.device("cpu"))
    attach_lora(pipe.unet, cfg.lora, seed=0)
    data = build_federated_data(cfg)
    return Worker(0, cfg, pipe, training_scheduler(pipe), data, Wire(cfg.comm, layout_of(pipe.unet)))


def test_worker_continues_from_exactly_the_state_the_server_names(worker):
    from fed_ddp.diffusion.lora import get_flat
    from fed_ddp.strategies import RoundPlan

    g = get_flat(worker.pipe.unet)
    worker.play(3, RoundPlan(1, 1, 1e-3), g)  # first round: no state yet
    assert worker.store.rounds(3) == [1]
    assert worker.codec_state(3, 4, 1).residual_norm() > 0
    with pytest.raises(RuntimeError, match="state of round 2 is missing .* shared"):
        worker.codec_state(3, 4, 2)  # the server says round 2: a missing file is an error, not a fresh start


def test_lora_dropout_does_not_depend_on_what_the_worker_played_before(worker):
    from fed_ddp.diffusion.lora import get_flat
    from fed_ddp.strategies import RoundPlan

    g = get_flat(worker.pipe.unet)
    t = worker.trainer(2)
    a, _ = t.fit(g, RoundPlan(1, 2, 1e-2))
    torch.rand(1000)  # another client's training would have advanced torch's global generator
    worker.trainer(4).fit(g, RoundPlan(1, 2, 1e-2))
    b, _ = t.fit(g, RoundPlan(1, 2, 1e-2))
    assert torch.equal(a, b) and a.abs().max() > 0


TINY, POP_CFG = ROOT / "configs" / "tiny_test.yaml", ROOT / "configs" / "population.yaml"


@pytest.mark.usefixtures("registries_restored")
def test_a_user_sampler_is_named_like_a_built_in_and_what_it_returns_is_checked():
    """examples/round_robin.py by package.module:Name spelling (a file here): its turns through select_round, the
    config checks of the keys it declares, differential privacy refusing it, and bad answers named."""
    from fed_ddp.config import ConfigError, load_config
    from fed_ddp.population.sampling import REGISTRY, Sampler, checked

    spec = f"{ROOT / 'examples' / 'round_robin.py'}:RoundRobin"
    cfg = load_config(TINY, [f"fed.sampling={spec}", "fed.num_clients=5", "fed.clients_per_round=2"])
    sizes = np.ones(5)
    turns = [select_round(cfg.fed, rnd, 0, sizes).sampled for rnd in (1, 2, 3)]
    assert turns == [[0, 1], [2, 3], [0, 4]]  # (ids 4, 5 % 5 = 0), sorted
    assert cfg.fed.expected_round_size == 2
    with pytest.raises(ConfigError, match=r"fed.sample_rate=0.5: applies to fed.sampling=poisson only"):
        load_config(TINY, [f"fed.sampling={spec}", "fed.sample_rate=0.5"])
    with pytest.raises(ConfigError, match=r"differential privacy needs poisson"):
        load_config(POP_CFG, [f"fed.sampling={spec}", "fed.sample_rate=null", "fed.clients_per_round=10",
                              "privacy.dp.noise_multiplier=1"])
    with pytest.raises(ConfigError, match=r"fed.sampling='nope': must be one of .*'age', 'all', 'best_channel', 'poisson', 'round_robin', 'uniform'"):
        load_config(TINY, ["fed.sampling=nope"])  # the plug-in registered its own name too
    assert REGISTRY[spec] is REGISTRY["round_robin"]

    class Twice(Sampler):
        def sample(self, rnd, rng, reachable, sizes):
            return np.concatenate([reachable[:1], reachable[:1]])

    with pytest.raises(ValueError, match="fed.sampling=twice: returned ids that are repeated or not among"):
        checked(Twice(3).sample(1, None, np.arange(3), None), np.arange(3), "twice")
    with pytest.raises(ValueError, match="not among the reachable"):
        checked(np.array([7]), np.arange(3), "far")
    with pytest.raises(ValueError, match="not an array of client ids"):
        checked(np.array([0.5]), np.arange(3), "halves")
