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
    with pytest.raises(ConfigError, match="--unet"):
        make_plan(cfg, comm, unet="sd99")


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
