"""Privacy: DP-FedAvg's clipping and noise, the accountant against a second library, secure aggregation's
protocol (exact sums, uniform-looking messages, dropout recovery, tampering), and the one-line errors.

Pure functions and in-process protocol runs here; the runs over gloo are at the end (marked slow).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fed_ddp.config import ConfigError, load_config
from fed_ddp.privacy import accountant as acc
from fed_ddp.privacy import dp
from fed_ddp.privacy import secagg as sa

# ----------------------------------------------------------------------------- accountant


@pytest.mark.parametrize("q,z,rounds", [(0.1, 1.1, 3), (0.1, 1.0, 12), (0.01, 0.8, 300), (1.0, 5.0, 10)])
def test_epsilon_matches_an_independent_accountant(q, z, rounds):
    """dp-accounting's PLD epsilon = Microsoft's prv-accountant estimate (a different numerical method) to 2 %;
    RDP is an upper bound on both."""
    from prv_accountant import PRVAccountant
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    ours = acc.epsilon("pld", [(q, z)] * rounds, 1e-5)
    prv = PRVAccountant(prvs=PoissonSubsampledGaussianMechanism(noise_multiplier=z, sampling_probability=q),
                        max_self_compositions=rounds, eps_error=0.01, delta_error=1e-10)
    _, est, _ = prv.compute_epsilon(delta=1e-5, num_self_compositions=[rounds])
    assert ours == pytest.approx(est, rel=0.02)
    assert acc.epsilon("rdp", [(q, z)] * rounds, 1e-5) >= ours * 0.999


def test_calibration_hits_the_target_and_the_accountant_resumes():
    z = acc.calibrate("pld", 0.1, 12, 4.0, 1e-5)
    assert acc.epsilon("pld", [(0.1, z)] * 12, 1e-5) == pytest.approx(4.0, rel=0.01)
    assert acc.epsilon("pld", [(0.1, z * 1.02)] * 12, 1e-5) < 4.0 < acc.epsilon("pld", [(0.1, z * 0.98)] * 12, 1e-5)
    a = acc.Accountant("pld", 1e-5)
    for _ in range(5):
        a.step(0.1, z)
    b = acc.Accountant("pld", 1e-5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # through JSON, as in a checkpoint
    assert b.epsilon() == a.epsilon() == acc.epsilon("pld", [(0.1, z)] * 5, 1e-5)
    with pytest.raises(ValueError, match="unreachable"):
        acc.calibrate("pld", 1.0, 1000, 0.01, 1e-5)


# ----------------------------------------------------------------------------- clipping and noise


def test_clipping_bounds_every_contribution_and_keeps_direction():
    g = torch.Generator().manual_seed(0)
    for scale in (1e-4, 0.05, 3.0, 1e3):
        d = torch.randn(5000, generator=g) * scale
        c, norm = dp.clip(d, 0.05)
        assert float(c.double().norm()) <= 0.05 * (1 + 1e-6)
        assert norm == pytest.approx(float(d.double().norm()))
        if norm <= 0.05:
            assert torch.equal(c, d)  # already inside: untouched
        else:
            cos = float(torch.nn.functional.cosine_similarity(c.double(), d.double(), dim=0))
            assert cos == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError):
        dp.clip(torch.tensor([1.0, float("nan")]), 1.0)


def test_central_noise_std_matches_z_c_over_expected_round_size():
    """Many draws: the std of the noised mean of a zero sum is z C / E[m] within sampling error."""
    z, c, em, n = 1.3, 0.05, 10.0, 400_000
    mean = dp.noisy_mean(torch.zeros(n), z * c, em, dp.noise_generator(7, 0, 1))
    want = z * c / em
    assert float(mean.std()) == pytest.approx(want, rel=4 / math.sqrt(2 * n))  # 4 standard errors
    assert abs(float(mean.mean())) < 4 * want / math.sqrt(n)


def test_distributed_noise_sums_to_at_least_the_central_noise():
    """k clients each adding std z C / sqrt(k) give the sum std z C: the same mean noise as central mode."""
    from fed_ddp.privacy.engine import client_side

    z, c, k, n = 1.0, 0.05, 4, 100_000
    std = dp.client_noise_std(z, c, k)
    total = sum(client_side(torch.zeros(n), c, std, 3, 1, cid).double() for cid in range(k))
    assert float(total.std()) == pytest.approx(z * c, rel=4 / math.sqrt(2 * n))
    # each client's own noise is independent of the others' (distinct streams per client)
    a, b = (client_side(torch.zeros(n), c, std, 3, 1, cid).double() for cid in (0, 1))
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 4 / math.sqrt(n)


def test_noise_from_os_entropy_differs_every_time_and_a_seed_replays_it():
    a, b = (dp.gaussian(10, 1.0, dp.noise_generator(None, 0, 1)) for _ in range(2))
    assert not torch.equal(a, b)
    c, d = (dp.gaussian(10, 1.0, dp.noise_generator(5, 0, 1)) for _ in range(2))
    assert torch.equal(c, d)


def test_adaptive_clip_follows_the_quantile_and_splits_the_noise():
    # Andrew et al. 2021: z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, checked against the formula in numpy
    z, sb = 1.0, 2.0
    assert dp.delta_noise_multiplier(z, sb) == pytest.approx(float(np.power(z ** -2 - (2 * sb) ** -2, -0.5)))
    with pytest.raises(ValueError, match="too small"):
        dp.delta_noise_multiplier(1.0, 0.4)
    # norms ~ |N(0, 1)|: the clip converges near their median, 0.674, from either side
    rng = np.random.default_rng(0)
    for start in (0.01, 10.0):
        clip = start
        for _ in range(300):
            norms = np.abs(rng.normal(size=100))
            clip = dp.next_clip(clip, float((norms <= clip).sum()), 100, 0.5, 0.2)
        assert clip == pytest.approx(0.674, rel=0.15)


# ----------------------------------------------------------------------------- secure aggregation


def _protocol(inputs: dict[int, np.ndarray], bits: int, t: int, drop: set[int] = frozenset(), rnd: int = 1):
    """One full round in process: (the server's sum, each client's masked message, the server)."""
    n = len(next(iter(inputs.values())))
    ring = sa.ring_bits(bits, len(inputs))
    clients = {c: sa.Client(c, rnd) for c in inputs}
    roster, bad = sa.collect_adverts({c: cl.advert() for c, cl in clients.items()})
    assert not bad
    server = sa.Server(rnd, t, n, ring, roster)
    sent = {c: cl.share(roster, t) for c, cl in clients.items()}
    for c, cl in clients.items():
        assert cl.receive([ct for s in sent.values() for ct in s if int.from_bytes(ct[4:8], "little") == c]) == []
    masked = {c: clients[c].mask(inputs[c], ring)
              for c in inputs if c not in drop}
    reveals = {c: clients[c].reveal(set(masked)) for c in masked}
    return server.unmask(masked, reveals), masked, server, clients


def _fixed(m: int, n: int, bits: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    lim = 2 ** (bits - 1) - 1
    return {c: rng.integers(-lim, lim + 1, n) for c in range(m)}


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_secagg_sum_is_exact(bits):
    xs = _fixed(7, 3000, bits)
    total, _, _, _ = _protocol(xs, bits, t=4)
    assert np.array_equal(total, sum(xs.values()))


def test_secagg_cannot_wrap_at_the_extremes():
    lim = 2 ** 7 - 1
    for sign in (1, -1):
        xs = {c: np.full(100, sign * lim) for c in range(9)}
        total, _, _, _ = _protocol(xs, 8, t=5)
        assert np.array_equal(total, np.full(100, sign * lim * 9))


def test_secagg_recovers_clients_that_drop_after_masking():
    xs = _fixed(8, 2000, 8, seed=1)
    total, masked, _, _ = _protocol(xs, 8, t=5, drop={2, 6})
    assert set(masked) == {0, 1, 3, 4, 5, 7}
    assert np.array_equal(total, sum(xs[c] for c in masked))
    with pytest.raises(ValueError, match="threshold"):  # fewer survivors than t: nobody reveals
        _protocol(xs, 8, t=5, drop={0, 1, 2, 3})


def test_a_masked_message_looks_uniform_and_changes_completely():
    """Chi-square on the bytes of one masked message (a real input of mostly zeros), and one value of one
    client changed: plain encodings differ in one value, masked messages in essentially all of them."""
    from scipy.stats import chisquare

    n = 40_000
    xs = {c: np.zeros(n, dtype=np.int64) for c in range(5)}
    xs[0][:100] = 3
    _, masked, _, _ = _protocol(xs, 8, t=3)
    ring = sa.ring_bits(8, 5)
    raw = np.frombuffer(sa.pack(masked[0], ring), dtype=np.uint8)
    assert chisquare(np.bincount(raw, minlength=256)).pvalue > 1e-4
    top = (masked[0] >> np.uint64(ring - 4)).astype(np.int64)  # the 4 top bits of each value: 16 bins
    assert chisquare(np.bincount(top, minlength=16)).pvalue > 1e-4
    ys = {c: v.copy() for c, v in xs.items()}
    ys[0][5] += 1
    _, masked2, _, _ = _protocol(ys, 8, t=3)
    assert int((xs[0] != ys[0]).sum()) == 1
    assert (masked[0] != masked2[0]).mean() > 0.99


def test_secagg_detects_tampering():
    xs = _fixed(5, 500, 8, seed=2)
    ring = sa.ring_bits(8, 5)
    clients = {c: sa.Client(c, 1) for c in xs}
    adverts = {c: cl.advert() for c, cl in clients.items()}
    adverts[4] = adverts[4][:4] + bytes(32) + adverts[4][36:]  # an all-zero (low-order) key: refused
    roster, bad = sa.collect_adverts(adverts)
    assert list(bad) == [4] and [a.client for a in roster] == [0, 1, 2, 3]
    server = sa.Server(1, 3, 500, ring, roster)
    sent = {c: clients[c].share(roster, 3) for c in range(4)}
    forged = bytearray(sent[1][0])  # 1's ciphertext to 0, one bit flipped: AES-GCM refuses it
    forged[30] ^= 1
    inbox0 = [bytes(forged)] + [ct for s in (2, 3) for ct in sent[s] if int.from_bytes(ct[4:8], "little") == 0]
    assert clients[0].receive(inbox0) == [1]
    for c in (1, 2, 3):
        clients[c].receive([ct for s in sent.values() for ct in s if int.from_bytes(ct[4:8], "little") == c])
    masked = {c: clients[c].mask(xs[c], ring) for c in range(4)}
    reveals = {c: clients[c].reveal(set(masked)) for c in masked}
    assert np.array_equal(server.unmask(masked, reveals), sum(xs[c] for c in range(4)))
    # a responder that lies about its shares: with t + 1 responders the server leaves it out and still gets the
    # exact sum; with exactly t the rebuilt seed fails its commitment: a loud failure, never a wrong sum
    bad_rev = bytearray(reveals[0])
    for k in range(4):
        bad_rev[k * sa.REVEAL_BYTES + 10] ^= 0xFF
    lied = {**reveals, 0: bytes(bad_rev)}
    assert np.array_equal(server.unmask(masked, lied), sum(xs[c] for c in range(4)))
    with pytest.raises(ValueError, match="commitment|public key"):
        server.unmask(masked, {c: lied[c] for c in (0, 1, 2)})


def test_fixed_point_is_unbiased_and_packs_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 0.3)
    q = sa.encode_fixed(x, 1.0, 8, g)
    assert float(sa.decode_fixed(q, 1.0, 8).mean()) == pytest.approx(0.3, abs=1e-3)
    assert q.min() >= -127 and q.max() <= 127
    rng = np.random.default_rng(0)
    for ring in (5, 11, 15, 23, 32, 40):
        v = rng.integers(0, 2 ** ring, 1001, dtype=np.uint64)
        buf = sa.pack(v, ring)
        assert len(buf) == sa.packed_bytes(1001, ring) and np.array_equal(sa.unpack(buf, 1001, ring), v)
    s = sa.to_ring(np.array([-5, 7, -127 * 9]), 12)
    assert sa.from_ring(s, 12).tolist() == [-5, 7, -127 * 9]


def test_shamir_any_t_shares_rebuild_the_secret():
    secret = bytes(range(32))
    xs = list(range(1, 8))
    ys = sa.split(secret, xs, 4)
    rng = np.random.default_rng(0)
    for _ in range(5):
        pick = rng.choice(7, 4, replace=False)
        assert sa.combine([(xs[i], ys[i]) for i in pick]) == secret
    try:  # t - 1 shares: not the secret (almost surely not even a 32-byte value)
        assert sa.combine([(xs[i], ys[i]) for i in range(3)]) != secret
    except ValueError:
        pass


# ----------------------------------------------------------------------------- one-line errors

POP = "configs/population.yaml"


@pytest.mark.parametrize("overrides,match", [
    (["privacy.dp.noise_multiplier=-1"], r"privacy.dp.noise_multiplier=-1.*>= 0"),
    (["privacy.dp.noise_multiplier=1", "privacy.dp.clip_norm=0"], r"privacy.dp.clip_norm=0.*must be > 0"),
    (["privacy.dp.clip_norm=-0.1"], r"privacy.dp.clip_norm=-0.1"),
    (["privacy.dp.noise_multiplier=1", "fed.sampling=uniform", "fed.sample_rate=null", "fed.clients_per_round=10"],
     r"fed.sampling='uniform': differential privacy needs poisson"),
    (["privacy.secagg=true", "comm.uplink=[topk,int8]"], r"comm.uplink=.*topk is not linear"),
    (["privacy.secagg=true", "comm.uplink=[lowrank]"], r"lowrank is not linear"),
    (["privacy.secagg=true", "privacy.secagg_threshold=11"], r"privacy.secagg_threshold=11: is larger than the round"),
    (["privacy.dp.noise_multiplier=1", "privacy.dp.target_epsilon=3"], r"either noise_multiplier or target_epsilon"),
    (["privacy.dp.noise_multiplier=1", "fed.aggregator=median"], r"fed.aggregator='median': must be mean"),
    (["privacy.dp.adaptive_clip=true"], r"adaptive_clip=True: needs differential privacy"),
])
def test_bad_privacy_settings_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(POP, overrides)
    assert "\n" not in str(e.value)


def test_unreachable_target_epsilon_stops_before_any_rank(tmp_path):
    from conftest import run_cli

    r = run_cli("run", POP, f"run.output_dir={tmp_path}", "privacy.dp.target_epsilon=0.001", "fed.rounds=500",
                "fed.sample_rate=1.0")
    assert r.returncode == 2 and "unreachable" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "population").exists()


def test_plan_prints_z_and_epsilon_per_round():
    from conftest import run_cli

    r = run_cli("plan", POP, "privacy.dp.target_epsilon=8", "privacy.secagg=true", "comm.uplink=[int8]")
    assert r.returncode == 0, r.stderr
    z = acc.calibrate("pld", 0.1, 12, 8.0, 1e-5)
    assert f"z={z:.4g} (calibrated" in r.stdout
    assert "after round: 1: " in r.stdout and "12: 8" in r.stdout
    assert "secure aggregation at 10 clients per round: ring of 12 bits" in r.stdout


# ----------------------------------------------------------------------------- over gloo (real ranks)

GLOO = ["fed.workers=2", "fed.local_steps=2", "data.partition=iid", "lora.rank=2", "eval.images_per_prompt=1",
        "eval.inference_steps=1", "eval.sample_seeds=[0]", "eval.every=100"]


def _launch(tiny_base, out, name, spy_name, extra):
    import os

    from test_distributed import ROOT, launch

    spy = out / spy_name
    spy.mkdir()
    args = [str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}", f"run.output_dir={out}",
            f"run.name={name}", *GLOO, *extra]
    launch(3, args, {"FED_DDP_SPY_DIR": str(spy), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    return out / name, spy


def _init(run_dir):
    from fed_ddp.compression import layout_of
    from fed_ddp.diffusion.lora import attach_lora, get_flat
    from fed_ddp.diffusion.models import load_pipeline
    from fed_ddp.protocol import Wire

    cfg = load_config(run_dir / "config.yaml")
    pipe = load_pipeline(cfg.model.pretrained, torch.device("cpu"))
    attach_lora(pipe.unet, cfg.lora, seed=cfg.run.seed)
    return cfg, Wire(cfg.comm, layout_of(pipe.unet), 2, privacy_fields=cfg.privacy.clips), get_flat(pipe.unet)


def _rows(run_dir):
    return {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["round"] > 0 and "comm" in r}


@pytest.mark.slow
def test_secagg_over_gloo_sums_exactly_and_recovers_dropouts(tiny_base, tmp_path):
    """5 clients on 2 workers, int8 fixed point; the simulated dropouts (seeded) leave after sharing their
    keys: round 1 loses client 4, round 2 clients 0 and 1 (3 left = the threshold). The new global adapter is
    the old one plus the mean of the survivors' fixed-point updates, rebuilt here from the deltas the
    workers trained, bit for bit: every mask cancelled, the dropouts' masks recovered from shares."""
    from fed_ddp.checkpoint import load_state
    from fed_ddp.population.sampling import dropouts
    from fed_ddp.privacy.engine import client_side, fixed_range, round_trip, signal_clip
    from fed_ddp.privacy.masked import KEYS, MASKED, rounding_generator

    run_dir, spy = _launch(tiny_base, tmp_path, "sa", "spy", [
        "fed.num_clients=5", "fed.sampling=all", "fed.dropout_rate=0.25", "run.seed=3", "fed.rounds=2",
        "privacy.secagg=true", "comm.uplink=[int8]", "privacy.dp.clip_norm=0.05"])
    _, wire, prev = _init(run_dir)
    rows = _rows(run_dir)
    n = prev.numel()
    clip, _ = round_trip(0.05, 0.0)  # as the workers read it (fp32)
    vr = fixed_range(None, clip, 0.0, n)
    c_signal = signal_clip(clip, vr, 0.0, n, 8)
    assert c_signal == pytest.approx(0.05 * (1 - 4 / 127))  # so the rounded update stays within C
    for rnd, lost in ((1, [4]), (2, [0, 1])):
        assert dropouts(rnd, 3, np.arange(5), 0.25).tolist() == lost
        sa_row = rows[rnd]["privacy"]["secagg"]
        assert sa_row["roster"] == 5 and sa_row["recovered_dropouts"] == len(lost)
        survivors = [c for c in range(5) if c not in lost]
        assert rows[rnd]["clients"]["arrived"] == survivors
        total = np.zeros(n, dtype=np.int64)
        for c in survivors:
            delta = next(torch.load(p) for p in spy.glob(f"fit_rank*_round{rnd}_client{c}.pt"))
            x = client_side(delta, c_signal, 0.0, None, rnd, c)
            q = sa.encode_fixed(x, vr, 8, rounding_generator(3, rnd, c))
            assert float(sa.decode_fixed(q, vr, 8).norm()) <= 0.05  # the sensitivity the noise would assume
            total += q
        mean = (sa.decode_fixed(total, vr, 8) / len(survivors)).to(torch.float32)
        want = prev + 1.0 * mean.double().to(torch.float32)
        got = load_state(run_dir / "checkpoints" / f"round_{rnd:04d}")["global"]
        assert torch.equal(got, want)
        prev = got
    # what the server received of one client in the masked step looks uniform, whatever the update
    from scipy.stats import chisquare

    msgs = sorted(spy.glob("rank1_msg*.pt"), key=lambda p: int(p.stem.split("msg")[1]))
    kinds = [wire.unpack_head(torch.load(p)["head"]).kind for p in msgs]
    assert kinds[:4] == [KEYS, 3, MASKED, 5]
    up = torch.load(msgs[2])["up"].numpy()
    assert chisquare(np.bincount(up[16:2016], minlength=256)).pvalue > 1e-4  # after one client's 16-byte header
    s = json.loads((run_dir / "summary.json").read_text())
    assert "secure aggregation" in s["privacy"]["guarantee"] and s["privacy"]["secagg_per_round_mean"]["shares"]


@pytest.mark.slow
def test_dp_over_gloo_noise_clip_accountant_and_resume(tiny_base, tmp_path):
    """Central DP with a replayable noise seed: each round's global = previous + (sum of the decoded uplinks,
    each clipped by the server, + N(0, (z C)^2)) / (q x reachable), recomputed here from the recorded
    messages; epsilon per round is dp-accounting's for that many rounds, across a resume (the ledger
    counts every noised round); a budget stops the run cleanly before the round that would exceed it."""
    from fed_ddp.checkpoint import load_state

    # 8 clients: the sampling seed is secret (drawn at every start), so a round nobody joins (0.3^n) must be rare:
    # with 4 clients one run in ~60 had an empty round, which spends no epsilon and let a third round in
    common = ["fed.num_clients=8", "fed.sampling=poisson", "fed.sample_rate=0.7", "privacy.dp.noise_multiplier=0.8",
              "privacy.dp.clip_norm=0.002", "privacy.dp.noise_seed=11", "comm.uplink=[int8]"]
    run_dir, spy1 = _launch(tiny_base, tmp_path, "dp", "spy1", [*common, "fed.rounds=1"])
    _, spy2 = _launch(tiny_base, tmp_path, "dp", "spy2", [*common, "fed.rounds=3", "run.resume=true",
                                                           "privacy.dp.max_epsilon=8.5"])
    _, wire, prev = _init(run_dir)
    rows = _rows(run_dir)
    eps = {r: acc.epsilon("pld", [(0.7, 0.8)] * r, 1e-5) for r in (1, 2, 3)}
    assert eps[2] <= 8.5 < eps[3]  # so the budget allows 2 rounds
    assert sorted(rows) == [1, 2]
    ledger = [json.loads(x) for x in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    assert [r["round"] for r in ledger] == [1, 2]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["rounds"] == 2 and "max_epsilon" in s["stopped_early"]
    assert s["privacy"]["epsilon"] == pytest.approx(eps[2], rel=1e-9)
    assert s["privacy"]["guarantee"].startswith(f"(epsilon, delta) = ({eps[2]:.3g}, 1e-05) at the client level "
                                                f"after 2 rounds, q = 0.7, z = 0.8, C = 0.002")
    for rnd, spy in ((1, spy1), (2, spy2)):
        assert rows[rnd]["privacy"]["epsilon"] == pytest.approx(eps[rnd], rel=1e-9)  # the accountant resumed
        k = 1  # each launch's first exchange is the first round it ran
        decoded = {}
        for rank in (1, 2):
            m = torch.load(spy / f"rank{rank}_msg{k}.pt")
            h = wire.unpack_head(m["head"])
            assert h.plan.round == rnd
            table, _ = wire.unpack_body(m["body"], h.slots)
            for msg in wire.split_uplink(m["up"], len(table[rank - 1])):
                u = wire.unpack_uplink(msg)
                decoded[u.client_id] = u.delta  # central mode: the raw update; the server clips it
        assert sorted(decoded) == rows[rnd]["clients"]["arrived"]
        total = torch.zeros(prev.numel(), dtype=torch.float64)
        assert all(float(d.double().norm()) > 0.002 for d in decoded.values())  # the clip binds
        for c in sorted(decoded):  # the server's order
            total += dp.clip(decoded[c], 0.002)[0].double()
        noise = dp.gaussian(prev.numel(), 0.8 * 0.002, dp.noise_generator(11, 0, rnd))
        em = 0.7 * rows[rnd]["clients"]["reachable"]
        want = prev + 1.0 * ((total + noise) / em).to(torch.float32).double().to(torch.float32)
        got = load_state(run_dir / "checkpoints" / f"round_{rnd:04d}")["global"]
        assert torch.equal(got, want)
        prev = got


def test_server_adaptive_clip_uses_the_centred_noised_count_and_clips_on_the_server():
    """Central mode: the server clips what it decoded (so it sees the true norms), counts the updates within C,
    noises the centred count sum(b_i - 1/2) with sigma_b, and moves C by exp(-eta (b - gamma)) with
    b = (centred + noise) / E[m] + 1/2; the deltas' noise uses z_delta < z."""
    from fed_ddp.privacy.engine import ServerPrivacy, resolve

    cfg = load_config(POP, ["privacy.dp.noise_multiplier=1.0", "privacy.dp.clip_norm=1.0", "privacy.dp.adaptive_clip=true",
                            "privacy.dp.count_stddev=1.0", "privacy.dp.noise_seed=5", "fed.sample_rate=0.04"])
    setup = resolve(cfg)
    assert setup.z_delta == pytest.approx((1 - 0.25) ** -0.5)
    sp = ServerPrivacy(setup, 1000)
    g = torch.Generator().manual_seed(0)
    norms = [0.5, 0.8, 2.0, 3.0, 4.0]  # 2 of 5 within C = 1
    deltas = {}
    for c, n in enumerate(norms):
        v = torch.randn(1000, generator=g)
        deltas[c] = v / v.norm() * n
    mean, rejected, m = sp.combine_updates(deltas, 4.0, rnd=3)
    assert not rejected and m["unclipped"] == 2 and m["contributions"] == 5
    count_noise = float(dp.gaussian(1, 1.0, dp.noise_generator(5, 2, 3))[0])
    b = (2 - 5 / 2 + count_noise) / 4.0 + 0.5
    assert sp.clip == pytest.approx(1.0 * math.exp(-0.2 * (b - 0.5)))
    total = sum(dp.clip(d, 1.0)[0].double() for d in deltas.values())
    want = (total + dp.gaussian(1000, setup.z_delta * 1.0, dp.noise_generator(5, 0, 3))) / 4.0
    assert torch.equal(mean, want.to(torch.float32))


# ----------------------------------------------------------------------------- in one process (the same server loop)


def _in_process(tiny_base, tmp_path, name, extra, tamper=None):
    """A run on 2 in-memory workers; ``tamper(kind, worker, up) -> up`` may rewrite what a worker sends."""
    from fed_ddp.compression import layout_of
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.lora import attach_lora
    from fed_ddp.diffusion.models import load_pipeline, training_scheduler
    from fed_ddp.protocol import Wire
    from fed_ddp.server import run_server
    from fed_ddp.transport import InMemoryTransport
    from fed_ddp.worker import Worker

    cfg = load_config("configs/tiny_test.yaml", [f"model.pretrained={tiny_base}", f"run.output_dir={tmp_path}",
                                                 f"run.name={name}", *GLOO, *extra])
    pipe = load_pipeline(str(tiny_base), torch.device("cpu"))
    attach_lora(pipe.unet, cfg.lora, seed=0)
    data = build_federated_data(cfg)
    wire = Wire(cfg.comm, layout_of(pipe.unet), 2, privacy_fields=cfg.privacy.clips)
    workers = [Worker(i, cfg, pipe, training_scheduler(pipe), data, wire) for i in range(2)]

    def handler(i):
        def h(head, body):
            up, sizes = workers[i].handle(head, body)
            return (tamper(wire.unpack_head(head).kind, i, up) if tamper else up), sizes
        return h

    summary = run_server(cfg, pipe, training_scheduler(pipe), data, InMemoryTransport([handler(0), handler(1)]),
                         str(tiny_base), wire=wire).to_json()  # as summary.json holds it
    return summary, _rows(cfg.run.dir), cfg.run.dir


def test_secagg_survives_a_client_with_a_bad_key_and_one_with_a_forged_masked_message(tiny_base, tmp_path):
    """Worker 0's first client advertises a low-order key (left out of the roster); worker 1's first client
    sends its masked input under another id (rejected, then recovered like a dropout). The round is applied
    from the others, with distributed DP noise on top: epsilon counted, threshold at least min_clients."""
    from fed_ddp.privacy.masked import KEYS, MASKED

    def tamper(kind, worker, up):
        up = up.clone()
        if kind == KEYS and worker == 0:
            up[4:36] = 0  # client id stays, c public key zeroed
        if kind == MASKED and worker == 1 and up.numel():
            up[:4] = torch.tensor([999], dtype=torch.int32).view(torch.uint8)
        return up

    s, rows, run_dir = _in_process(tiny_base, tmp_path, "sa_dp", [
        "fed.num_clients=6", "fed.sampling=all", "fed.rounds=1", "privacy.secagg=true", "comm.uplink=[int8]",
        "privacy.dp.noise_multiplier=0.5", "privacy.dp.mode=distributed", "privacy.dp.min_clients=3",
        "privacy.dp.noise_seed=1"], tamper)
    r = rows[1]
    sa_row = r["privacy"]["secagg"]
    assert sa_row["roster"] == 5 and sa_row["survivors"] == 4  # 6 - bad key; - forged masked message
    assert len(r["clients"]["rejected"]) == 2 and "not_applied" not in r["privacy"]
    assert r["privacy"]["epsilon"] == pytest.approx(acc.epsilon("pld", [(1.0, 0.5)], 1e-5))
    assert "secure aggregation" in s["privacy"]["guarantee"] and "distributed noise" in s["privacy"]["guarantee"]
    from fed_ddp.checkpoint import load_state

    assert torch.isfinite(load_state(run_dir / "checkpoints" / "round_0001")["global"]).all()


def test_distributed_noise_needs_min_clients_and_an_unapplied_round_costs_nothing(tiny_base, tmp_path):
    """4 clients, min_clients = 4, seeded dropouts: round 1 keeps all 4 (applied, counted), round 2 loses two
    (not applied: no noised aggregate, nothing in the ledger, the adapter unchanged)."""
    from fed_ddp.checkpoint import load_state

    s, rows, run_dir = _in_process(tiny_base, tmp_path, "few", [
        "fed.num_clients=4", "fed.sampling=all", "fed.rounds=2", "run.seed=3", "fed.dropout_rate=0.3",
        "privacy.dp.noise_multiplier=1.0", "privacy.dp.mode=distributed", "privacy.dp.min_clients=4"])
    assert "not_applied" not in rows[1]["privacy"] and "min_clients=4" in rows[2]["privacy"]["not_applied"]
    ledger = [json.loads(x) for x in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    assert [r["round"] for r in ledger] == [1] and s["privacy"]["noised_rounds"] == 1
    g1, g2 = (load_state(run_dir / "checkpoints" / f"round_{r:04d}")["global"] for r in (1, 2))
    assert torch.equal(g1, g2)
    assert "without secure aggregation the server saw each update" in s["privacy"]["guarantee"]


def test_what_leaves_the_server_under_dp_names_no_client():
    from fed_ddp.tracking import public_row

    row = {"round": 3, "clients": {"sampled": [4, 9]}, "train_loss": {"4": 0.1}, "train_loss_mean": 0.1,
           "num_examples": {"4": 8}, "train_seconds": {"4": 1.0}, "val_loss": 0.2,
           "privacy": {"epsilon": 1.5, "unclipped": 2, "clip": 10.0}}
    assert public_row(row) == {"round": 3, "val_loss": 0.2, "privacy": {"epsilon": 1.5, "clip": 10.0}}


def test_a_ledger_line_cut_short_counts_as_a_spent_round(tmp_path):
    from fed_ddp.privacy.engine import LEDGER, ServerPrivacy, resolve

    cfg = load_config(POP, ["privacy.dp.noise_multiplier=1.0"])
    sp = ServerPrivacy(resolve(cfg), 10, tmp_path)
    sp.record(1)
    sp.record(2)
    with open(tmp_path / LEDGER, "a") as f:
        f.write('{"round": 3, "q"')  # the crash
    again = ServerPrivacy(resolve(cfg), 10, tmp_path)
    again.load_state_dict({"clip": 10.0, "z": 1.0, "z_delta": 1.0, "accountant": {"steps": [[0.1, 1.0]]}})
    assert again.accountant.steps == [(0.1, 1.0)] * 3
