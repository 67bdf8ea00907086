"""The simulated wireless edge: channel and device maths against hand-computed values, determinism, the
deadline, the schedulers, FLOP counting against an independent count, and an end-to-end run whose sim_*
figures agree with the bytes it really sent."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from inproc_runs import TINY, finished_run

from fed_ddp.config import ConfigError, load_config
from fed_ddp.wireless import (
    Cell,
    Wireless,
    WirelessSection,
    count_step_flops,
    dbm_to_watts,
    energy_until,
    path_loss_db,
    schedule,
    shannon_rate,
    simulate,
)

N0_W_HZ = 10 ** (-174 / 10) / 1000  # -174 dBm/Hz in W/Hz = 3.981e-21


def test_path_loss_and_units_by_hand():
    assert path_loss_db(1000.0) == pytest.approx(128.1)
    assert path_loss_db(100.0) == pytest.approx(128.1 - 37.6)  # log10(0.1) = -1
    assert path_loss_db(500.0) == pytest.approx(128.1 + 37.6 * -0.30103, abs=1e-4)  # 116.78 dB
    assert dbm_to_watts(10) == pytest.approx(0.01)
    assert dbm_to_watts(33) == pytest.approx(1.99526, rel=1e-5)
    assert dbm_to_watts(-174) == pytest.approx(3.98107e-21, rel=1e-5)


def test_shannon_rate_by_hand():
    # b = 1 MHz, g = 1e-10, p = 10 mW: SNR = 1e-12 / (3.981e-21 * 1e6) = 251.19; log2(252.19) = 7.9783
    assert shannon_rate(1e6, 1e-10, 0.01, N0_W_HZ) == pytest.approx(7.9783e6, rel=1e-4)
    # splitting the band among more clients: each gets less, but more than its share of the bandwidth's rate
    r1, r10 = shannon_rate(20e6, 1e-12, 0.01, N0_W_HZ), shannon_rate(2e6, 1e-12, 0.01, N0_W_HZ)
    assert r10 < r1 < 10 * r10


def _w(**kw) -> WirelessSection:
    return WirelessSection(enabled=True, **kw)


def test_round_clocks_and_energy_by_hand():
    w = _w(shadowing_db=0.0, devices={"phone": {"share": 1.0, "tflops": 2.0, "watts": 4.0}})
    cell = Cell.build(w, 6, seed=3)
    sim = simulate(cell, w, rnd=1, clients=[4, 1, 2], bits_up=8e6, bits_down=16e6, flops=5e12)
    assert sim.clients == [1, 2, 4]
    g = 10 ** (-path_loss_db(cell.distance_m[[1, 2, 4]]) / 10) * cell.fading(1)[[1, 2, 4]]
    np.testing.assert_allclose(sim.gain, g)
    b = 20e6 / 3
    rate = b * np.log2(1 + g * 0.01 / (N0_W_HZ * b))
    np.testing.assert_allclose(sim.rate_up, rate, rtol=1e-12)
    down = 20e6 * math.log2(1 + g.min() * dbm_to_watts(33) / (N0_W_HZ * 20e6))
    assert sim.rate_down == pytest.approx(down)
    np.testing.assert_allclose(sim.compute_s, 2.5)  # 5 TFLOP at 2 TFLOP/s
    np.testing.assert_allclose(sim.upload_s, 8e6 / rate)
    assert sim.download_s == pytest.approx(16e6 / down)
    np.testing.assert_allclose(sim.energy_j, 4.0 * 2.5 + 0.01 * 8e6 / rate)  # watts x compute + p x air time
    np.testing.assert_allclose(sim.total_s, 16e6 / down + 2.5 + 8e6 / rate)
    # a straggler cut off by a deadline inside its upload: full compute energy + p x the air time it had
    i = 0
    cut = sim.download_s + 2.5 + 0.5 * sim.upload_s[i]
    assert energy_until(sim, i, cut) == pytest.approx(4.0 * 2.5 + 0.01 * 0.5 * sim.upload_s[i])
    assert energy_until(sim, i, sim.download_s + 1.0) == pytest.approx(4.0 * 1.0)  # cut during compute


def test_cell_is_deterministic_from_its_seed_and_draws_what_it_says():
    w = _w()
    a, b, c = Cell.build(w, 4000, 7), Cell.build(w, 4000, 7), Cell.build(w, 4000, 8)
    for k in ("distance_m", "shadowing_db", "device_class"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
        assert not np.array_equal(getattr(a, k), getattr(c, k))
    np.testing.assert_array_equal(a.gains(3), b.gains(3))
    assert not np.array_equal(a.gains(3), a.gains(4))  # Rayleigh fading redrawn every round
    assert a.distance_m.min() >= 10 and a.distance_m.max() <= 500
    # area-uniform: P(d <= 250 m) = (250^2 - 10^2) / (500^2 - 10^2) = 0.2499
    assert np.mean(a.distance_m <= 250) == pytest.approx(0.2499, abs=0.02)
    assert np.std(a.shadowing_db) == pytest.approx(8.0, rel=0.05)
    assert np.mean(a.fading(1)) == pytest.approx(1.0, abs=0.05)  # |h|^2 ~ Exp(1)
    shares = np.bincount(a.device_class, minlength=3) / 4000
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.03)
    # a cell of N devices is the first N devices of a larger one (each quantity has its own stream)
    small = Cell.build(w, 10, 7)
    for k in ("distance_m", "shadowing_db", "device_class"):
        np.testing.assert_array_equal(getattr(small, k), getattr(a, k)[:10])


def test_deadline_drops_exactly_the_clients_whose_time_exceeds_it():
    w0 = _w()
    cell = Cell.build(w0, 50, 1)
    clients = list(range(0, 50, 3))
    full = simulate(cell, w0, 2, clients, 2.4e6, 2.5e6, 1e12)
    deadline = float(np.median(full.total_s))
    sim = simulate(cell, _w(deadline_s=deadline), 2, clients, 2.4e6, 2.5e6, 1e12)
    want = [c for c, t in zip(full.clients, full.total_s) if t > deadline]
    assert sim.late == want and 0 < len(want) < len(clients)


def test_schedulers_best_channel_and_age_as_registered_samplers():
    """best_channel and age through the sampler registry (the path a run takes), against the cell's gains and a
    hand-made schedule; without the cell they say what they need."""
    from fed_ddp.population.sampling import Context, sample

    w = _w()
    cell = Cell.build(w, 30, 5)
    reach = np.arange(0, 30, 2)
    never = np.full(30, -1)
    best = sample("best_channel", 4, 0, reach, m=5, num_clients=30, context=Context(never, cell))
    g = cell.gains(4)
    assert len(best) == 5 and set(best) <= set(reach)
    assert min(g[best]) > max(g[[c for c in reach if c not in best]])
    last = np.full(30, 3)
    last[[2, 8, 20]] = -1  # never sampled
    last[[4, 6]] = 1  # sampled longest ago among the rest
    age = sample("age", 4, 0, reach, m=5, num_clients=30, context=Context(last, cell))
    assert set(age) == {2, 8, 20, 4, 6}
    assert set(sample("age", 4, 99, reach, m=5, num_clients=30, context=Context(last, cell))) == set(age)  # no rng
    tied = schedule("age", cell, 4, reach, 3, never)  # all tied: a seeded draw of the cell
    np.testing.assert_array_equal(tied, schedule("age", cell, 4, reach, 3, never))
    assert not np.array_equal(tied, schedule("age", cell, 5, reach, 3, never))
    with pytest.raises(ValueError, match=r"^fed.sampling=best_channel reads the simulated cell: set wireless.enabled"):
        sample("best_channel", 4, 0, reach, m=5, num_clients=30)


class _Mlp(torch.nn.Module):
    """x (B, 16) -> frozen W1 (16->32) -> trainable W2 (32->32) -> frozen W3 (32->16), with the UNet's call form."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Linear(16, 32, bias=False).requires_grad_(False)
        self.w2 = torch.nn.Linear(32, 32, bias=False)
        self.w3 = torch.nn.Linear(32, 16, bias=False).requires_grad_(False)

    def forward(self, x, t, encoder_hidden_states):
        class Out:
            sample = self.w3(self.w2(self.w1(x.flatten(1))))
        return Out()


def test_flop_count_equals_an_independent_count_on_a_small_model():
    b = 8
    forward = 2 * b * (16 * 32 + 32 * 32 + 32 * 16)
    # backward: grad through W3 to W2's output (2 b 32 16) and W2's weight gradient (2 b 32 32); nothing below W2
    # needs a gradient (W1 frozen, inputs constant), so autograd computes neither W2's input grad nor W1's
    backward = 2 * b * 32 * 16 + 2 * b * 32 * 32
    assert count_step_flops(_Mlp(), b, (4, 4), (2, 3)) == forward + backward
    m = _Mlp().requires_grad_(True)  # everything trainable: every weight grad, and input grads down to W1's output
    assert count_step_flops(m, b, (4, 4), (2, 3)) == forward + 2 * forward - 2 * b * 16 * 32


def test_unet_step_flops_counts_lora_below_full_and_linear_in_batch():
    from fed_ddp.wireless import unet_step_flops

    cfg = load_config(TINY, ["train.batch_size=4"])
    lora = unet_step_flops(cfg, None, (1, 8, 8), (8, 32))
    full = unet_step_flops(load_config(TINY, ["train.batch_size=4", "train.method=full"]), None, (1, 8, 8), (8, 32))
    double = unet_step_flops(load_config(TINY, ["train.batch_size=8"]), None, (1, 8, 8), (8, 32))
    assert 0 < lora < full < 2 * lora
    assert double == 2 * lora


@pytest.mark.parametrize("override, needle", [
    ("wireless.bandwidth_hz=-5", "wireless.bandwidth_hz"),
    ("wireless.tx_power_dbm=500", "wireless.tx_power_dbm"),
    ("wireless.bs_power_dbm=-90", "wireless.bs_power_dbm"),
    ("wireless.scheduler=fastest", "wireless.scheduler"),
    ("wireless.deadline_s=-1", "wireless.deadline_s"),
    ("wireless.devices.phone.tflops=0", "wireless.devices.phone.tflops"),
])
def test_bad_wireless_input_is_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["wireless.enabled=true", override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_wireless_scheduler_is_the_older_spelling_of_the_sampler():
    for name in ("best_channel", "age"):
        for more in ([], ["fed.sampling=uniform"], [f"fed.sampling={name}"]):  # uniform: what it needed before
            cfg = load_config(TINY, ["wireless.enabled=true", f"wireless.scheduler={name}", "fed.clients_per_round=2",
                                     *more])
            assert cfg.fed.sampling == name
    assert load_config(TINY, ["wireless.scheduler=age"]).fed.sampling == "uniform"  # no cell: ignored, as before
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["wireless.enabled=true", "wireless.scheduler=age", "fed.sampling=weighted",
                           "fed.clients_per_round=2"])
    assert str(e.value) == ("wireless.scheduler='age': is the older spelling of fed.sampling=age, which contradicts "
                            "fed.sampling=weighted: set only fed.sampling")


@pytest.mark.parametrize("overrides, said", [
    (["wireless.enabled=true", "wireless.scheduler=age"],
     "fed.sampling='age': schedules fed.clients_per_round clients of the cell: set fed.clients_per_round (now null)"),
    (["fed.sampling=best_channel", "fed.clients_per_round=2"],
     "fed.sampling='best_channel': reads the simulated cell's channels: set wireless.enabled=true"),
    (["wireless.enabled=true", "fed.sampling=age", "fed.clients_per_round=2", "privacy.dp.noise_multiplier=1.0"],
     "fed.sampling='age': differential privacy needs poisson"),
    (["wireless.enabled=true", "wireless.scheduler=best_channel", "fed.clients_per_round=2",
      "privacy.dp.noise_multiplier=1.0"], "fed.sampling='best_channel': differential privacy needs poisson"),
])
def test_the_cell_samplers_need_the_cell_m_and_no_dp(overrides, said):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert str(e.value).startswith(said) and "\n" not in str(e.value)


def test_unmeetable_deadline_warns_with_what_the_fastest_device_needs():
    cfg = load_config(TINY, ["wireless.enabled=true", "wireless.deadline_s=0.001", "fed.num_clients=20"])
    ws = Wireless(cfg, step_flops=10 ** 12, up_bytes=300_000, down_bytes=300_000, num_params=75_000)
    msg = ws.deadline_warning(local_steps=3)
    assert "wireless.deadline_s=0.001" in msg and "the fastest (" in msg and "compute" in msg
    assert Wireless(load_config(TINY, ["wireless.enabled=true", "wireless.deadline_s=1000"]), 10 ** 12, 300_000,
                    300_000, 75_000).deadline_warning(3) is None


def test_wireless_run_reports_sim_figures_consistent_with_the_bytes_sent(tiny_base, tmp_path):
    """End to end (the production server loop, in one process): every client's simulated air time x rate is the
    message it really sent, the deadline drops exactly the clients past it, and summary.json adds it all up."""
    run = finished_run(tiny_base, tmp_path, "wl", "wireless.enabled=true", "fed.num_clients=6",
                       "fed.clients_per_round=4", "fed.rounds=3", "wireless.radius_m=2000", "comm.uplink=[int8]")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("round", 0) > 0 and "sim_latency_s" in r]
    assert len(rounds) == 3
    deadline_probe = []
    for r in rounds:
        up, down = r["comm"]["air"]["up"], r["comm"]["air"]["down"]
        per_up, per_down = up["total"] / up["messages"], down["total"] / down["messages"]
        assert r["sim_air_bytes"] == {"up": up["total"], "down": down["total"]}
        for s in r["sim_clients"].values():
            assert s["upload_s"] * s["rate_up_bps"] / 8 == pytest.approx(per_up, rel=1e-9)
            assert s["download_s"] * r["sim_rate_down_bps"] / 8 == pytest.approx(per_down, rel=1e-9)
            deadline_probe.append(s["download_s"] + s["compute_s"] + s["upload_s"])
        assert set(r["sim_clients"]) == {str(c) for c in r["clients"]["sampled"]}
        slowest = max(s["download_s"] + s["compute_s"] + s["upload_s"] for s in r["sim_clients"].values())
        assert r["sim_latency_s"] == pytest.approx(slowest + r["sim_latency_split_s"]["aggregation"])
        assert r["sim_energy_j"] == pytest.approx(sum(s["energy_j"] for s in r["sim_clients"].values()))
    s = json.loads((run / "summary.json").read_text())["sim"]
    assert s["time_s"] == pytest.approx(sum(r["sim_latency_s"] for r in rounds))
    assert s["stragglers"] == 0 and rounds[-1]["sim_time_s"] == pytest.approx(s["time_s"])
    assert s["step_flops"] > 0

    # the same run with a deadline between the fastest and the slowest client time: exactly those past it drop
    deadline = float(np.median(deadline_probe))
    run2 = finished_run(tiny_base, tmp_path, "wl_deadline", "wireless.enabled=true", "fed.num_clients=6",
                        "fed.clients_per_round=4", "fed.rounds=3", "wireless.radius_m=2000", "comm.uplink=[int8]",
                        f"wireless.deadline_s={deadline}")
    rows2 = [json.loads(x) for x in (run2 / "metrics.jsonl").read_text().splitlines()]
    late_total = 0
    for r, r2 in zip(rounds, [r for r in rows2 if r.get("round", 0) > 0 and "sim_latency_s" in r]):
        want = sorted(int(c) for c, s in r["sim_clients"].items()
                      if s["download_s"] + s["compute_s"] + s["upload_s"] > deadline)
        assert r2["sim_stragglers"] == want == r2["clients"]["late"]
        assert not set(want) & set(r2["clients"]["arrived"])
        assert set(r2["clients"]["arrived"]) == set(r["clients"]["sampled"]) - set(want)
        if want:
            assert r2["sim_latency_s"] == pytest.approx(deadline + r2["sim_latency_split_s"]["aggregation"])
            assert r2["sim_energy_wasted_j"] > 0
        late_total += len(want)
    assert late_total > 0
    assert json.loads((run2 / "summary.json").read_text())["sim"]["stragglers"] == late_total


def test_a_run_stored_before_a_config_group_existed_still_resumes(tmp_path):
    """A resume compares the stored config with the current one; keys added by a later version (wireless.*,
    train.method) count as their defaults, and a real difference is still refused."""
    from omegaconf import OmegaConf

    from fed_ddp.config import save_config
    from fed_ddp.rundir import check

    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "run.resume=true"])
    save_config(cfg, cfg.run.dir / "config.yaml")
    (cfg.run.dir / "metrics.jsonl").write_text("")
    old = OmegaConf.load(cfg.run.dir / "config.yaml")
    del old["wireless"], old["train"]["method"]
    OmegaConf.save(old, cfg.run.dir / "config.yaml")
    check(cfg)  # no error
    with pytest.raises(ConfigError, match="wireless.enabled"):
        check(load_config(TINY, [f"run.output_dir={tmp_path}", "run.resume=true", "wireless.enabled=true"]))


def test_a_run_stored_with_the_older_scheduler_spelling_still_resumes(tmp_path):
    """Runs from before best_channel / age were samplers stored fed.sampling=uniform beside wireless.scheduler=age;
    load_config now reads that as fed.sampling=age, and the resume check reads the stored config the same way."""
    from omegaconf import OmegaConf

    from fed_ddp.config import save_config
    from fed_ddp.rundir import check

    ov = [f"run.output_dir={tmp_path}", "run.resume=true", "wireless.enabled=true", "wireless.scheduler=age",
          "fed.clients_per_round=1"]
    cfg = load_config(TINY, ov)
    save_config(cfg, cfg.run.dir / "config.yaml")
    (cfg.run.dir / "metrics.jsonl").write_text("")
    old = OmegaConf.load(cfg.run.dir / "config.yaml")
    assert old.fed.sampling == "age"
    old.fed.sampling = "uniform"  # as the older version stored it
    OmegaConf.save(old, cfg.run.dir / "config.yaml")
    check(cfg)  # no error
    with pytest.raises(ConfigError, match=r"fed.sampling \('age' -> 'best_channel'\)"):
        check(load_config(TINY, [*ov[:3], "wireless.scheduler=best_channel", "fed.clients_per_round=1"]))


def _ws(*overrides: str, n: int = 6) -> Wireless:
    cfg = load_config(TINY, ["wireless.enabled=true", f"fed.num_clients={n}", *overrides])
    return Wireless(cfg, step_flops=10 ** 11, up_bytes=300_000, down_bytes=200_000, num_params=75_000)


def test_latency_and_energy_when_clients_are_late_or_lost():
    ws = _ws("wireless.deadline_s=1000")
    sim = ws.simulate(1, [0, 1, 2, 3], local_steps=5, failed=[3])
    t = dict(zip(sim.clients, sim.total_s))
    row = ws.row(sim, reported=[0, 1, 2], lost=[3])  # nobody late; client 3 failed: the server waits to the deadline
    assert row["sim_clients"]["3"]["outcome"] == "lost" and row["sim_clients"]["3"]["energy_j"] == 0
    split = row["sim_latency_split_s"]
    assert split["download"] + split["compute"] + split["upload"] == pytest.approx(max(t[c] for c in (0, 1, 2)))
    assert row["sim_latency_s"] == pytest.approx(1000 + split["aggregation"])
    assert sum(split.values()) == pytest.approx(row["sim_latency_s"])
    # everyone late: the round lasts exactly the deadline, nothing is aggregated, all energy until then is wasted
    ws = _ws("wireless.deadline_s=1e-4")
    sim = ws.simulate(2, [1, 4], local_steps=5)
    assert sim.late == [1, 4]
    row = ws.row(sim, reported=[], lost=[])
    assert row["sim_latency_s"] == pytest.approx(1e-4) and row["sim_latency_split_s"]["aggregation"] == 0
    assert sum(row["sim_latency_split_s"].values()) == pytest.approx(1e-4)
    assert row["sim_energy_wasted_j"] == row["sim_energy_j"] == pytest.approx(
        sum(energy_until(sim, i, 1e-4) for i in range(2)))
    # without a deadline a failure is noticed at once, but the broadcast still took its time
    ws = _ws()
    sim = ws.simulate(3, [2, 5], local_steps=5, failed=[2, 5])
    row = ws.row(sim, reported=[], lost=[2, 5])
    assert sim.download_s > 0 and row["sim_latency_s"] == pytest.approx(sim.download_s) and row["sim_energy_j"] == 0


def test_age_serves_stragglers_too_and_a_resume_schedules_the_same(tiny_base, tmp_path):
    """End to end (the production server loop): a deadline nobody meets, so every sampled client is a straggler
    and nobody trains; age still rotates through all six (it counts who was sampled, not who reported), and a run
    resumed after round 2 samples what the uninterrupted run sampled (the server checkpoints last_sampled)."""
    ov = ["wireless.enabled=true", "wireless.scheduler=age", "fed.num_clients=6", "fed.clients_per_round=2",
          "wireless.deadline_s=1e-4", "eval.every=10"]

    def sampled(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["clients"]["sampled"] for r in rows if r["round"] > 0], [r for r in rows if r["round"] > 0]

    whole, rows = sampled(finished_run(tiny_base, tmp_path, "age", *ov, "fed.rounds=4"))
    assert all(r["clients"]["late"] == r["clients"]["sampled"] for r in rows)  # everyone misses the deadline ...
    assert set().union(*map(set, whole[:3])) == set(range(6))  # ... and still the schedule rotates through all six
    finished_run(tiny_base, tmp_path, "age_resumed", *ov, "fed.rounds=2")
    resumed, _ = sampled(finished_run(tiny_base, tmp_path, "age_resumed", *ov, "fed.rounds=4", "run.resume=true"))
    assert resumed == whole


def test_under_dp_no_sim_figure_leaves_the_server():
    from fed_ddp.tracking import public_row

    row = {"round": 3, "val_loss": 0.2, "sim_latency_s": 1.0, "sim_rate_down_bps": 5e6, "sim_time_s": 9.0,
           "sim_clients": {"4": {}}, "clients": {"sampled": [4]}}
    assert public_row(row) == {"round": 3, "val_loss": 0.2}


def test_plan_wireless_for_sd15_from_its_hub_id_without_network():
    from conftest import ROOT, run_cli

    r = run_cli("plan", str(ROOT / "configs" / "sd15_lora_deepspeed.yaml"), "--wireless")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "shipped as sd15_unet.json" in r.stdout  # the hub id mapped to the shipped config, nothing downloaded
    full = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("full UNet (fp32)"))
    assert "3.44 GB" in full  # 859,520,964 weights x 4 B
    lora = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("LoRA r4 (fp32)"))
    assert "3.19 MB" in lora and "1.93e+15" in full and "1.37e+15" in lora  # FLOPs of 100 steps of batch 8
    assert "a LoRA step costs 71% of a full step's FLOPs" in r.stdout


def test_report_plots_accuracy_against_simulated_time(tiny_base, tmp_path):
    from fed_ddp.report import report

    run = finished_run(tiny_base, tmp_path, "wl_report", "wireless.enabled=true", "eval.accuracy_every=1",
                       "fed.rounds=2")
    plain = finished_run(tiny_base, tmp_path, "plain", "fed.rounds=1")
    done = report([run, plain], tmp_path / "rep")
    assert tmp_path / "rep" / "wireless.png" in done["plots"]
    rows = {r["run"]: r for r in done["rows"]}
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows["wl_report"]["sim_time_s"] == pytest.approx(sum(m.get("sim_latency_s", 0) for m in metrics))
    assert rows["plain"]["sim_time_s"] is None
    assert "wireless.png" not in {p.name for p in report([plain], tmp_path / "rep2")["plots"]}
