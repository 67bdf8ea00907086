"""benchmarks/round_floor.py --quick: a real ``fed-ddp run`` of the tiny config, its compute floor, the raw
collective and the start-up reference, end to end (so the benchmark cannot rot)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT

PARTS = ("local_training", "client_overhead", "communication", "aggregation", "other")


def test_round_floor_quick(tiny_base, tmp_path):
    out = tmp_path / "results.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "round_floor.py"), "--quick", "--base", str(tiny_base),
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    for floor in ("Floor 2", "Floor 3", "Floor 5"):
        assert floor in p.stdout
    (res,) = json.loads(out.read_text())
    assert res["config"] == "tiny_test" and res["workers"] == 2 and res["world"] == 3
    (t,) = res["layouts"]
    for k in ("ratio", "ratio_allcores", "ratio_round1", "floor", "floor_allcores", "startup"):
        assert math.isfinite(t[k]) and t[k] > 0, (k, t[k])
    # one steady round (round 2): its parts are that round's, and they add up to its wall time without evaluation
    assert sum(t[k] for k in PARTS) == pytest.approx(t["without_eval"], rel=1e-6)
    assert t["local_training"] > 0 and t["without_eval"] >= t["local_training"]
    c = res["comm"]
    for k in ("round_steady", "raw", "raw_busy", "worker_protocol", "ratio", "ratio_busy", "ratio_with_protocol"):
        assert math.isfinite(c[k]) and c[k] > 0, (k, c[k])
    # the bytes the bare collective moved are the run's: a 24-byte head (6 fp32 fields), one equal uplink per worker
    assert c["bytes"]["head"] == 24 and len(c["bytes"]["up"]) == 2 and len(set(c["bytes"]["up"])) == 1
    s = res["startup"]
    assert 0 < s["ready"] < s["round1"] and s["base_eval"] > 0
    assert math.isfinite(s["ratio"]) and s["ratio"] > 0 and s["reference"]["load_once"] > 0
