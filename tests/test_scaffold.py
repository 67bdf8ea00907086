"""SCAFFOLD (fed.strategy=scaffold) on real models and real gloo ranks: the client's gradient correction and
control variate on the tiny UNet, an end-to-end run that is killed and resumes bit for bit with exact byte
accounting (twice the adapter's values each way), and the one-line refusals. The server maths against numpy
is in test_strategies.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli

from fed_ddp.checkpoint import load_state
from fed_ddp.config import ConfigError, load_config
from fed_ddp.engines import TorchEngine
from fed_ddp.protocol import HEAD_BYTES, PLAN_BYTES, UP_TAIL_BYTES
from fed_ddp.strategies import RoundPlan
from fed_ddp.strategies.scaffold import CLIENT_CONTROL, corrected_gradients

TINY = str(ROOT / "configs" / "tiny_test.yaml")


class SpyEngine(TorchEngine):
    """The torch engine, recording the flat gradient each optimizer step is about to use (before clipping)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen: list[torch.Tensor] = []

    def backward_step(self, loss: torch.Tensor) -> None:
        ga = self.cfg.gradient_accumulation_steps
        (loss / ga).backward()
        self._micro += 1
        if self._micro % ga:
            return
        self.seen.append(torch.cat([p.grad.reshape(-1) for p in self.params]).clone())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_client_gradients_move_by_exactly_the_correction(tiny_base, accumulation):
    """K = 3 local steps with c - c_i = v: the first step's gradient is the uncorrected one plus v (bit for bit
    without accumulation), every step's gradient is the raw one plus v, and c_i+ (the hooks' raw sum / K) is
    the mean of the raw gradients the optimizer steps were computed from."""
    from fed_ddp.client import LocalTrainer
    from fed_ddp.data.digits import load_digits_dataset
    from fed_ddp.diffusion.lora import attach_lora, get_flat
    from fed_ddp.diffusion.models import load_pipeline, training_scheduler

    cfg = load_config(None, ["lora.rank=2", "train.batch_size=8", "train.lr=0.01",
                             f"train.gradient_accumulation_steps={accumulation}"])
    pipe = load_pipeline(str(tiny_base), torch.device("cpu"))
    attach_lora(pipe.unet, cfg.lora, seed=0)
    g = get_flat(pipe.unet)
    runs = {}
    for name in ("plain", "corrected"):
        eng = SpyEngine(pipe.unet, cfg.train)
        t = LocalTrainer(pipe, training_scheduler(pipe), load_digits_dataset().subset(range(48)), cfg.train, 0,
                         engine=eng)
        plan = RoundPlan(1, 3, cfg.train.lr)
        if name == "plain":
            delta, _ = t.fit(g, plan)
            runs[name] = (eng.seen, delta, None)
        else:
            v = torch.from_numpy(np.random.default_rng(3).normal(scale=0.05, size=g.numel()).astype(np.float32))
            with corrected_gradients(eng.params, v, accumulation) as raw:
                delta, _ = t.fit(g, plan)
            runs[name] = (eng.seen, delta, raw)
    plain, corrected = runs["plain"][0], runs["corrected"][0]
    assert len(plain) == len(corrected) == 3
    if accumulation == 1:
        assert torch.equal(corrected[0], plain[0] + v)  # same start, same batch: the gradient moved by v exactly
    torch.testing.assert_close(corrected[0] - plain[0], v, rtol=0, atol=1e-6)
    raw = runs["corrected"][2]
    mean_raw = torch.stack([s.double() - v.double() for s in corrected]).mean(dim=0)
    torch.testing.assert_close(raw / 3, mean_raw, rtol=0, atol=1e-6)
    assert float((raw / 3).norm()) > 10 * 1e-6 * g.numel() ** 0.5  # a real gradient, not zeros
    assert not torch.equal(runs["plain"][1], runs["corrected"][1])  # the correction changed the local update
    assert all(not p._backward_hooks for p in eng.params)  # hooks removed on exit


ARGS = ["fed.strategy=scaffold", "fed.num_clients=5", "fed.clients_per_round=3", "fed.workers=2", "fed.rounds=3",
        "fed.local_steps=2", "comm.uplink=[]",
        "comm.downlink=[]", "lora.rank=2", "eval.images_per_prompt=1", "eval.inference_steps=1",
        "eval.sample_seeds=[0]"]


@pytest.mark.slow
def test_scaffold_run_resumes_bit_for_bit_with_exact_bytes(tiny_base, tmp_path):
    """Real gloo (server + 2 workers), 5 clients, 3 per round: a worker SIGKILLed in round 2 right after its
    first client saved its state; the launcher restarts every rank, the run resumes from round 1 and ends bit
    for bit where the uninterrupted run ends (global adapter and control variate c). Every message is twice
    the adapter's fp32 values plus the protocol fields, and c is the mean of the N clients' stored c_i."""
    from test_recovery import _launch

    calm = _launch(tiny_base, tmp_path, "calm", "", 0, *ARGS)
    hit = _launch(tiny_base, tmp_path, "hit", "2:2", 1, *ARGS)
    for ckpt in ("round_0001", "round_0002", "round_0003", "final"):
        a, b = (load_state(d / "checkpoints" / ckpt) for d in (calm, hit))
        assert torch.equal(a["global"], b["global"]), ckpt
        assert torch.equal(a["strategy"]["c"], b["strategy"]["c"]), ckpt
    final = load_state(calm / "checkpoints" / "final")
    n = final["global"].numel()
    c = final["strategy"]["c"]
    assert c.shape == (n,) and float(c.norm()) > 0
    # c = (1/N) sum of every client's newest c_i (zero for a client that never played)
    from fed_ddp.population import ClientStateStore

    store = ClientStateStore(calm / "clients")
    total = torch.zeros(n, dtype=torch.float64)
    for cid in range(5):
        got = store.load(cid, max_round=3)
        if got is not None:
            total += got[1][CLIENT_CONTROL].double()
    torch.testing.assert_close(c.double(), total / 5, rtol=0, atol=1e-6)
    rows = [json.loads(x) for x in (calm / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("clients")]
    assert [r["round"] for r in rows] == [1, 2, 3]
    up, down = 8 * n + UP_TAIL_BYTES, 8 * n + PLAN_BYTES  # [Δx_i, Δc_i] and [x, c] as fp32
    for r in rows:
        air = r["comm"]["air"]
        assert air["up"]["total"] == air["up"]["messages"] * up == len(r["clients"]["arrived"]) * up
        assert air["down"]["total"] == len(r["clients"]["sampled"]) * down
        assert air["up"]["vs_dense_lora"] == pytest.approx(4 * n / up)  # about 1/2: the controls travel too
        slots = max(r["clients"]["per_worker"])
        assert r["bytes_down"] == 2 * (HEAD_BYTES + 8 * 2 * slots + 8 * n)  # two workers, head + table + [x, c]
        assert r["control_norm"] > 0
    hit_rows = [json.loads(x) for x in (hit / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"]: r["comm"]["air"] for r in hit_rows if r.get("clients")} == \
        {r["round"]: r["comm"]["air"] for r in rows}


@pytest.mark.parametrize("override,needles", [
    ("fed.sampling=all privacy.dp.noise_multiplier=1.0", ["fed.strategy", "scaffold", "privacy"]),
    ("privacy.secagg=true", ["fed.strategy", "scaffold", "privacy"]),
    ("privacy.dp.clip_norm=1.0", ["fed.strategy", "scaffold", "privacy"]),
    ("fed.aggregator=median", ["fed.aggregator", "median", "scaffold", "mean"]),
    ("train.engine=deepspeed", ["fed.strategy", "scaffold", "train.engine=torch"]),
    ("fed.ranks_per_client=2", ["fed.strategy", "scaffold", "fed.ranks_per_client=1"]),
    ("lora.client_ranks=[1,2]", ["lora.client_ranks", "scaffold"]),
])
def test_unsupported_combinations_are_refused(override, needles):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["fed.strategy=scaffold", "fed.num_clients=4", *override.split()])
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in needles), msg


def test_refusal_is_one_line_before_any_rank():
    proc = run_cli("run", TINY, "fed.strategy=scaffold", "fed.aggregator=trimmed_mean",
                   "run.output_dir=/nonexistent/never_made")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "launching" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fed-ddp:")]
    assert len(lines) == 1 and "fed.aggregator" in lines[0] and "scaffold" in lines[0], proc.stderr[-2000:]


def test_plan_counts_the_control_variates():
    """``fed-ddp plan`` predicts scaffold's sizes: twice the adapter's codec bytes each way, c_i in the state."""
    from fed_ddp.plan import make_plan

    quick = str(ROOT / "configs" / "quickstart.yaml")
    plain, sc = (make_plan(cfg, cfg.comm) for cfg in (
        load_config(quick, ["comm.uplink=[int8]", "comm.min_numel=0", f"fed.strategy={s}"]) for s in ("fedavg", "scaffold")))
    assert sc.lora_parameters == plain.lora_parameters
    assert sc.up.message.payload == 2 * plain.up.message.payload and sc.up.header == plain.up.header
    assert sc.down.message.total == 2 * plain.down.message.total
    assert plain.state_bytes == 4 * plain.lora_parameters  # int8's error-feedback residual
    assert sc.state_bytes == 2 * plain.state_bytes + 4 * plain.lora_parameters  # a residual for each half, and c_i


def test_a_poisoned_control_variate_is_rejected_and_c_stays_the_mean(tiny_base, tmp_path, monkeypatch):
    """A client whose Δc_i is absurd is rejected by the norm screen (c would be poisoned for the rest of the
    run); it continues from its last applied c_i, and c stays exactly the mean of the c_i the server counted."""
    from inproc_runs import finished_run

    from fed_ddp.population import ClientStateStore
    from fed_ddp.strategies.scaffold import CLIENT_CONTROL, ScaffoldClient

    real = ScaffoldClient.after_fit

    def poisoned(self, worker, job, delta):  # SCAFFOLD's own client hook, after it built [Δx_i, Δc_i]
        up = real(self, worker, job, delta)
        if job.client == 1 and job.plan.round == 2:
            n = self.control.numel()
            up = up.clone()
            up[n:] += 1e30
            job.saved[CLIENT_CONTROL] = job.saved[CLIENT_CONTROL] + 1e30
        return up

    monkeypatch.setattr(ScaffoldClient, "after_fit", poisoned)
    run = finished_run(tiny_base, tmp_path, "poison", "fed.strategy=scaffold", "fed.num_clients=3", "fed.rounds=3")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rejected = {r["round"]: r["clients"].get("rejected", {}) for r in rows if r.get("clients")}
    assert list(rejected[2]) == ["1"] and "control variate" in rejected[2]["1"] and not rejected[3]
    final = load_state(run / "checkpoints" / "final")
    c, last = final["strategy"]["c"].double(), final["last_played"].tolist()
    assert last == [3, 3, 3] and bool(torch.isfinite(c).all())
    store = ClientStateStore(run / "clients", 0)
    total = sum(store.load_round(k, last[k])[0][CLIENT_CONTROL].double() for k in range(3))
    torch.testing.assert_close(c, total / 3, rtol=0, atol=1e-6)
    assert store.rounds(1) == [1, 3]  # round 2's poisoned state was never counted: round 3 went on from round 1's
