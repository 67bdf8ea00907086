"""Tier 3: the CLI end to end on the tiny config, the run directory, and the exported adapter in diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from PIL import Image

from fed_ddp.checkpoint import load_state

pytestmark = pytest.mark.slow
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def finished_run(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    # alpha != rank and a large lr: a lost adapter scale or lost LoRA tensors would change the image
    r = run_cli("run", str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}",
                f"run.output_dir={out}", "run.name=e2e", "lora.rank=4", "lora.alpha=8", "train.lr=0.05",
                "tracking.wandb.mode=offline", "wireless.enabled=true")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "e2e", r


def test_run_directory(finished_run):
    run_dir, proc = finished_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "partition.json", "samples/round_0000.png",
                 "samples/round_0002.png", "checkpoints/round_0001/pytorch_lora_weights.safetensors",
                 "checkpoints/round_0002/server_state.safetensors", "checkpoints/final/pytorch_lora_weights.safetensors"):
        assert (run_dir / name).exists(), name
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_round = {r["round"]: r for r in rows if "seconds" in r}
    assert sorted(by_round) == [0, 1, 2]
    for rnd in (1, 2):
        row = by_round[rnd]
        assert set(row["train_loss"]) == {"0", "1"} and row["val_loss"] > 0
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        parts = row["seconds"]
        split = ("local_training", "client_overhead", "communication", "aggregation", "evaluation", "other")
        assert set(split) <= set(parts)
        assert abs(sum(parts[k] for k in split) - parts["round"]) < 1e-6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bytes_up_total"] == sum(by_round[r]["bytes_up"] for r in (1, 2))
    assert set(summary["final"]["gen_acc"]) == {str(d) for d in range(10)}
    assert "Generation accuracy" in proc.stdout
    assert "Simulated wireless cell (not measured)" in proc.stdout  # the simulated cell rode along over gloo
    assert summary["sim"]["time_s"] == pytest.approx(sum(by_round[r]["sim_latency_s"] for r in (1, 2)))
    cfg = (run_dir / "config.yaml").read_text()
    assert "alpha: 8.0" in cfg and "rank: 4" in cfg
    with Image.open(run_dir / "samples" / "round_0002.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
    assert list((run_dir / "wandb").glob("offline-run-*")), "no W&B offline run written"


def test_results_do_not_depend_on_how_many_workers_play_the_clients(finished_run, tiny_base):
    """fed.workers=null lets `fed-ddp run` pick W from the machine's cores, so the same run with one worker
    playing both clients in turn must give the same adapter, bit for bit, and the same metrics."""
    from safetensors.torch import load_file

    run_dir, _ = finished_run
    out = run_dir.parent
    r = run_cli("run", str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}",
                f"run.output_dir={out}", "run.name=e2e_w1", "lora.rank=4", "lora.alpha=8", "train.lr=0.05",
                "tracking.wandb.mode=disabled", "wireless.enabled=true", "fed.workers=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks (1 server + 1 workers)" in r.stderr
    name = "checkpoints/final/pytorch_lora_weights.safetensors"
    a, b = load_file(run_dir / name), load_file(out / "e2e_w1" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained

    def rows(d):
        return {x["round"]: x for x in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "seconds" in x}
    ra, rb = rows(run_dir), rows(out / "e2e_w1")
    for rnd in (1, 2):
        for k in ("val_loss", "train_loss", "gen_acc", "update_norm", "bytes_up"):
            assert ra[rnd].get(k) == rb[rnd].get(k), (rnd, k)


def test_exported_adapter_loads_in_diffusers_like_fed_ddp_generate(finished_run, tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    from fed_ddp.evaluation import generate
    from fed_ddp.images import save_grid

    final = finished_run[0] / "checkpoints" / "final"
    ours = tmp_path / "ours.png"
    r = run_cli("generate", str(final), "--prompt", PROMPT, "--seed", "3", "--out", str(ours))
    assert r.returncode == 0, r.stderr[-2000:]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    plain = tmp_path / "plain.png"
    save_grid(generate(pipe, [PROMPT], 3, 25, 1.0)[None], [PROMPT], plain, cell=64)
    pipe.load_lora_weights(final)
    lora_params = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    from safetensors.torch import load_file

    exported = load_file(str(final / "pytorch_lora_weights.safetensors"))
    assert len(lora_params) == len(exported) == 64  # A and B of to_q/k/v/out.0 in 4 transformer blocks
    theirs = tmp_path / "theirs.png"
    save_grid(generate(pipe, [PROMPT], 3, 25, 1.0)[None], [PROMPT], theirs, cell=64)

    a, b, c = (np.asarray(Image.open(p), dtype=np.int16) for p in (ours, theirs, plain))
    assert np.array_equal(a, b), f"max pixel difference {np.abs(a - b).max()}"
    assert np.abs(a - c).max() > 0, "the adapter changed nothing: the comparison would not catch a lost adapter"


def test_resume_continues_from_the_latest_checkpoint(finished_run, tiny_base, tmp_path):
    import shutil

    import torch

    run_dir = tmp_path / "e2e"
    shutil.copytree(finished_run[0], run_dir)
    shutil.rmtree(run_dir / "wandb", ignore_errors=True)
    r = run_cli("run", str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}",
                f"run.output_dir={tmp_path}", "run.name=e2e", "lora.rank=4", "lora.alpha=8", "train.lr=0.05",
                "fed.rounds=3", "run.resume=true", "wireless.enabled=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "seconds" in json.loads(x)]
    assert rounds == [0, 1, 2, 3]  # the old rows kept, only round 3 trained
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sims = [x for x in rows if "sim_latency_s" in x]
    assert [x["round"] for x in sims] == [1, 2, 3]  # simulated time goes on across the resume
    assert sims[-1]["sim_time_s"] == pytest.approx(sum(x["sim_latency_s"] for x in sims))
    s2 = load_state(run_dir / "checkpoints" / "round_0002")
    s3 = load_state(run_dir / "checkpoints" / "round_0003")
    assert s3["round"] == 3 and not torch.equal(s2["global"], s3["global"])
    assert torch.equal(s2["global"], load_state(finished_run[0] / "checkpoints" / "round_0002")["global"])
