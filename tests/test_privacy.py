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
    assert acc.epsilon("pld", [(0.1, z * 1.05)] * 12, 1e-5) < 4.0  # the smallest such z
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
    server = sa.Server(rnd, t, n, ring)
    roster, bad = server.collect_adverts({c: cl.advert() for c, cl in clients.items()})
    assert not bad
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
    server = sa.Server(1, 3, 500, ring)
    adverts = {c: cl.advert() for c, cl in clients.items()}
    adverts[4] = adverts[4][:4] + bytes(32) + adverts[4][36:]  # an all-zero (low-order) key: refused
    roster, bad = server.collect_adverts(adverts)
    assert list(bad) == [4] and [a.client for a in roster] == [0, 1, 2, 3]
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
    # a responder that lies about a share: the rebuilt seed fails its commitment, never a silent wrong sum
    bad_rev = bytearray(reveals[0])
    bad_rev[10] ^= 0xFF
    with pytest.raises(ValueError, match="commitment|32-byte"):
        server.unmask(masked, {0: bytes(bad_rev), 1: reveals[1], 2: reveals[2]})


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
