"""Multi-rank clients and the DeepSpeed engine, on CPU (gloo, DS_ACCELERATOR=cpu).

Five real launches of the same run (2 clients, same seeds and data, fp32; test_distributed's TINY_ARGS):
  torch x 1 rank/client, batch 8, 2 workers   |  torch x 2 ranks/client, batch 4, 1 worker
  DeepSpeed ZeRO-0 / ZeRO-2 / ZeRO-3 x 2 ranks/client, batch 4, 1 worker
must end round 1 with the same global adapter; inside a client both ranks hold the same adapter while the two
clients differ; and under ZeRO-3 the server receives full (non-empty) LoRA tensors. The first of them (torch x
1 rank/client) is test_distributed's dense chain, launched once for both modules (conftest.dense_chain_run).
The multi-rank runs have one worker (a group of 2 ranks) that plays both clients in turn, so one engine trains
client after client: 3 processes per launch instead of 5 on a 2-core machine, and the check that a client's
update does not depend on who plays it, for DeepSpeed too.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_distributed import ROOT, TINY_ARGS, dense_global, launch

from fed_ddp.checkpoint import load_state
from fed_ddp.protocol import UP_TAIL_BYTES

pytestmark = pytest.mark.slow
R2 = ["fed.workers=1", "fed.ranks_per_client=2", "train.batch_size=4"]  # ranks 1 and 2 play client 0, then 1
RUNS = {
    "torch_r1": [],  # conftest.dense_chain_run: the tiny config's ranks_per_client=1 and batch_size=8
    "torch_r2": R2,
    "zero0": [*R2, "train.engine=deepspeed", "deepspeed.zero_stage=0"],
    "zero2": [*R2, "train.engine=deepspeed", "deepspeed.zero_stage=2"],
    "zero3": [*R2, "train.engine=deepspeed", "deepspeed.zero_stage=3"],
}
# FFA-LoRA under ZeRO-3 with every parameter partitioned (tiny tensors are otherwise kept whole): the frozen A
# must still be exported in full
FFA_ZERO3 = [*R2, "train.engine=deepspeed", "deepspeed.zero_stage=3",
             "fed.strategy=ffa_lora", "deepspeed.config.zero_optimization.stage3_param_persistence_threshold=0"]
REL_TOL = 1e-3  # of how far the round moved the adapter; fp32 on CPU, only reduction orders differ


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory, dense_chain_run):
    """name -> (round-1 global, spy directory, run directory); torch_r1 is the session's dense chain run."""
    out = tmp_path_factory.mktemp("ds")
    env = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    dirs = {"torch_r1": dense_chain_run}
    for name, extra in {**RUNS, "zero3_ffa": FFA_ZERO3}.items():
        if name in dirs:
            continue
        spy = out / f"spy_{name}"
        spy.mkdir()
        nproc = 3  # the server and one worker of 2 ranks
        launch(nproc, [str(ROOT / "configs" / "tiny_test.yaml"), f"model.pretrained={tiny_base}",
                       f"run.output_dir={out}", f"run.name={name}", *TINY_ARGS, *extra],
               {**env, "FED_DDP_SPY_DIR": str(spy)})
        dirs[name] = (out / name, spy)
    return {name: (load_state(run_dir / "checkpoints" / "round_0001")["global"], spy, run_dir)
            for name, (run_dir, spy) in dirs.items()}


def _init(run):
    spy = run[1]
    return dense_global(torch.load(spy / "rank1_msg1.pt"), workers=2)  # dense fp32 wire


def test_engines_and_rank_layouts_agree(runs):
    ref, _, _ = runs["torch_r1"]
    moved = (ref - _init(runs["torch_r1"])).abs().max().item()
    assert moved > 1e-3  # the round really trained
    for name in RUNS:
        diff = (runs[name][0] - ref).abs().max().item()
        assert diff < REL_TOL * moved, f"{name}: max |global - torch_r1 global| = {diff:.3g}"


def test_ranks_of_one_client_agree_and_clients_differ(runs):
    for name in ("torch_r2", "zero2", "zero3"):
        spy = runs[name][1]
        d = {(r, c): torch.load(spy / f"fit_rank{r}_round1_client{c}.pt") for r in (1, 2) for c in (0, 1)}
        assert torch.equal(d[1, 0], d[2, 0]) and torch.equal(d[1, 1], d[2, 1]), name
        assert (d[1, 0] - d[1, 1]).abs().max() > 1e-4, name  # different private data -> different adapters


def test_zero3_server_receives_full_lora_tensors(runs):
    from safetensors.torch import load_file

    glob3, spy, run_dir = runs["zero3"]
    up = torch.load(spy / "rank1_msg1.pt")["up"]  # the worker's uplink: both clients it played, one after the other
    per_client = 4 * glob3.numel() + UP_TAIL_BYTES
    assert up.numel() == 2 * per_client
    for piece in up.split(per_client):
        assert piece[:-UP_TAIL_BYTES].clone().view(torch.float32).abs().sum() > 0
    ours = load_file(str(run_dir / "checkpoints" / "final" / "pytorch_lora_weights.safetensors"))
    ref = load_file(str(runs["torch_r1"][2] / "checkpoints" / "final" / "pytorch_lora_weights.safetensors"))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].shape == ref[k].shape and ours[k].numel() > 0, k


def test_zero3_exports_ffa_loras_frozen_a_in_full(runs, tiny_base):
    from safetensors.torch import load_file

    from fed_ddp.config import load_config
    from fed_ddp.diffusion.lora import prepare_trainable
    from fed_ddp.diffusion.models import load_pipeline

    final = load_file(str(runs["zero3_ffa"][2] / "checkpoints" / "final" / "pytorch_lora_weights.safetensors"))
    cfg = load_config(ROOT / "configs" / "tiny_test.yaml", ["fed.strategy=ffa_lora"])
    pipe = load_pipeline(str(tiny_base), torch.device("cpu"))
    prepare_trainable(pipe.unet, cfg)
    fresh = {"unet." + n.replace(".default", ""): p.detach() for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert final.keys() == fresh.keys()
    for k, v in fresh.items():
        if ".lora_A." in k:  # the shared initialisation, whole
            assert torch.equal(final[k], v), k
    assert all(final[k].abs().sum() > 0 for k in fresh if ".lora_B." in k)
