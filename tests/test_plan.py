"""``fed-ddp plan``: parameter counts on the meta device and bytes that match real encodes."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import ROOT, run_cli

from fed_ddp.compression import ChainState, CommConfig, layout_of, uplink_chain
from fed_ddp.config import ConfigError, load_config
from fed_ddp.plan import UNET_CONFIGS, make_plan, meta_unet


def load_run_and_comm(path, overrides):
    cfg = load_config(path, overrides)
    return cfg, cfg.comm

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = str(ROOT / "configs" / "tiny_test.yaml")
ATTN = ["lora.rank=4", "lora.targets=[to_q,to_k,to_v,to_out.0]"]


def test_sd15_unet_config_on_meta_has_the_published_counts():
    import json

    from fed_ddp.config import LoraSection
    from fed_ddp.diffusion.lora import attach_lora

    unet = meta_unet(json.loads((UNET_CONFIGS / "sd15_unet.json").read_text()))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    attach_lora(unet, LoraSection(rank=4, targets=["to_q", "to_k", "to_v", "to_out.0"]))
    layout = layout_of(unet)
    assert sum(math.prod(s) for _, s in layout) == 797_184 and len(layout) == 256
    assert all(p.device.type == "meta" for p in unet.parameters())  # no weights were ever allocated


def _expected_topk_int8(layout, fraction=0.1, block=64) -> int:
    """Bytes of [topk, int8] by hand: k int8 codes + fp32 scales + the cheaper of int16 indices / a bitmap."""
    total = 0
    for _, shape in layout:
        n = math.prod(shape)
        k = min(n, max(1, math.ceil(round(fraction * n, 6))))
        assert n <= 2**16  # every SD v1.5 rank-4 LoRA matrix: int16 indices
        total += k + 4 * math.ceil(k / block) + min(math.ceil(n / 8), 2 * k)
    return total


def test_plan_cli_for_sd15_prints_counts_and_exact_bytes():
    proc = run_cli("plan", TINY, *ATTN, "comm.uplink=[topk,int8]", "comm.downlink=[fp16]", "fed.rounds=3",
                   "--unet", "sd15", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "859,520,964 parameters" in out and "797,184 trainable parameters in 256 tensors" in out
    import json

    from fed_ddp.config import LoraSection
    from fed_ddp.diffusion.lora import attach_lora

    unet = meta_unet(json.loads((UNET_CONFIGS / "sd15_unet.json").read_text()))
    attach_lora(unet, LoraSection(rank=4, targets=["to_q", "to_k", "to_v", "to_out.0"]))
    up = _expected_topk_int8(layout_of(unet)) + 20  # + the protocol's int32 client id and 4 fp32 fields
    down = 2 * 797_184 + 20  # fp16 + the 5 fp32 header fields
    rows = {m.group(1): [int(v.replace(",", "")) for v in m.group(2, 3, 4)]
            for m in re.finditer(r"^  (uplink|downlink|both)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)", out, re.MULTILINE)}
    per_round = re.split(r"^totals", out, flags=re.MULTILINE)[0]
    first = {m.group(1): int(m.group(2).replace(",", ""))
             for m in re.finditer(r"^  (uplink|downlink)\s+[\d,]+\s+[\d,]+\s+([\d,]+)", per_round, re.MULTILINE)}
    assert first == {"uplink": up, "downlink": down}
    assert rows["both"][2] == (up + down) * 3 * 2  # 3 rounds x 2 clients (tiny_test.yaml)
    assert f"{3_188_736 / up:.2f}x" in out  # ratio to dense fp32 LoRA


def test_plan_bytes_equal_a_real_encode_of_the_real_tiny_model():
    from fed_ddp.diffusion.lora import attach_lora
    from fed_ddp.diffusion.tiny import build_unet

    cfg, comm = load_run_and_comm(QUICKSTART, ["fed.strategy=fedavg", "comm.uplink=[topk,int4]", "comm.min_numel=200",
                                               "comm.downlink=[int8]"])
    plan = make_plan(cfg, comm)
    assert plan.lora_parameters == 79_616 and plan.unet_source.startswith("built-in tiny")
    real = build_unet()  # real weights this time
    assert plan.unet_parameters == sum(p.numel() for p in real.parameters())
    attach_lora(real, cfg.lora, seed=0)
    layout = layout_of(real)
    assert layout == plan.up.chain.layout
    delta = torch.randn(plan.lora_parameters) * 1e-3
    buf = uplink_chain(comm, layout).encode(delta, ChainState(1)).to_bytes()
    assert buf.numel() == plan.up.message.total
    assert plan.up.total.total == buf.numel() + 20
    assert 0 < sum(not plan.up.chain.compresses(i) for i in range(len(layout))) < len(layout)  # min_numel=200 bites


def test_comm_section_in_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text((ROOT / "configs" / "tiny_test.yaml").read_text()
                 + "comm:\n  uplink: [randomk, int8]\n  topk_fraction: 0.2\n")
    cfg, comm = load_run_and_comm(str(y), ["comm.topk_fraction=0.05", "fed.rounds=7"])
    assert comm == CommConfig(uplink=["randomk", "int8"], topk_fraction=0.05)
    assert cfg.fed.rounds == 7 and cfg.fed.num_clients == 2  # the rest of the YAML still applies
    cfg, comm = load_run_and_comm(TINY, [])
    assert comm == CommConfig()


@pytest.mark.parametrize("yaml_extra,overrides,needles", [
    ("", ["comm.uplink=[int8,topk]"], ["comm.uplink", "'topk' cannot follow 'int8'"]),
    ("", ["comm.upplink=[int8]"], ["comm.upplink", "unknown key"]),
    ("", ["comm.topk_fraction=1.5"], ["comm.topk_fraction", "1.5", "(0, 1]"]),
    ("", ["comm.block_size=big"], ["comm.block_size", "big"]),
    ("comm:\n  uplink: [int4]\n  block_size: 33\n", [], ["comm.block_size", "33", "2 must divide"]),
    ("comm:\n  downlnk: [fp16]\n", [], ["comm.downlnk"]),
    ("comm: 3\n", [], ["comm"]),
])
def test_plan_config_errors_are_one_line(tmp_path, capsys, yaml_extra, overrides, needles):
    from fed_ddp.cli import main

    y = tmp_path / "c.yaml"
    y.write_text((ROOT / "configs" / "tiny_test.yaml").read_text() + yaml_extra)
    assert main(["plan", str(y), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fed-ddp: config error:"), err
    for n in needles:
        assert n in err, err


def test_unknown_unet_is_a_config_error():
    cfg, comm = load_run_and_comm(TINY, [])
    with pytest.raises(ConfigError, match="--denoiser"):
        make_plan(cfg, comm, "sd99")


def test_plan_reads_a_pretrained_directory(tiny_base):
    cfg, comm = load_run_and_comm(TINY, [f"model.pretrained={tiny_base}", "comm.uplink=[int8]"])
    plan = make_plan(cfg, comm)
    assert plan.unet_source == str(tiny_base / "unet" / "config.json")
    from diffusers import UNet2DConditionModel

    real = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    assert plan.unet_parameters == sum(p.numel() for p in real.parameters())


def test_plan_population_memory_flat_in_n_disk_and_cluster_bytes():
    from fed_ddp.compression import ChainState
    from fed_ddp.plan import format_plan
    from fed_ddp.protocol import HEAD_BYTES

    texts = {}
    for n in (100, 100_000):
        cfg, comm = load_run_and_comm(QUICKSTART, ["fed.strategy=fedavg", f"fed.num_clients={n}", "fed.clients_per_round=10",
                                                   "fed.workers=4",
                                                   "comm.uplink=[topk,int8]", "fed.rounds=20"])
        plan = make_plan(cfg, comm)
        texts[n] = format_plan(plan, comm)
        # a client's state: what a real encode leaves in a fresh ChainState (residuals of the top-k tensors)
        st = ChainState()
        plan.up.chain.encode(torch.zeros(plan.lora_parameters), st)
        assert plan.state_bytes == sum(4 * t.numel() for t in st.residual.values()) > 0
        assert plan.cluster_up == 4 * 3 * plan.up.total.total  # native gather: 4 workers padded to 3 messages
        assert plan.cluster_down == 4 * (HEAD_BYTES + 8 * 4 * 3 + plan.down.message.total)
    mem = [next(line for line in texts[n].splitlines() if line.startswith("memory")) for n in (100, 100_000)]
    assert mem[0] == mem[1]  # nothing held in memory grows with N
    disk = [re.search(r"about ([\d,]+) clients", texts[n]).group(1) for n in (100, 100_000)]
    assert disk == ["88", "200"]  # 100 (1 - 0.9^20) and 100000 (1 - 0.9999^20)


def test_options_go_anywhere_on_the_line(capsys):
    """The README's `fed-ddp plan configs/quickstart.yaml --unet sd15 lora.rank=4 ...`: overrides after an option."""
    from fed_ddp.cli import main

    assert main(["plan", QUICKSTART, "--unet", "sd15", "lora.rank=4", "lora.targets=[to_q,to_k,to_v,to_out.0]"]) == 0
    assert "797,184 trainable parameters" in capsys.readouterr().out  # SD v1.5, rank 4 on the attention projections
    with pytest.raises(SystemExit):
        main(["plan", QUICKSTART, "--unet", "sd15", "--bogus"])


# ----------------------------------------------------------------------------- real sizes: SDXL, SD3, Flux

# shipped denoiser -> (model.family, parameter total published for the checkpoint)
REAL = {"sdxl": ("sdxl", 2_567_463_684), "sd3-medium": ("sd3", 2_028_328_000), "flux1-dev": ("flux", 11_901_408_320)}


def _lora_count(model, targets, rank) -> int:
    """r * (in + out) summed over the modules peft's rule matches (the name is a target or ends with '.target')."""
    total = 0
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            assert isinstance(module, torch.nn.Linear), name  # every default target is a Linear
            total += rank * (module.in_features + module.out_features)
    return total


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_size_denoisers_have_the_published_counts_and_lora_sizes(name):
    import json

    from fed_ddp.diffusion.families import lookup
    from fed_ddp.plan import BUILTIN_DENOISERS, meta_denoiser

    family, published = REAL[name]
    fam = lookup(family)
    fresh = meta_denoiser(json.loads((UNET_CONFIGS / BUILTIN_DENOISERS[name][1]).read_text()), family)
    assert sum(p.numel() for p in fresh.parameters()) == published
    for rank in (4, 16):
        expected = _lora_count(fresh, fam.default_targets, rank)
        cfg, comm = load_run_and_comm(TINY, [f"model.family={family}", f"lora.rank={rank}", "lora.targets=[]"])
        assert cfg.lora.targets == list(fam.default_targets)
        plan = make_plan(cfg, comm, name)
        assert (plan.family, plan.denoiser) == (family, fam.denoiser_class_name)
        assert plan.unet_parameters == published
        assert plan.lora_parameters == expected > 0
        assert plan.dense_lora_bytes == plan.up.message.total == 4 * expected  # dense fp32 uplink: 4 B a value
    if family == "flux":  # by hand: 19 double blocks (8 attention projections 3072x3072, 2 feed-forwards
        # 3072 -> 12288 -> 3072) and 38 single blocks (to_q, to_k, to_v): r * (in + out) each
        assert expected == 16 * (19 * (8 * 6144 + 4 * 15360) + 38 * 3 * 6144) == 44_826_624


def test_flux_schnell_is_dev_without_the_guidance_embedder():
    from fed_ddp.plan import KNOWN_HUB_IDS

    cfg, comm = load_run_and_comm(TINY, ["model.family=flux", "model.pretrained=black-forest-labs/FLUX.1-schnell",
                                         "lora.targets=[]"])
    plan = make_plan(cfg, comm)  # offline: the hub id reads its shipped config
    assert KNOWN_HUB_IDS[cfg.model.pretrained] == "flux1-schnell" and "shipped" in plan.unet_source
    guidance = (256 * 3072 + 3072) + (3072 * 3072 + 3072)  # TimestepEmbedding(256 -> 3072 -> 3072)
    assert plan.unet_parameters == 11_901_408_320 - guidance
    assert plan.lora_parameters == 4 * 2_801_664  # the same LoRA layout as dev


def test_plan_reads_a_transformer_directory(tmp_path):
    """A local Flux pipeline directory: `<dir>/transformer/config.json` (a small one, built for real here)."""
    import json

    from diffusers import FluxTransformer2DModel

    small = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 16, "num_attention_heads": 2,
             "num_layers": 1, "num_single_layers": 1, "in_channels": 8, "joint_attention_dim": 24,
             "pooled_projection_dim": 12, "axes_dims_rope": [4, 6, 6], "guidance_embeds": True}
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(small))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    cfg, comm = load_run_and_comm(TINY, ["model.family=flux", f"model.pretrained={tmp_path}", "lora.targets=[]"])
    plan = make_plan(cfg, comm)
    assert plan.unet_source == str(tmp_path / "transformer" / "config.json")
    real = FluxTransformer2DModel.from_config(small)
    assert plan.unet_parameters == sum(p.numel() for p in real.parameters())
    assert plan.lora_parameters == _lora_count(real, cfg.lora.targets, cfg.lora.rank) > 0


@pytest.mark.parametrize("argv,needles", [
    (["--denoiser", "flux1-dev", "model.family=sd"], ["--denoiser='flux1-dev'", "a flux denoiser", "model.family=sd"]),
    (["model.pretrained=black-forest-labs/FLUX.1-dev"], ["model.pretrained", "set model.family=flux"]),
    (["--denoiser", "sdxl", "--wireless"], ["--wireless", "model.family=sdxl"]),
])
def test_family_mismatches_are_one_line_errors(capsys, argv, needles):
    from fed_ddp.cli import main

    assert main(["plan", TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fed-ddp: config error:"), err
    for n in needles:
        assert n in err, err


def test_flux_cluster_config_plans_offline_at_rank_16():
    """The README's `fed-ddp plan configs/flux_lora_deepspeed.yaml lora.rank=16`, as a user runs it, offline."""
    from fed_ddp.engines import deepspeed_config

    path = ROOT / "configs" / "flux_lora_deepspeed.yaml"
    cfg = load_config(path)
    assert (cfg.model.family, cfg.model.pretrained) == ("flux", "black-forest-labs/FLUX.1-dev")
    assert cfg.train.mixed_precision == "bf16" and cfg.train.gradient_checkpointing
    assert deepspeed_config(cfg.train, cfg.deepspeed, "cuda", dp_size=cfg.fed.ranks_per_client)[
        "zero_optimization"]["stage"] == 3
    proc = run_cli("plan", str(path), "lora.rank=16", env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = 16 * 2_801_664  # test_real_size_denoisers_...: the independent count of Flux's default targets at rank 16
    assert "FluxTransformer2DModel (model.family=flux)" in proc.stdout
    assert "11,901,408,320 parameters" in proc.stdout
    assert f"{n:,} trainable parameters" in proc.stdout and f"({4 * n:,} B as fp32)" in proc.stdout
    up = re.search(r"^  uplink\s+([\d,]+)", proc.stdout, re.MULTILINE).group(1)
    assert int(up.replace(",", "")) == 4 * n  # dense fp32 (the config sets no codec)


def test_sdxl_cluster_config_plans_offline():
    path = ROOT / "configs" / "sdxl_lora_deepspeed.yaml"
    cfg, comm = load_run_and_comm(path, [])
    assert (cfg.model.family, cfg.deepspeed.zero_stage, cfg.train.mixed_precision) == ("sdxl", 2, "bf16")
    assert cfg.train.gradient_checkpointing
    plan = make_plan(cfg, comm)
    assert plan.unet_parameters == 2_567_463_684 and "sdxl_unet.json" in plan.unet_source
    assert plan.lora_parameters == 5_806_080  # rank 4 on the attention projections (the count checked above)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_each_familys_tiny_base_on_meta(family):
    """No model.pretrained: the family's built-in tiny denoiser, the same shapes as the real module built here."""
    from fed_ddp.diffusion.families import get_family

    cfg, comm = load_run_and_comm(TINY, [f"model.family={family}", "lora.targets=[]"])
    plan = make_plan(cfg, comm)
    assert plan.family == family and plan.unet_source == f"built-in tiny {family} base"
    real = get_family(family).tiny_denoiser()
    assert plan.denoiser == type(real).__name__
    assert plan.unet_parameters == sum(p.numel() for p in real.parameters())
    assert plan.lora_parameters == _lora_count(real, cfg.lora.targets, cfg.lora.rank) > 0
