"""benchmarks/gpu.py's CPU smoke path (issue 14), so the GPU benchmark cannot rot while no GPU runs it.

``python benchmarks/gpu.py --smoke --out DIR`` in a fresh interpreter: the tiny UNet with LoRA r4 on the attention
projections, LocalTrainer against step.py's plain loop at batch 1, 4, 8 (and with gradient checkpointing), the
aggregation over real gloo collectives (1 server + 2 worker processes) against the raw collective, and the torch
engine against DeepSpeed ZeRO-2/3. The result files must hold finite throughputs and ratios, byte counts that
follow from the adapter's size, and the LoRA size must match peft applied independently.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # several processes


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_smoke")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OUT")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(out.glob("gpu_*.json"))
    assert [f.name for f in files] == ["gpu_cpu.json"], list(out.iterdir())
    return json.loads(files[0].read_text()), (out / "gpu_cpu.md").read_text(), r.stdout


def test_local_trainer_and_plain_loop_have_finite_throughputs(smoke):
    res, md, stdout = smoke
    assert res["smoke"] is True and res["card"] == "cpu"
    rows = res["local_step"]
    assert [(x["batch"], x["ckpt"], x["compile"]) for x in rows] == [(1, False, False), (4, False, False),
                                                                    (8, False, False), (8, True, False)]
    for x in rows:
        assert _finite_positive(x["local_images_s"]) and _finite_positive(x["plain_images_s"]), x
        assert x["ratio"] == pytest.approx(x["local_images_s"] / x["plain_images_s"])
        assert len(x["ratios"]) == 1 and all(_finite_positive(q) for q in x["ratios"])
    assert "torch.compile skipped (CPU smoke)" in res["notes"]
    assert any(g.startswith("(smoke run, not a measurement) LocalTrainer / plain loop >= 0.95: ") for g in res["goals"])
    assert "| 8 | False | True | fp32 |" in md and "ratio" in stdout


def test_lora_size_matches_peft_on_the_attention_projections(smoke):
    """The adapter the benchmark trains is peft's LoRA r4 on to_q/to_k/to_v/to_out.0 of the tiny UNet."""
    from peft import LoraConfig

    from fed_ddp.diffusion import tiny

    unet = tiny.build_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    want = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    assert smoke[0]["model"]["lora_parameters"] == want


def test_aggregation_over_gloo_against_the_raw_collective(smoke):
    res = smoke[0]
    c = res["collectives"]
    n = res["model"]["lora_parameters"]
    assert c["backend"] == "gloo" and c["workers"] == 2 and c["attempts"] == []
    assert c["num_params"] == n
    # fp32 wire: head (6 fp32) + table (1 slot x 2 workers x 2 int32) + the adapter; up: the delta + id + 4 fields
    assert c["bytes_down_per_worker"] == 24 + 16 + 4 * n
    assert c["bytes_up_per_worker"] == 4 * n + 4 + 16
    for k in ("fed_ms", "exchange_ms", "raw_ms", "ratio", "exchange_ratio"):
        assert _finite_positive(c[k]), (k, c)
    assert c["ratio"] == pytest.approx(c["fed_ms"] / c["raw_ms"])
    assert c["exchange_ms"] <= c["fed_ms"]


def test_engines_torch_and_deepspeed(smoke):
    res = smoke[0]
    if importlib.util.find_spec("deepspeed") is None:
        assert any("DeepSpeed part skipped" in n for n in res["notes"])
        return
    rows = res["engines"]
    assert [x["engine"] for x in rows] == ["torch", "zero2", "zero3"]
    for x in rows:
        assert _finite_positive(x["step_s"]) and _finite_positive(x["images_s"]), x
    assert rows[0]["step_vs_torch"] == 1.0
