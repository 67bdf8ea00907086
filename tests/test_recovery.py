"""Supervision and automatic recovery over real gloo ranks: a rank killed three times, at seeded random
ranks and rounds, is restarted by the launcher from the last complete round, and the run ends bit for bit
where the uninterrupted run ends; ranks die with their launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from test_distributed import ROOT

from fed_ddp.checkpoint import load_state

pytestmark = pytest.mark.slow
ARGS = ["fed.num_clients=6", "fed.clients_per_round=3", "fed.workers=2", "fed.rounds=4", "fed.local_steps=2",
        "data.partition=iid", "comm.uplink=[topk,int8]", "comm.topk_fraction=0.25", "comm.min_numel=0",
        "lora.rank=2", "eval.images_per_prompt=1", "eval.inference_steps=1", "eval.sample_seeds=[0]"]


def _launch(tiny_base, out, name, chaos: str, max_restarts: int, *extra: str, forked: bool = True):
    import forked_rank

    os.environ["FED_DDP_CHAOS"] = chaos
    try:
        forked_rank.launch("chaos_rank", 3, [str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}",
                                             f"run.output_dir={out}", f"run.name={name}", *ARGS, *extra],
                           max_restarts=max_restarts, forked=forked)
    finally:
        os.environ.pop("FED_DDP_CHAOS")
    return out / name


def test_three_kills_recover_bit_for_bit(tiny_base, tmp_path):
    rng = np.random.default_rng(7)
    ranks = rng.integers(0, 3, size=3).tolist()
    rounds = sorted(rng.choice(np.arange(2, 5), size=3, replace=False).tolist())
    chaos = ",".join(f"{r}:{t}" for r, t in zip(ranks, rounds))
    calm = _launch(tiny_base, tmp_path, "calm", "", 0)
    hit = _launch(tiny_base, tmp_path, "chaos", chaos, 3)
    for ckpt in ("round_0001", "round_0002", "round_0003", "round_0004", "final"):
        a, b = (load_state(d / "checkpoints" / ckpt)["global"] for d in (calm, hit))
        assert torch.equal(a, b), f"{ckpt} after kills {chaos}: max difference {(a - b).abs().max()}"
    restarts = [json.loads(x) for x in (hit / "metrics.jsonl").read_text().splitlines()]
    sampled = {r["round"]: r["clients"]["sampled"] for r in restarts if r.get("clients")}
    calm_rows = [json.loads(x) for x in (calm / "metrics.jsonl").read_text().splitlines()]
    assert sampled == {r["round"]: r["clients"]["sampled"] for r in calm_rows if r.get("clients")}
    summary = json.loads((hit / "summary.json").read_text())
    assert summary["base"] and summary["sampling"]["clients_sampled"] == 4 * 3  # whole run, across restarts


def test_a_rank_that_raises_names_its_exception_rank_and_role(tiny_base, tmp_path):
    """A worker raises in round 2: the launcher's failure carries the exception with the rank and its role (what
    ``fed-ddp run`` prints as its last line), and the run directory holds the rank's traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from fed_ddp.failures import first_failure

    os.environ["FED_DDP_CHAOS_SIGNAL"] = "RAISE"
    t0 = time.monotonic()
    try:
        with pytest.raises(ChildFailedError) as info:
            _launch(tiny_base, tmp_path, "raises", "1:2", 0, "fed.rounds=3", forked=False)
    finally:
        os.environ.pop("FED_DDP_CHAOS_SIGNAL")
    line = first_failure(info.value, tmp_path / "raises")
    assert line.startswith("worker0 rank 1 failed: RuntimeError: chaos: rank 1 gives up in round 2"), line
    assert f"in {tmp_path / 'raises' / 'errors' / 'rank_1.txt'}" in line
    text = (tmp_path / "raises" / "errors" / "rank_1.txt").read_text()
    assert text.startswith("worker0 rank 1 failed: RuntimeError") and "Traceback" in text and "chaos_play" in text
    assert time.monotonic() - t0 < 120  # the server, waiting on the dead worker, does not hang the exit


def _fed_ddp_run(tiny_base, out, name: str, steps: int, **popen) -> subprocess.Popen:
    """A long `fed-ddp run` of the tiny config, started the way a user starts it (its own launcher)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "fed_ddp.cli", "run", str(ROOT / "configs" / "tiny_test.yaml"),
                             f"model.pretrained={tiny_base}", f"run.output_dir={out}", f"run.name={name}",
                             "fed.rounds=50", f"fed.local_steps={steps}"], cwd=ROOT, env=env, **popen)


def test_ranks_die_with_their_launcher(tiny_base, tmp_path):
    """SIGKILL the `fed-ddp run` launcher mid-run: no rank trains on unsupervised."""
    marker = uuid.uuid4().hex[:10]
    proc = _fed_ddp_run(tiny_base, tmp_path, f"orphan{marker}", 20, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)

    def ranks() -> list[int]:
        out = subprocess.run(["pgrep", "-f", f"run.name=orphan{marker}"], capture_output=True, text=True, check=False).stdout
        return [int(p) for p in out.split() if int(p) != proc.pid]

    deadline = time.time() + 120
    while len(ranks()) < 3 and time.time() < deadline:
        time.sleep(0.5)
    assert len(ranks()) >= 3, "the ranks never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while ranks() and time.time() < deadline:
        time.sleep(0.5)
    left = ranks()
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"ranks {left} outlived their launcher"


def test_ctrl_c_is_one_line_and_exit_130(tiny_base, tmp_path):
    """SIGINT to the whole process group (what Ctrl-C sends): no traceback from the launcher, one line naming
    the checkpoints, exit code 130, no rank left behind."""
    marker = uuid.uuid4().hex[:10]
    proc = _fed_ddp_run(tiny_base, tmp_path, f"int{marker}", 50, start_new_session=True, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / f"int{marker}" / "checkpoints" / "round_0001").exists() and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    mine = [ln for ln in err.splitlines() if ln.startswith("fed-ddp:")]
    assert len(mine) == 2 and "stopped by SIGINT" in mine[-1] and "checkpoints" in mine[-1], mine  # launching, stopped
    assert "Traceback" not in err, err[-3000:]
    left = subprocess.run(["pgrep", "-f", f"run.name=int{marker}"], capture_output=True, text=True, check=False).stdout.split()
    assert not left


def _wake_stopped_ranks_told_to_terminate(marker: str, done: threading.Event) -> None:
    """SIGCONT each stopped process of this test's run (``marker`` in its command line) once a SIGTERM is pending
    for it, so it dies of that SIGTERM now. Only the teardown changes: after the server has stopped the run, the
    launcher SIGTERMs every rank and waits up to 30 s (torch elastic's fixed shutdown grace) before it SIGKILLs
    the one that cannot act on it, the SIGSTOPped rank; that wait was most of this test's time."""
    term = 1 << (signal.SIGTERM - 1)
    while not done.wait(0.2):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() not in f.read():
                        continue
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
                if fields["State"].split()[0] == "T" and (int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)) & term:
                    os.kill(int(pid), signal.SIGCONT)
            except (OSError, KeyError, ValueError):
                continue  # gone meanwhile


def test_a_hung_worker_is_named_within_the_round_deadline(tiny_base, tmp_path, capfd):
    """A worker that stops (SIGSTOP) in round 2 does not stall the run for fed.timeout_s: past
    fed.round_timeout_s the server stops the run naming that rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ["FED_DDP_CHAOS_SIGNAL"] = "STOP"
    done = threading.Event()
    waker = threading.Thread(target=_wake_stopped_ranks_told_to_terminate, args=(f"run.output_dir={tmp_path}", done))
    waker.start()
    t0 = time.time()
    try:
        with pytest.raises(ChildFailedError):
            _launch(tiny_base, tmp_path, "hung", "2:2", 0, "fed.round_timeout_s=5", "fed.timeout_s=600",
                    "comm.gather=p2p", forked=False)
    finally:
        os.environ.pop("FED_DDP_CHAOS_SIGNAL")
        done.set()
        waker.join()
    assert time.time() - t0 < 120  # not fed.timeout_s = 600
    err = capfd.readouterr().err
    assert "worker rank(s) [2] have not answered within 5 s" in err, err[-3000:]
    assert (tmp_path / "hung" / "checkpoints" / "round_0001").is_dir()
