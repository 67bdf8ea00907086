"""Server strategies (FedAvg, FedProx, FedAvgM, FedAdam, FedAdagrad, FedYogi) and the flat-buffer protocol,
checked against independent float64 numpy references."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from fed_ddp.compression import ChainState
from fed_ddp.config import CommSection, load_config
from fed_ddp.protocol import HEAD_BYTES, PLAN_BYTES, UP_FIELDS, UP_TAIL_BYTES, Wire
from fed_ddp.strategies import (
    REGISTRY,
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    RoundPlan,
    build_strategy,
    register,
    weighted_mean,
)

P = 37  # adapter size used throughout


def _updates(seed: int, counts: list[int], p: int = P) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [ClientUpdate(client_id=i, delta=torch.from_numpy(rng.normal(size=p).astype(np.float32)),
                         num_examples=n) for i, n in enumerate(counts)]


def _ref_mean(updates: list[ClientUpdate]) -> np.ndarray:
    """Sample-weighted mean in float64, written independently of fed_ddp."""
    d = np.stack([u.delta.numpy().astype(np.float64) for u in updates])
    w = np.array([u.num_examples for u in updates], dtype=np.float64)
    return (w[:, None] * d).sum(axis=0) / w.sum()


def _global(seed: int = 123, p: int = P) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=p).astype(np.float32))


# ----------------------------------------------------------------------------- FedAvg / weighted mean

@pytest.mark.parametrize("server_lr", [1.0, 0.5, 2.0])
def test_fedavg_moves_global_by_server_lr_times_weighted_mean(server_lr):
    updates = _updates(0, [3, 50, 7, 140])
    g = _global()
    g_before = g.clone()
    new, metrics = FedAvg(local_steps=5, lr=1e-3, server_lr=server_lr).aggregate(1, g, updates)

    ref_mean = _ref_mean(updates)
    ref = g_before.numpy().astype(np.float64) + server_lr * ref_mean
    assert new.shape == g.shape
    np.testing.assert_allclose(new.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert metrics["update_norm"] == pytest.approx(np.linalg.norm(ref_mean), rel=1e-5)
    # the input global vector is not modified in place
    assert torch.equal(g, g_before)


def test_weighted_mean_weights_by_num_examples_not_uniformly():
    ones = torch.ones(4)
    zeros = torch.zeros(4)
    updates = [ClientUpdate(0, ones, num_examples=3), ClientUpdate(1, zeros, num_examples=1)]
    out = weighted_mean(updates)
    # 3/4 weight on the ones vector; a uniform mean would give 0.5
    np.testing.assert_allclose(out.numpy(), np.full(4, 0.75), rtol=0, atol=1e-7)

    # swapping the counts moves the mean to the other side
    swapped = [ClientUpdate(0, ones, num_examples=1), ClientUpdate(1, zeros, num_examples=3)]
    np.testing.assert_allclose(weighted_mean(swapped).numpy(), np.full(4, 0.25), rtol=0, atol=1e-7)


def test_weighted_mean_matches_float64_reference_for_very_unequal_counts():
    updates = _updates(1, [1, 10, 1000])
    out = weighted_mean(updates)
    ref = _ref_mean(updates)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-7)
    # and is clearly not the unweighted mean
    unweighted = np.mean([u.delta.numpy().astype(np.float64) for u in updates], axis=0)
    assert np.abs(out.double().numpy() - unweighted).max() > 1e-2
    assert out.dtype == updates[0].delta.dtype


def test_client_with_zero_examples_has_no_influence():
    updates = _updates(2, [5, 0, 9])
    out = weighted_mean(updates)
    ref = _ref_mean([updates[0], updates[2]])
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [FedAvg, FedProx, FedAdam, FedAvgM, FedAdagrad, FedYogi])
def test_zero_total_examples_raises_value_error(cls):
    updates = _updates(3, [0, 0])
    with pytest.raises(ValueError, match="no examples"):
        cls(local_steps=1, lr=1e-3).aggregate(0, _global(), updates)


def test_weighted_mean_of_no_updates_raises_value_error():
    with pytest.raises(ValueError):
        weighted_mean([])


# ----------------------------------------------------------------------------- FedAdam

def _ref_fedadam(global0: np.ndarray, rounds: list[list[ClientUpdate]], eta: float, b1: float, b2: float,
                 tau: float) -> list[np.ndarray]:
    """Independent numpy FedAdam (no bias correction); returns the global after every round."""
    w = global0.astype(np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    out = []
    for updates in rounds:
        d = _ref_mean(updates)
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        w = w + eta * m / (np.sqrt(v) + tau)
        out.append(w.copy())
    return out


def test_fedadam_three_rounds_match_numpy_reference():
    eta, b1, b2, tau = 0.05, 0.8, 0.95, 1e-2
    strat = FedAdam(local_steps=3, lr=1e-3, server_lr=eta, beta1=b1, beta2=b2, tau=tau)
    rounds = [_updates(10 + r, [4 + r, 20, 9 * (r + 1)]) for r in range(3)]
    g0 = _global(7)
    refs = _ref_fedadam(g0.numpy(), rounds, eta, b1, b2, tau)

    g = g0
    for r, (updates, ref) in enumerate(zip(rounds, refs)):
        g_prev = g.double().numpy()
        g, metrics = strat.aggregate(r, g, updates)
        np.testing.assert_allclose(g.double().numpy(), ref, rtol=1e-5, atol=1e-6)
        # the reported norm is that of the step actually taken
        assert metrics["update_norm"] == pytest.approx(np.linalg.norm(ref - g_prev), rel=1e-4, abs=1e-6)

    # sanity: FedAdam is not FedAvg (guards against the reference being trivially equal)
    fedavg_w = g0.double().numpy() + eta * sum(_ref_mean(u) for u in rounds)
    assert np.abs(refs[-1] - fedavg_w).max() > 1e-3


def test_fedadam_first_step_closed_form():
    # with m = v = 0: step = eta*(1-b1)*d / (sqrt(1-b2)*|d| + tau)
    eta, b1, b2, tau = 1.0, 0.9, 0.99, 1e-3
    d = np.array([2.0, -0.5, 0.0, 1e-4], dtype=np.float32)
    strat = FedAdam(local_steps=1, lr=1e-3, server_lr=eta, beta1=b1, beta2=b2, tau=tau)
    new, _ = strat.aggregate(0, torch.zeros(4), [ClientUpdate(0, torch.from_numpy(d), 10)])
    d64 = d.astype(np.float64)
    expected = eta * (1 - b1) * d64 / (np.sqrt(1 - b2) * np.abs(d64) + tau)
    np.testing.assert_allclose(new.double().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_fedadam_state_dict_round_trip_continues_identically():
    kw = {"local_steps": 2, "lr": 1e-3, "server_lr": 0.1, "beta1": 0.85, "beta2": 0.97, "tau": 1e-3}
    rounds = [_updates(20 + r, [10, 3 + r, 30]) for r in range(4)]
    a = FedAdam(**kw)
    g = _global(9)
    for r in range(2):
        g, _ = a.aggregate(r, g, rounds[r])

    # simulate a checkpoint: serialise the state through torch.save/torch.load
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)

    b = FedAdam(**kw)
    b.load_state_dict(state)
    cold = FedAdam(**kw)  # same hyper-parameters but no restored moments

    ga, gb, gc = g, g.clone(), g.clone()
    for r in range(2, 4):
        ga, _ = a.aggregate(r, ga, rounds[r])
        gb, _ = b.aggregate(r, gb, rounds[r])
        gc, _ = cold.aggregate(r, gc, rounds[r])
    assert torch.equal(ga, gb)

    # and the restored run equals the uninterrupted numpy reference over all 4 rounds
    ref = _ref_fedadam(_global(9).numpy(), rounds, kw["server_lr"], kw["beta1"], kw["beta2"], kw["tau"])[-1]
    np.testing.assert_allclose(gb.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    # the state matters: without it the continuation differs
    assert np.abs(gc.double().numpy() - ref).max() > 1e-4


def test_fedadam_state_dict_of_fresh_strategy_loads_into_fresh_strategy():
    kw = {"local_steps": 2, "lr": 1e-3, "server_lr": 0.1}
    fresh = FedAdam(**kw)
    other = FedAdam(**kw)
    other.load_state_dict(fresh.state_dict())
    updates = _updates(30, [5, 6])
    g1, _ = fresh.aggregate(0, _global(), updates)
    g2, _ = other.aggregate(0, _global(), updates)
    ref = _ref_fedadam(_global().numpy(), [updates], 0.1, 0.9, 0.99, 1e-3)[0]
    np.testing.assert_allclose(g2.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(g1, g2)


# ----------------------------------------------------------------------------- FedAvgM / FedAdagrad / FedYogi

def _ref_fedavgm(global0: np.ndarray, deltas: list[np.ndarray], eta: float, beta: float) -> list[np.ndarray]:
    """Independent numpy FedAvgM (Hsu et al. 2019): m = beta*m + d; w = w + eta*m, m starting at 0."""
    w = global0.astype(np.float64).copy()
    m = np.zeros_like(w)
    out = []
    for d in deltas:
        m = beta * m + d
        w = w + eta * m
        out.append(w.copy())
    return out


def _ref_fedopt(global0: np.ndarray, deltas: list[np.ndarray], rule: str, eta: float, b1: float, b2: float,
                tau: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Independent numpy FedAdagrad / FedYogi (Reddi et al. 2021, Algorithm 2, no bias correction, m = v = 0
    at the start); returns (global, v) after every round."""
    w = global0.astype(np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    out = []
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if rule == "adagrad":
            v = v + d ** 2
        elif rule == "yogi":
            v = v - (1 - b2) * d ** 2 * np.sign(v - d ** 2)
        else:
            raise AssertionError(rule)
        w = w + eta * m / (np.sqrt(v) + tau)
        out.append((w.copy(), v.copy()))
    return out


def _random_rounds(seed: int, n: int) -> list[list[ClientUpdate]]:
    """n rounds of 2..5 clients with random deltas, scales and example counts."""
    rng = np.random.default_rng(seed)
    rounds = []
    for r in range(n):
        counts = [int(c) for c in rng.integers(1, 200, size=int(rng.integers(2, 6)))]
        ups = _updates(seed * 100 + r, counts)
        scale = float(rng.uniform(0.05, 3.0))  # the pseudo-gradient's size changes from round to round
        rounds.append([ClientUpdate(u.client_id, u.delta * scale, u.num_examples) for u in ups])
    return rounds


STATEFUL = {  # strategy class, hyper-parameters, numpy reference of the global after every round
    "fedavgm": (FedAvgM, {"server_lr": 0.3, "server_momentum": 0.7},
                lambda g0, ds: _ref_fedavgm(g0, ds, 0.3, 0.7)),
    "fedadagrad": (FedAdagrad, {"server_lr": 0.05, "beta1": 0.8, "tau": 1e-2},
                   lambda g0, ds: [w for w, _ in _ref_fedopt(g0, ds, "adagrad", 0.05, 0.8, 0.0, 1e-2)]),
    "fedyogi": (FedYogi, {"server_lr": 0.05, "beta1": 0.8, "beta2": 0.9, "tau": 1e-2},
                lambda g0, ds: [w for w, _ in _ref_fedopt(g0, ds, "yogi", 0.05, 0.8, 0.9, 1e-2)]),
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_stateful_strategy_rounds_match_numpy_reference(name):
    cls, hp, ref_fn = STATEFUL[name]
    strat = cls(local_steps=3, lr=1e-3, **hp)
    rounds = _random_rounds(70, 6)
    g0 = _global(8)
    refs = ref_fn(g0.numpy(), [_ref_mean(u) for u in rounds])

    g = g0
    for r, (updates, ref) in enumerate(zip(rounds, refs)):
        g_prev = g.double().numpy()
        g, metrics = strat.aggregate(r, g, updates)
        assert g.dtype == torch.float32 and g.shape == g0.shape
        np.testing.assert_allclose(g.double().numpy(), ref, rtol=1e-5, atol=1e-5)
        # the reported norm is that of the step actually taken
        assert metrics["update_norm"] == pytest.approx(np.linalg.norm(ref - g_prev), rel=1e-4, abs=1e-6)

    # sanity: neither FedAvg nor FedAdam with the same server_lr (the reference is not trivially equal to them)
    deltas = [_ref_mean(u) for u in rounds]
    fedavg_w = g0.double().numpy() + hp["server_lr"] * sum(deltas)
    fedadam_w = _ref_fedadam(g0.numpy(), rounds, hp["server_lr"], hp.get("beta1", 0.9), hp.get("beta2", 0.99),
                             hp.get("tau", 1e-3))[-1]
    assert np.abs(refs[-1] - fedavg_w).max() > 1e-2
    assert np.abs(refs[-1] - fedadam_w).max() > 1e-3


@pytest.mark.parametrize("name", list(STATEFUL))
def test_stateful_strategy_combines_with_the_robust_aggregator(name):
    """d is the robust combination when ``fed.aggregator`` asks for one (here the coordinate-wise median)."""
    cls, hp, ref_fn = STATEFUL[name]
    strat = cls(local_steps=1, lr=1e-3, aggregator="median", **hp)
    rounds = [_updates(80 + r, [1, 500, 3, 7, 2]) for r in range(3)]  # odd count: one middle value
    g = _global(4)
    refs = ref_fn(g.numpy(), [np.median(np.stack([u.delta.numpy().astype(np.float64) for u in ups]), axis=0)
                              for ups in rounds])
    for r, updates in enumerate(rounds):
        g, _ = strat.aggregate(r, g, updates)
    np.testing.assert_allclose(g.double().numpy(), refs[-1], rtol=1e-5, atol=1e-5)
    # the counts do not matter to the median: the weighted mean would have landed elsewhere
    assert np.abs(ref_fn(_global(4).numpy(), [_ref_mean(u) for u in rounds])[-1] - refs[-1]).max() > 1e-2


@pytest.mark.parametrize("name", list(STATEFUL))
def test_stateful_strategy_checkpoint_round_trip_continues_bit_identically(name, tmp_path):
    """The server state goes through the real checkpoint file (write_state / load_state) mid-sequence."""
    from fed_ddp.checkpoint import STATE, load_state, write_state

    cls, hp, ref_fn = STATEFUL[name]
    kw = {"local_steps": 2, "lr": 1e-3, **hp}
    rounds = _random_rounds(90, 5)
    a = cls(**kw)

    # a fresh strategy's state (moments not yet allocated: None) survives the file too
    write_state(tmp_path / STATE, {"round": 0, "strategy": a.state_dict()})
    fresh = cls(**kw)
    fresh.load_state_dict(load_state(tmp_path)["strategy"])

    g = _global(9)
    for r in range(3):
        g, _ = a.aggregate(r, g, rounds[r])
    state = a.state_dict()
    assert state and all(isinstance(t, torch.Tensor) for t in state.values())
    write_state(tmp_path / STATE, {"round": 3, "global": g, "strategy": state})
    stored = load_state(tmp_path)

    b = cls(**kw)
    b.load_state_dict(stored["strategy"])
    cold = cls(**kw)  # same hyper-parameters, no restored state
    ga, gb, gc = g, stored["global"], g.clone()
    for r in range(3, 5):
        ga, _ = a.aggregate(r, ga, rounds[r])
        gb, _ = b.aggregate(r, gb, rounds[r])
        gc, _ = cold.aggregate(r, gc, rounds[r])
    assert torch.equal(ga, gb)
    for k, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[k]), k

    ref = ref_fn(_global(9).numpy(), [_ref_mean(u) for u in rounds])[-1]
    np.testing.assert_allclose(gb.double().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert np.abs(gc.double().numpy() - ref).max() > 1e-4  # the state matters

    gf, _ = fresh.aggregate(0, _global(9), rounds[0])
    gn, _ = cls(**kw).aggregate(0, _global(9), rounds[0])
    assert torch.equal(gf, gn)


@pytest.mark.parametrize("server_lr", [1.0, 0.3])
def test_fedavgm_with_zero_momentum_is_fedavg(server_lr):
    m, avg = FedAvgM(local_steps=1, lr=1e-3, server_lr=server_lr, server_momentum=0.0), FedAvg(
        local_steps=1, lr=1e-3, server_lr=server_lr)
    gm = ga = _global(6)
    for r, updates in enumerate(_random_rounds(100, 4)):
        gm, _ = m.aggregate(r, gm, updates)
        ga, _ = avg.aggregate(r, ga, updates)
        assert torch.equal(gm, ga)


def test_fedavgm_velocity_accumulates_a_constant_delta():
    # the same d every round: m_t = (1 + beta + ... + beta^t) d, the step tends to server_lr/(1-beta) x d
    beta, eta = 0.5, 1.0
    d = torch.tensor([1.0, -2.0, 0.25])
    strat = FedAvgM(local_steps=1, lr=1e-3, server_lr=eta, server_momentum=beta)
    g = torch.zeros(3)
    for r, factor in enumerate([1.0, 1.5, 1.75, 1.875]):
        g_prev = g
        g, _ = strat.aggregate(r, g, [ClientUpdate(0, d, 4)])
        assert torch.equal(strat.state_dict()["m"], factor * d)
        assert torch.equal(g - g_prev, eta * factor * d)


def test_fedyogi_second_moment_differs_from_adam_where_the_sign_matters():
    """b2 = 0.75, values exact in fp32. Round 1 (v = 0): Yogi's v is Adam's, 0.25*d^2. Round 2:
    coordinate 0: v = 1 > d^2 = 0.25: Yogi subtracts 0.25*0.25 (0.9375), Adam decays to 0.8125;
    coordinate 1: v = 0.0625 < d^2 = 4: Yogi adds 0.25*4 (1.0625), Adam moves to 1.046875;
    coordinate 2: v = d^2 = 1: sign 0, both keep 1;  coordinate 3: d = 0 throughout: v stays 0, no step."""
    kw = {"local_steps": 1, "lr": 1e-3, "server_lr": 0.1, "beta1": 0.5, "beta2": 0.75, "tau": 1e-3}
    yogi, adam, adagrad = FedYogi(**kw), FedAdam(**kw), FedAdagrad(**kw)
    d1 = torch.tensor([2.0, 0.5, 2.0, 0.0])
    d2 = torch.tensor([0.5, 2.0, 1.0, 0.0])
    gy = ga = gg = torch.zeros(4)
    for r, d in enumerate([d1, d2]):
        gy, _ = yogi.aggregate(r, gy, [ClientUpdate(0, d, 3)])
        ga, _ = adam.aggregate(r, ga, [ClientUpdate(0, d, 3)])
        gg, _ = adagrad.aggregate(r, gg, [ClientUpdate(0, d, 3)])
        if r == 0:
            assert torch.equal(yogi.state_dict()["v"], torch.tensor([1.0, 0.0625, 1.0, 0.0]))
            assert torch.equal(yogi.state_dict()["v"], adam.state_dict()["v"])
            assert torch.equal(gy, ga)
    assert torch.equal(yogi.state_dict()["v"], torch.tensor([0.9375, 1.0625, 1.0, 0.0]))
    assert torch.equal(adam.state_dict()["v"], torch.tensor([0.8125, 1.046875, 1.0, 0.0]))
    assert torch.equal(adagrad.state_dict()["v"], torch.tensor([4.25, 4.25, 5.0, 0.0]))
    for s in (yogi, adam, adagrad):
        assert torch.equal(s.state_dict()["m"], torch.tensor([0.75, 1.125, 1.0, 0.0]))  # same m for all three
    assert gy[3] == 0 and ga[3] == 0 and gg[3] == 0
    assert torch.equal(gy[2], ga[2]) and not torch.equal(gy[:2], ga[:2])

    # the independent reference agrees on v and w
    (_, v1), (w2, v2) = _ref_fedopt(np.zeros(4), [d1.double().numpy(), d2.double().numpy()], "yogi", 0.1, 0.5,
                                    0.75, 1e-3)
    np.testing.assert_array_equal(v1, [1.0, 0.0625, 1.0, 0.0])
    np.testing.assert_array_equal(v2, [0.9375, 1.0625, 1.0, 0.0])
    np.testing.assert_allclose(gy.double().numpy(), w2, rtol=1e-6, atol=1e-7)


def test_fedadagrad_ignores_beta2_and_never_forgets():
    rounds = _random_rounds(110, 3)
    out = []
    for b2 in (0.0, 0.5, 0.99):
        s = FedAdagrad(local_steps=1, lr=1e-3, server_lr=0.1, beta1=0.9, beta2=b2, tau=1e-3)
        g = _global(1)
        for r, updates in enumerate(rounds):
            g, _ = s.aggregate(r, g, updates)
        out.append((g, s.state_dict()["v"]))
    assert all(torch.equal(g, out[0][0]) for g, _ in out)
    # v is the running sum of d^2
    np.testing.assert_allclose(out[0][1].double().numpy(), sum(_ref_mean(u) ** 2 for u in rounds), rtol=1e-5)


# ----------------------------------------------------------------------------- build_strategy / plans

def test_fedprox_aggregates_like_fedavg_and_plans_carry_mu():
    cfg = load_config(None, ["fed.strategy=fedprox", "fed.proximal_mu=0.05", "fed.local_steps=7",
                             "train.lr=0.003", "fed.server_lr=0.7"])
    strat = build_strategy(cfg.fed, cfg.train)
    assert isinstance(strat, FedProx)

    plan = strat.configure_round(4)
    assert isinstance(plan, RoundPlan)
    assert (plan.round, plan.local_steps) == (4, 7)
    assert plan.lr == pytest.approx(0.003)
    assert plan.proximal_mu == pytest.approx(0.05)

    updates = _updates(40, [12, 2, 33])
    g = _global(11)
    new, _ = strat.aggregate(4, g, updates)
    ref = g.double().numpy() + 0.7 * _ref_mean(updates)
    np.testing.assert_allclose(new.double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_fedavg_plan_has_zero_mu_even_when_config_sets_one():
    cfg = load_config(None, ["fed.strategy=fedavg", "fed.proximal_mu=0.05", "fed.local_steps=9",
                             "train.lr=0.004"])
    strat = build_strategy(cfg.fed, cfg.train)
    assert type(strat) is FedAvg
    plan = strat.configure_round(2)
    assert plan.proximal_mu == 0.0
    assert (plan.round, plan.local_steps) == (2, 9)
    assert plan.lr == pytest.approx(0.004)


def test_build_fedadam_uses_configured_hyperparameters():
    cfg = load_config(None, ["fed.strategy=fedadam", "fed.server_lr=0.2", "fed.beta1=0.5", "fed.beta2=0.6",
                             "fed.tau=0.05", "fed.proximal_mu=0.3"])
    strat = build_strategy(cfg.fed, cfg.train)
    assert isinstance(strat, FedAdam)
    assert strat.configure_round(0).proximal_mu == 0.0
    rounds = [_updates(50 + r, [3, 8]) for r in range(2)]
    g = _global(5)
    for r in range(2):
        g, _ = strat.aggregate(r, g, rounds[r])
    ref = _ref_fedadam(_global(5).numpy(), rounds, 0.2, 0.5, 0.6, 0.05)[-1]
    np.testing.assert_allclose(g.double().numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,cls,rule", [("fedadagrad", FedAdagrad, "adagrad"), ("fedyogi", FedYogi, "yogi")])
def test_build_adaptive_strategies_use_configured_hyperparameters(name, cls, rule):
    cfg = load_config(None, [f"fed.strategy={name}", "fed.server_lr=0.2", "fed.beta1=0.5", "fed.beta2=0.6",
                             "fed.tau=0.05", "fed.proximal_mu=0.3", "fed.server_momentum=0.4"])
    strat = build_strategy(cfg.fed, cfg.train)
    assert type(strat) is cls
    assert (strat.server_lr, strat.beta1, strat.beta2, strat.tau) == (0.2, 0.5, 0.6, 0.05)
    assert strat.configure_round(0).proximal_mu == 0.0
    rounds = [_updates(55 + r, [3, 8]) for r in range(3)]
    g = _global(5)
    for r in range(3):
        g, _ = strat.aggregate(r, g, rounds[r])
    ref = _ref_fedopt(_global(5).numpy(), [_ref_mean(u) for u in rounds], rule, 0.2, 0.5, 0.6, 0.05)[-1][0]
    np.testing.assert_allclose(g.double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_build_fedavgm_uses_configured_momentum():
    cfg = load_config(None, ["fed.strategy=fedavgm", "fed.server_lr=0.4", "fed.server_momentum=0.6",
                             "fed.proximal_mu=0.3", "fed.beta1=0.1"])
    strat = build_strategy(cfg.fed, cfg.train)
    assert type(strat) is FedAvgM and strat.server_momentum == 0.6
    assert strat.configure_round(0).proximal_mu == 0.0
    assert load_config(None, ["fed.strategy=fedavgm"]).fed.server_momentum == 0.9  # the default
    rounds = [_updates(65 + r, [9, 2, 4]) for r in range(3)]
    g = _global(5)
    for r in range(3):
        g, _ = strat.aggregate(r, g, rounds[r])
    ref = _ref_fedavgm(_global(5).numpy(), [_ref_mean(u) for u in rounds], 0.4, 0.6)[-1]
    np.testing.assert_allclose(g.double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_unknown_strategy_name_is_refused():
    cfg = load_config(None, [])
    cfg.fed.strategy = "fedsgd"  # bypasses config validation on purpose
    with pytest.raises(ValueError, match="fedsgd") as ei:
        build_strategy(cfg.fed, cfg.train)
    assert "fedavg" in str(ei.value)


def test_registering_an_existing_name_is_refused():
    before = dict(REGISTRY)
    with pytest.raises(ValueError, match="already registered"):
        register("fedavg", FedProx)
    assert REGISTRY == before


# ----------------------------------------------------------------------------- protocol

DENSE = Wire(CommSection(), [("w", (P,))], workers=3)  # empty chains: dense fp32; 3 workers


@pytest.mark.parametrize("stop", [False, True])
def test_head_round_trip(stop):
    plan = RoundPlan(round=17, local_steps=250, lr=0.002, proximal_mu=0.01)
    head = DENSE.pack_head(plan, slots=4, stop=stop)
    assert head.dtype == torch.uint8 and head.ndim == 1 and head.numel() == HEAD_BYTES
    h = DENSE.unpack_head(head)
    assert h.stop is stop and h.slots == 4
    assert h.plan.round == 17 and h.plan.local_steps == 250
    assert isinstance(h.plan.round, int) and isinstance(h.plan.local_steps, int)
    # the head travels as fp32: compare to the fp32-rounded value
    assert h.plan.lr == pytest.approx(0.002, rel=1e-7)
    assert h.plan.proximal_mu == pytest.approx(0.01, rel=1e-7)


def test_plan_values_travel_after_the_head_fields_and_count_in_every_clients_down_bytes():
    """A strategy's plan values: fp32 after the six head fields, in ``plan_values`` order, whatever order the plan
    holds them in; 4 B each in the head and in every client's down_bytes (metadata: protocol fields)."""
    wire = Wire(CommSection(), [("w", (P,))], workers=3, plan_values=("anneal", "scale"))
    plan = RoundPlan(round=3, local_steps=5, lr=0.01, values={"scale": -2.5, "anneal": 0.1})
    head = wire.pack_head(plan, slots=2)
    assert head.numel() == wire.head_nbytes == 4 * (6 + 2)
    fields = np.frombuffer(head.numpy().tobytes(), dtype=np.float32)  # decoded apart from fed_ddp
    np.testing.assert_array_equal(fields, np.array([0, 3, 5, 0.01, 0, 2, 0.1, -2.5], dtype=np.float32))
    got = wire.unpack_head(head)
    assert got.plan.values == {"anneal": float(np.float32(0.1)), "scale": -2.5} and got.slots == 2
    assert (got.plan.round, got.plan.local_steps) == (3, 5)
    assert wire.down_bytes.payload == DENSE.down_bytes.payload == 4 * P
    assert wire.down_bytes.metadata == DENSE.down_bytes.metadata + 8 == 4 * (5 + 2)
    with pytest.raises(ValueError, match=f"downlink head buffer: expected {4 * 8} uint8 bytes"):
        wire.unpack_head(DENSE.pack_head(plan, slots=2))  # a head without them is refused, never misread
    assert DENSE.unpack_head(DENSE.pack_head(plan, slots=2)).plan.values == {}  # a wire without: none travel


def test_every_built_in_declares_no_plan_values_and_the_reserved_names_cover_the_head():
    from fed_ddp.protocol import HEAD_FIELDS
    from fed_ddp.strategies import Strategy

    assert set(HEAD_FIELDS) | {"values"} == set(Strategy.RESERVED)
    for name in ("fedavg", "fedprox", "fedadam", "fedavgm", "fedadagrad", "fedyogi", "ffa_lora", "flexlora",
                 "scaffold"):
        assert REGISTRY[name].plan_values == ()
        REGISTRY[name].check_plan_values(name)


class _Planned(FedAvg):
    plan_values = ("anneal",)
    gives: dict[str, object]  # what configure_round puts in the plan's values

    def configure_round(self, rnd):
        plan = super().configure_round(rnd)
        plan.values.update(self.gives)
        return plan


@pytest.mark.parametrize(("gives", "said"), [
    ({}, "fed.strategy=planned: configure_round(4) gave no plan value 'anneal' (its plan_values: anneal)"),
    ({"anneal": 1.0, "other": 2.0}, ("fed.strategy=planned: configure_round(4) gave plan value 'other', which "
                                     "it does not declare (its plan_values: anneal)")),
    ({"anneal": float("nan")}, ("fed.strategy=planned: configure_round(4) gave plan value anneal=nan: must be a "
                                "number, finite in fp32")),
    ({"anneal": 1e39}, "plan value anneal=1e+39: must be a number, finite in fp32"),  # inf once in fp32
    ({"anneal": "0.5"}, "plan value anneal='0.5': must be a number, finite in fp32"),
])
def test_a_plan_that_misses_a_declared_value_or_adds_one_is_one_line_naming_the_strategy(gives, said):
    from types import SimpleNamespace

    from fed_ddp.server.loop import Server

    strat = _Planned(local_steps=2, lr=0.1)
    strat.gives = gives
    server = SimpleNamespace(strategy=strat, cfg=SimpleNamespace(fed=SimpleNamespace(strategy="planned")))
    with pytest.raises(ValueError) as e:
        Server.plan(server, 4)  # what plans every round on the server (and the stop head)
    assert said in str(e.value) and "\n" not in str(e.value)
    strat.gives = {"anneal": 0.5}
    assert Server.plan(server, 4).values == {"anneal": 0.5}  # exactly the declared ones: fine


def test_body_carries_the_table_and_the_global():
    g = _global(3)
    table = [[4, 9], [], [1000000]]
    body = DENSE.pack_body(table, g)
    assert body.numel() == DENSE.body_nbytes(2) == 8 * 3 * 2 + 4 * P  # int32 table [3 x 2 x (id, state round)] + fp32
    got_table, got_g = DENSE.unpack_body(body, 2)
    assert got_table == table and torch.equal(got_g, g)
    assert DENSE.up_sizes(table) == [2 * DENSE.up_nbytes, 0, DENSE.up_nbytes]
    empty = DENSE.pack_body([[], [], []], g)  # nobody this round: no table, the global still travels
    t0, g0 = DENSE.unpack_body(empty, 0)
    assert t0 == [[], [], []] and torch.equal(g0, g) and empty.numel() == 4 * P
    with pytest.raises(ValueError, match="rows"):
        DENSE.pack_body([[1]], g)


def test_body_casts_float64_global_to_float32():
    g64 = torch.from_numpy(np.random.default_rng(4).normal(size=P))
    _, got = DENSE.unpack_body(DENSE.pack_body([[0], [1], [2]], g64), 1)
    np.testing.assert_array_equal(got.numpy(), g64.numpy().astype(np.float32))


def test_uplink_round_trip():
    delta = torch.from_numpy(np.random.default_rng(6).normal(size=P).astype(np.float32))
    metrics = {"train_loss": 0.125, "train_seconds": 3.5, "client_seconds": 4.75}
    buf = DENSE.pack_uplink(3, delta, None, 123457, metrics)
    assert buf.dtype == torch.uint8
    assert buf.ndim == 1 and buf.numel() == DENSE.up_nbytes == 4 * P + 4 + 4 * len(UP_FIELDS)

    up = DENSE.unpack_uplink(buf)
    assert isinstance(up, ClientUpdate)
    assert up.client_id == 3
    assert up.num_examples == 123457 and isinstance(up.num_examples, int)
    assert torch.equal(up.delta, delta)
    assert up.metrics == metrics  # values chosen exactly representable in fp32
    assert "num_examples" not in up.metrics
    two = torch.cat([buf, DENSE.pack_uplink(70_000_000, delta, None, 1, metrics)])
    assert [DENSE.unpack_uplink(m).client_id for m in DENSE.split_uplink(two, 2)] == [3, 70_000_000]  # int32 ids
    with pytest.raises(ValueError, match="expected"):
        DENSE.split_uplink(two, 3)


def test_uplink_metrics_round_to_fp32():
    metrics = {"train_loss": 0.1, "train_seconds": 1.0 / 3.0, "client_seconds": 12345.678}
    up = DENSE.unpack_uplink(DENSE.pack_uplink(0, torch.zeros(P), None, 2 ** 24, metrics))
    assert up.num_examples == 2 ** 24  # exact up to 2**24, as documented
    for k, v in metrics.items():
        assert up.metrics[k] == float(np.float32(v))


def test_wire_sizes_are_the_codec_messages_plus_protocol_fields():
    layout = [("a.lora_A", (8, 64)), ("a.lora_B", (64, 8)), ("tiny", (5,))]
    wire = Wire(CommSection(uplink=["topk", "int8"], downlink=["fp16"], min_numel=100, topk_fraction=0.25), layout)
    assert wire.down_bytes.payload == 2 * (512 + 512) + 4 * 5 and wire.down_bytes.metadata == PLAN_BYTES
    k = 128  # 25 % of 512 per matrix
    assert wire.up_bytes.payload == 2 * k + 4 * 5  # int8 codes of top-k values; the small tensor as fp32
    assert wire.up_bytes.metadata > UP_TAIL_BYTES  # indices and scales, plus the protocol fields
    buf = wire.pack_uplink(0, torch.randn(1029), ChainState(), 10,
                           {"train_loss": 0.0, "train_seconds": 0.0, "client_seconds": 0.0})
    assert buf.numel() == wire.up_nbytes == wire.up_bytes.total
    with pytest.raises(ValueError, match="expected"):
        wire.unpack_uplink(buf[:-1])


def test_uplink_round_trip_feeds_aggregation():
    """Deltas that went through the wire aggregate to the float64 reference of the originals."""
    originals = _updates(60, [8, 100, 31])
    zeros = {"train_loss": 0.0, "train_seconds": 0.0, "client_seconds": 0.0}
    wire = [DENSE.unpack_uplink(DENSE.pack_uplink(u.client_id, u.delta, None, u.num_examples, zeros))
            for u in originals]
    g = _global(2)
    new, _ = FedAvg(local_steps=1, lr=1e-3).aggregate(0, g, wire)
    ref = g.double().numpy() + _ref_mean(originals)
    np.testing.assert_allclose(new.double().numpy(), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- SCAFFOLD

def test_scaffold_server_update_matches_numpy_over_partial_rounds():
    """x moves by server_lr x the sample-weighted mean delta; c by |S|/N x the plain mean of the Δc_i, so with
    every c_i starting at zero, c stays the mean of all N clients' c_i (also when only some play each round)."""
    from fed_ddp.strategies import Scaffold

    n_clients, lr = 6, 0.7
    rng = np.random.default_rng(11)
    s = Scaffold(local_steps=3, lr=1e-3, server_lr=lr, num_clients=n_clients)
    x = _global(5)
    x_ref = x.double().numpy().copy()
    c_ref = np.zeros(P)
    c_i = np.zeros((n_clients, P))  # what each client keeps, in numpy only
    for rnd, players in enumerate([[0, 2, 5], [1, 2], list(range(n_clients)), [4]], start=1):
        updates, deltas, dcs, counts = [], [], [], []
        for cid in players:
            delta = rng.normal(size=P).astype(np.float32)
            new_ci = rng.normal(size=P).astype(np.float32)  # c_i+: a client's mean gradient
            dc = (new_ci - c_i[cid]).astype(np.float32)
            c_i[cid] = c_i[cid] + dc.astype(np.float64)
            n = int(rng.integers(1, 200))
            updates.append(ClientUpdate(cid, torch.from_numpy(delta), n, control=torch.from_numpy(dc)))
            deltas.append(delta.astype(np.float64))
            dcs.append(dc.astype(np.float64))
            counts.append(n)
        if rnd == 1:
            assert torch.equal(s.downlink(x)[P:], torch.zeros(P))  # c starts at zero and travels after x
        x, metrics = s.aggregate(rnd, x, updates)
        w = np.array(counts, dtype=np.float64)
        x_ref = x_ref + lr * (w[:, None] * np.stack(deltas)).sum(0) / w.sum()
        c_ref = c_ref + len(players) / n_clients * np.stack(dcs).mean(0)
        np.testing.assert_allclose(x.double().numpy(), x_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.c.double().numpy(), c_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.c.double().numpy(), c_i.mean(0), rtol=1e-5, atol=1e-6)
        down = s.downlink(x)
        assert torch.equal(down[:P], x) and torch.equal(down[P:], s.c)
        assert metrics["control_norm"] == pytest.approx(float(np.linalg.norm(c_ref)), rel=1e-5)
    # c is strategy state: a fresh strategy loaded from state_dict continues identically
    again = Scaffold(local_steps=3, lr=1e-3, server_lr=lr, num_clients=n_clients)
    again.load_state_dict({k: v.clone() for k, v in s.state_dict().items()})
    last = [ClientUpdate(3, torch.ones(P), 5, control=torch.full((P,), 0.5))]
    a, _ = s.aggregate(9, x, last)
    b, _ = again.aggregate(9, x, last)
    assert torch.equal(a, b) and torch.equal(s.c, again.c)


def test_scaffold_refuses_updates_without_control_and_robust_aggregators():
    from fed_ddp.strategies import Scaffold

    s = Scaffold(local_steps=1, lr=1e-3, num_clients=3)
    with pytest.raises(ValueError, match=r"clients \[1\] sent no control variate"):
        s.aggregate(1, _global(), [ClientUpdate(0, torch.zeros(P), 1, control=torch.zeros(P)),
                                   ClientUpdate(1, torch.zeros(P), 1)])
    with pytest.raises(ValueError, match="fed.aggregator=mean"):
        Scaffold(local_steps=1, lr=1e-3, num_clients=3, aggregator="median")


def test_screen_rejects_a_non_finite_control_variate():
    from fed_ddp.strategies import screen

    bad = torch.zeros(P)
    bad[3] = float("nan")
    ups = [ClientUpdate(0, torch.zeros(P), 1, control=torch.zeros(P)), ClientUpdate(1, torch.zeros(P), 1, control=bad)]
    kept, why = screen(ups, P)
    assert [u.client_id for u in kept] == [0] and "control variate" in why[1]


def test_control_wire_carries_twice_the_values_through_the_codecs():
    """scaffold's wire: [global, c] down and [Δx_i, Δc_i] up as one vector over the layout plus the prefixed
    control tensors: dense fp32 bytes are exactly twice the adapter's, and the codecs run on the controls too."""
    from fed_ddp.protocol import ControlWire

    wire = ControlWire(CommSection(), [("w", (P,))], workers=3)
    assert wire.num_params == P and wire.layout == [("w", (P,))] and wire.keeps_state
    assert wire.up_nbytes == 8 * P + UP_TAIL_BYTES and wire.down_bytes.total == 8 * P + PLAN_BYTES
    assert wire.up_bytes.payload == 2 * DENSE.up_bytes.payload and wire.up_bytes.metadata == DENSE.up_bytes.metadata
    g, c = _global(1), _global(2)
    body = wire.pack_body([[4], [], [7]], torch.cat([g, c]))
    assert body.numel() == wire.body_nbytes(1) == 8 * 3 + 8 * P
    _, got = wire.unpack_body(body, 1)
    assert [torch.equal(a, b) for a, b in zip(wire.split(got), (g, c))] == [True, True]
    delta, dc = _global(3), _global(4)
    metrics = {"train_loss": 0.5, "train_seconds": 1.0, "client_seconds": 2.0}
    up = wire.unpack_uplink(wire.pack_uplink(7, torch.cat([delta, dc]), None, 11, metrics))
    assert up.client_id == 7 and torch.equal(up.delta, delta) and torch.equal(up.control, dc)
    q = ControlWire(CommSection(uplink=["int8"], downlink=["fp16"], min_numel=0), [("w", (P,))])
    plain = Wire(CommSection(uplink=["int8"], downlink=["fp16"], min_numel=0), [("w", (P,))])
    assert q.up_bytes.payload == 2 * plain.up_bytes.payload and q.down_bytes.payload == 2 * plain.down_bytes.payload
    assert [n for n, _ in q.up.layout] == ["w", "scaffold_c|w"]
