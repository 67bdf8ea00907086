"""Every YAML shipped under configs/ loads through ``load_config`` and says what it promises.

- main configs (configs/*.yaml) load on their own;
- DeepSpeed presets (configs/deepspeed/*.yaml) are partial: merged after a main config, in order;
- sd15_lora_deepspeed.yaml: the GPU-cluster recipe (ZeRO-2, bf16, LoRA rank 4 on attention);
- one preset really runs: ZeRO-3 with optimizer and parameter offload, 1 client x 2 ranks (slow).
Sweep files (configs/sweeps/) are W&B sweep specs, not run configs: test_sweep.py checks them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from fed_ddp.checkpoint import load_state
from fed_ddp.config import RunConfig, load_config
from fed_ddp.engines import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MAIN = sorted(CONFIGS.glob("*.yaml"))
PRESETS = sorted((CONFIGS / "deepspeed").glob("*.yaml"))
SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))
SD15 = CONFIGS / "sd15_lora_deepspeed.yaml"
TINY = CONFIGS / "tiny_test.yaml"

# preset -> (zero stage, optimizer offload, parameter offload)
EXPECTED_PRESETS = {
    "zero0.yaml": (0, False, False),
    "zero1.yaml": (1, False, False),
    "zero2.yaml": (2, False, False),
    "zero3.yaml": (3, False, False),
    "zero2_offload.yaml": (2, True, False),
    "zero3_offload.yaml": (3, True, True),
}


def test_every_yaml_under_configs_is_checked_somewhere():
    every = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
    covered = set(MAIN) | set(PRESETS) | set(SWEEPS)
    assert every and set(every) <= covered, f"not covered: {sorted(set(every) - covered)}"
    assert {p.name for p in PRESETS} == set(EXPECTED_PRESETS)
    assert SD15 in MAIN


@pytest.mark.parametrize("path", MAIN, ids=lambda p: p.name)
def test_main_config_loads_alone(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.train.engine in ("torch", "deepspeed")
    assert cfg.world_size == 1 + cfg.fed.num_workers * cfg.fed.ranks_per_client


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_merged_over_tiny_test(name):
    stage, off_opt, off_params = EXPECTED_PRESETS[name]
    cfg = load_config([TINY, CONFIGS / "deepspeed" / name])
    assert cfg.train.engine == "deepspeed"
    assert cfg.deepspeed.zero_stage == stage
    assert cfg.deepspeed.offload_optimizer is off_opt and cfg.deepspeed.offload_params is off_params
    assert cfg.train.max_grad_norm == 1.0  # set explicitly by every preset
    # the main config's own values survive the merge
    assert cfg.run.name == "tiny_test" and cfg.fed.num_clients == 2 and cfg.train.batch_size == 8

    ds = deepspeed_config(cfg.train, cfg.deepspeed, "cpu", dp_size=2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) is off_opt and ("offload_param" in zero) is off_params
    if off_opt:
        assert zero["offload_optimizer"]["device"] == "cpu"
        assert ds["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's CPU Adam steps offloaded states
    if off_params:
        assert zero["offload_param"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 1.0
    assert ds["train_batch_size"] == 8 * 1 * 2


def test_presets_merge_in_order_and_overrides_win():
    # a later preset fully replaces an earlier one (offload flags are always written, never inherited)
    cfg = load_config([TINY, CONFIGS / "deepspeed" / "zero3_offload.yaml", CONFIGS / "deepspeed" / "zero2.yaml"])
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_params) == (2, False, False)
    cfg = load_config([TINY, CONFIGS / "deepspeed" / "zero2.yaml"], ["train.max_grad_norm=0.5",
                                                                       "deepspeed.zero_stage=1"])
    assert cfg.train.max_grad_norm == 0.5 and cfg.deepspeed.zero_stage == 1
    cfg = load_config([CONFIGS / "quickstart.yaml", CONFIGS / "deepspeed" / "zero3.yaml"])
    assert cfg.run.name == "quickstart" and cfg.lora.rank == 8 and cfg.deepspeed.zero_stage == 3


def test_sd15_lora_deepspeed_loads_alone():
    cfg = load_config(SD15)
    assert cfg.train.engine == "deepspeed"
    assert cfg.deepspeed.zero_stage == 2 and not cfg.deepspeed.offload_optimizer and not cfg.deepspeed.offload_params
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.train.max_grad_norm == 1.0
    assert cfg.lora.rank == 4 and cfg.lora.alpha == 4.0
    assert cfg.lora.targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.tracking.wandb.mode == "online"
    assert cfg.data.resolution == 512 and cfg.data.partition == "dirichlet" and cfg.data.label_field == "label"
    assert cfg.model.pretrained  # SD v1.5, never the tiny base
    ds = deepspeed_config(cfg.train, cfg.deepspeed, "cuda", dp_size=cfg.fed.ranks_per_client)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["gradient_clipping"] == 1.0


def test_sd15_with_local_model_and_imagefolder(tmp_path):
    """The documented command line: a local SD v1.5 directory and an imagefolder of client data."""
    model = tmp_path / "stable-diffusion-v1-5"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    data = tmp_path / "concepts"
    data.mkdir()
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a photo", "label": "a"}) + "\n")
    cfg = load_config(SD15, [f"model.pretrained={model}", "data.source=imagefolder", f"data.path={data}",
                             "fed.num_clients=3", "fed.ranks_per_client=2"])
    assert cfg.model.pretrained == str(model) and cfg.data.source == "imagefolder" and cfg.data.path == str(data)
    assert cfg.world_size == 7
    assert deepspeed_config(cfg.train, cfg.deepspeed, "cuda", dp_size=2)["train_batch_size"] == 4 * 2 * 2


# ----------------------------------------------------------------------------- a preset really runs

@pytest.mark.slow
def test_zero3_offload_preset_runs_one_round(tiny_base, tmp_path):
    """ZeRO-3 + optimizer & parameter offload (DeepSpeed CPU Adam, JIT-built on first use) on 1 client x 2 ranks,
    in bf16 as on GPUs: DeepSpeed casts the UNets (the server's too) while the pipelines feed fp32."""
    from test_distributed import dense_global, launch

    spy = tmp_path / "spy"
    spy.mkdir()
    env = {"DS_ACCELERATOR": "cpu", "FED_DDP_SPY_DIR": str(spy),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launch(3, [str(TINY), str(CONFIGS / "deepspeed" / "zero3_offload.yaml"), f"model.pretrained={tiny_base}",
               f"run.output_dir={tmp_path}", "run.name=z3off", "fed.num_clients=1", "fed.ranks_per_client=2",
               "fed.rounds=1", "fed.local_steps=2", "train.batch_size=4", "train.lr=0.01",
               "train.mixed_precision=bf16", "eval.images_per_prompt=1", "eval.inference_steps=2", "eval.sample_seeds=[0]"], env)
    run = tmp_path / "z3off"
    assert (run / "summary.json").exists()
    saved = load_config(run / "config.yaml")
    assert (saved.train.engine, saved.deepspeed.zero_stage, saved.deepspeed.offload_optimizer,
            saved.deepspeed.offload_params, saved.train.mixed_precision) == ("deepspeed", 3, True, True, "bf16")
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["final"]["val_loss"])
    start = dense_global(torch.load(spy / "rank1_msg1.pt"), workers=1)
    final = load_state(run / "checkpoints" / "final")["global"]
    assert final.shape == start.shape and (final - start).abs().max() > 1e-4  # the global adapter moved
    d1, d2 = torch.load(spy / "fit_rank1_round1_client0.pt"), torch.load(spy / "fit_rank2_round1_client0.pt")
    assert torch.equal(d1, d2) and d1.abs().max() > 0  # both ranks of the client end with the same adapter
