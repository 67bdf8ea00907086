"""train.method=full, the baseline LoRA is measured against: every UNet weight is trained and exchanged.

The flat vector is the whole UNet in named order; one in-process federated run of 2 clients is checked
against an independent FedAvg of independently recomputed client deltas; its checkpoints hold a diffusers
UNet equal to the server's global vector, ``fed-ddp generate`` samples from it, and a resume continues it bit
for bit. LoRA mode keeps its layout (LoRA parameters only, as before).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from fed_ddp.checkpoint import load_state, read_info, save_checkpoint
from fed_ddp.compression import layout_of
from fed_ddp.config import ConfigError, load_config
from fed_ddp.diffusion.lora import attach_lora, get_flat, lora_parameters, prepare_trainable, set_flat
from fed_ddp.diffusion.models import load_pipeline, training_scheduler
from fed_ddp.strategies import RoundPlan

TINY = str(ROOT / "configs" / "tiny_test.yaml")
PROMPT = "a handwritten digit seven"


def _flat_by_name(module) -> torch.Tensor:
    """Every parameter of ``module`` in named order, fp32, computed without fed_ddp's helpers."""
    return torch.cat([p.detach().reshape(-1).float() for _, p in module.named_parameters()])


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _pipe(tiny_base, *overrides):
    cfg = load_config(None, list(overrides))
    p = load_pipeline(str(tiny_base), torch.device("cpu"))
    prepare_trainable(p.unet, cfg)
    return cfg, p


def test_method_is_validated():
    assert load_config(None, []).train.method == "lora"
    with pytest.raises(ConfigError, match="train.method"):
        load_config(None, ["train.method=adapter"])


def test_full_flat_vector_is_the_whole_unet(tiny_base):
    _, p = _pipe(tiny_base, "train.method=full")
    unet = p.unet
    names = [n for n, _ in unet.named_parameters()]
    total = sum(q.numel() for q in unet.parameters())
    assert [n for n, _ in layout_of(unet)] == names and not any("lora_" in n for n in names)
    assert all(q.requires_grad and q.dtype == torch.float32 for q in unet.parameters())
    flat = get_flat(unet)
    assert flat.numel() == total and torch.equal(flat, _flat_by_name(unet))
    v = torch.randn(total)
    set_flat(unet, v)
    assert torch.equal(get_flat(unet), v) and torch.equal(_flat_by_name(unet), v)
    last_name, last = list(unet.named_parameters())[-1]
    assert torch.equal(last.detach().reshape(-1), v[-last.numel():]), last_name  # named order, to the end
    with pytest.raises(ValueError, match="values"):
        set_flat(unet, torch.zeros(total - 1))


def test_lora_mode_is_unchanged(tiny_base, tmp_path):
    cfg, p = _pipe(tiny_base, "lora.rank=4", "run.seed=3")
    ref = load_pipeline(str(tiny_base), torch.device("cpu"))
    attach_lora(ref.unet, cfg.lora, seed=3)  # the LoRA path as it always was
    lora_names = [n for n, q in p.unet.named_parameters() if "lora_" in n]
    assert [n for n, _ in layout_of(p.unet)] == lora_names and lora_names
    assert torch.equal(get_flat(p.unet), get_flat(ref.unet))
    assert get_flat(p.unet).numel() == sum(q.numel() for n, q in p.unet.named_parameters() if "lora_" in n)
    assert len(lora_parameters(p.unet)) == len(lora_names)
    # a checkpoint whose info names no method (older runs) is a LoRA checkpoint
    info = {"base_model": str(tiny_base), "lora": {"rank": 4, "alpha": 4.0, "targets": list(cfg.lora.targets)}}
    out = save_checkpoint(tmp_path / "round_0001", p.unet, get_flat(p.unet), 1, {}, info)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()


def _full_cfg(out, name, *extra):
    return load_config(TINY, [f"run.output_dir={out}", f"run.name={name}", "train.method=full", "train.lr=0.01",
                              "fed.rounds=2", "data.partition=dirichlet", "eval.images_per_prompt=2",
                              "eval.inference_steps=2", "eval.sample_seeds=[0]", *extra])


@pytest.fixture(scope="module")
def full_run(tiny_base, tmp_path_factory):
    """Two federated rounds of full fine-tuning, 2 clients, in process (the server loop of ``fed-ddp run``)."""
    from fed_ddp.compare import run_arm
    from fed_ddp.data.federated import build_federated_data

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("full")
    cfg = _full_cfg(out, "full")
    p = load_pipeline(str(tiny_base), torch.device("cpu"))
    prepare_trainable(p.unet, cfg)
    init = get_flat(p.unet)
    data = build_federated_data(cfg)
    summary = run_arm(cfg, p, training_scheduler(p), data, init, str(tiny_base)).to_json()  # as summary.json holds it
    return cfg, p, data, init, summary


def test_round_is_fedavg_of_the_whole_unet(full_run, tiny_base):
    from fed_ddp.client import LocalTrainer

    cfg, _, data, init, summary = full_run
    assert init.numel() == sum(q.numel() for q in load_pipeline(str(tiny_base), torch.device("cpu")).unet.parameters())
    # each client's delta recomputed on a fresh pipeline, then FedAvg by hand
    _, fresh = _pipe(tiny_base, "train.method=full")
    sched = training_scheduler(fresh)
    deltas, counts = [], []
    for c, d in enumerate(data.clients):
        t = LocalTrainer(fresh, sched, d, cfg.train, cfg.run.seed, data.replay, cfg.data.replay_fraction, client_id=c)
        delta, _ = t.fit(init, RoundPlan(1, cfg.fed.local_steps, cfg.train.lr))
        deltas.append(delta.double())
        counts.append(len(d))
    assert counts[0] != counts[1]  # dirichlet: the weights matter
    expected = init.double() + sum(n * dl for n, dl in zip(counts, deltas)) / sum(counts)
    got = load_state(cfg.run.dir / "checkpoints" / "round_0001")["global"]
    assert got.numel() == init.numel()
    assert (got - init).abs().max() > 1e-3  # the UNet weights moved
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    row = json.loads((cfg.run.dir / "metrics.jsonl").read_text().splitlines()[1])
    message = init.numel() * 4 + 4 + 4 * 4  # dense fp32 UNet delta + int32 client id + 4 fp32 fields
    assert row["comm"]["air"]["up"]["total"] == 2 * message and row["clients"]["arrived"] == [0, 1]
    assert summary["lora_parameters"] == init.numel()


def test_checkpoint_is_a_diffusers_unet_equal_to_the_global(full_run):
    from diffusers import UNet2DConditionModel

    cfg, p, *_ = full_run
    for name in ("round_0001", "final"):
        ckpt = cfg.run.dir / "checkpoints" / name
        assert read_info(ckpt)["method"] == "full"
        assert not (ckpt / "pytorch_lora_weights.safetensors").exists()
        unet = UNet2DConditionModel.from_pretrained(ckpt / "unet")
        assert torch.equal(_flat_by_name(unet), load_state(ckpt)["global"])
    assert torch.equal(_flat_by_name(p.unet), load_state(cfg.run.dir / "checkpoints" / "final")["global"])


def test_generate_loads_the_full_unet(full_run, tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from fed_ddp.cli import main
    from fed_ddp.evaluation import generate
    from fed_ddp.images import save_grid

    cfg = full_run[0]
    final = cfg.run.dir / "checkpoints" / "final"
    ours = tmp_path / "ours.png"
    assert main(["generate", str(final), "--prompt", PROMPT, "--seed", "3", "--steps", "4", "--out", str(ours)]) == 0

    def sample(pipe, path):
        pipe.set_progress_bar_config(disable=True)
        save_grid(generate(pipe, [PROMPT], 3, 4, 1.0)[None], [PROMPT], path, cell=64)
        return _png(path)

    base = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None, requires_safety_checker=False)
    plain = sample(base, tmp_path / "plain.png")
    base.unet = UNet2DConditionModel.from_pretrained(final / "unet")  # diffusers alone, no fed_ddp
    theirs = sample(base, tmp_path / "theirs.png")
    mine = _png(ours)
    assert np.array_equal(mine, theirs)
    assert not np.array_equal(mine, plain)  # the fine-tuned UNet, not the base's


def test_resume_continues_bit_for_bit(full_run, tiny_base):
    from fed_ddp.compare import run_arm

    cfg, p, data, init, _ = full_run
    again = cfg.run.dir.with_name("resumed")
    shutil.copytree(cfg.run.dir, again)
    for gone in ("checkpoints/round_0002", "checkpoints/final", "summary.json"):
        shutil.rmtree(again / gone) if (again / gone).is_dir() else (again / gone).unlink()
    rcfg = _full_cfg(cfg.run.dir.parent, "resumed", "run.resume=true")
    # another starting point: only the round-1 checkpoint, read back into the UNet, can give the same rounds
    run_arm(rcfg, p, training_scheduler(p), data, init + 0.01, str(tiny_base))
    for name in ("round_0002", "final"):
        want = load_state(cfg.run.dir / "checkpoints" / name)["global"]
        assert torch.equal(load_state(again / "checkpoints" / name)["global"], want), name
