"""Heterogeneous LoRA ranks (``lora.client_ranks``): sub-layout maths against numpy zero-padding, per-client
message sizes and codec state, FlexLoRA on expanded deltas, one-line config errors, and a real gloo run with
ranks 2, 4 and 8 in one federation checked against its own recorded buffers and loaded in diffusers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from inproc_runs import TINY

from fed_ddp.compression import ChainState, CommConfig
from fed_ddp.config import ConfigError, load_config
from fed_ddp.lora_ranks import SubLayout, client_rank
from fed_ddp.protocol import UP_TAIL_BYTES, Wire
from fed_ddp.strategies import ClientUpdate, FlexLora

# rank-4 pairs, linear (out 5, in 6) and conv (out 3, in 2, 3x3), in peft's naming and order, with a tensor
# outside any pair between them (travels whole)
R = 4
LAYOUT = [("l.lora_A.default.weight", (R, 6)), ("l.lora_B.default.weight", (5, R)), ("x.extra", (7,)),
          ("c.lora_A.default.weight", (R, 2, 3, 3)), ("c.lora_B.default.weight", (3, R, 1, 1))]
SIZES = [int(np.prod(s)) for _, s in LAYOUT]


def _np_tensors(flat):
    out, o = [], 0
    for (_, shape), n in zip(LAYOUT, SIZES):
        out.append(np.asarray(flat[o:o + n], dtype=np.float64).reshape(shape))
        o += n
    return out


def _np_take(flat, r):  # numpy: A's first r rows, B's first r columns, the rest whole
    la, lb, x, ca, cb = _np_tensors(flat)
    return np.concatenate([la[:r].ravel(), lb[:, :r].ravel(), x.ravel(), ca[:r].ravel(), cb[:, :r].ravel()])


def _np_pad(sub, r):  # numpy: a rank-r sub-vector zero-padded to rank R
    la, lb, ca, cb = np.zeros((R, 6)), np.zeros((5, R)), np.zeros((R, 2, 3, 3)), np.zeros((3, R, 1, 1))
    o = 0
    for t, n in ((la, 6 * r), (lb, 5 * r), (None, 7), (ca, 18 * r), (cb, 3 * r)):
        piece = sub[o:o + n]
        o += n
        if t is None:
            x = piece
        elif t.shape[0] == R:  # A: rows
            t[:r] = piece.reshape((r,) + t.shape[1:])
        else:  # B: columns
            t[:, :r] = piece.reshape((t.shape[0], r) + t.shape[2:])
    assert o == len(sub)
    return np.concatenate([la.ravel(), lb.ravel(), x, ca.ravel(), cb.ravel()])


def _np_products(flat):
    la, lb, _, ca, cb = _np_tensors(flat)
    return [lb.reshape(5, -1) @ la.reshape(R, -1), cb.reshape(3, -1) @ ca.reshape(R, -1)]


def test_sub_layout_is_numpy_zero_padding():
    rng = np.random.default_rng(0)
    g = rng.normal(size=sum(SIZES))
    for r in (1, 2, 3, R):
        sub = SubLayout(LAYOUT, r)
        assert sub.layout == [("l.lora_A.default.weight", (r, 6)), ("l.lora_B.default.weight", (5, r)),
                              ("x.extra", (7,)), ("c.lora_A.default.weight", (r, 2, 3, 3)),
                              ("c.lora_B.default.weight", (3, r, 1, 1))]
        gt = torch.from_numpy(g)
        np.testing.assert_array_equal(sub.take(gt).numpy(), _np_take(g, r))
        assert sub.numel == len(_np_take(g, r)) == 6 * r + 5 * r + 7 + 18 * r + 3 * r
        np.testing.assert_array_equal(sub.start(gt).numpy(), _np_pad(_np_take(g, r), r))
        d = rng.normal(size=sub.numel)
        full = sub.expand(torch.from_numpy(d), gt).numpy()
        local = _np_pad(_np_take(g, r) + d, r)  # the client's trained adapter, zero-padded to rank R
        np.testing.assert_allclose(full, local - g, rtol=0, atol=1e-12)
        # the expanded update carries exactly the client's own product B_k·A_k (rank r)
        for got, (b_k, a_k) in zip(_np_products(g + full), (((5, 6), 6), ((3, 18), 18))):
            la, lb, _, ca, cb = _np_tensors(local)
            want = (lb[:, :r] @ la[:r]) if a_k == 6 else (cb.reshape(3, R)[:, :r] @ ca.reshape(R, 18)[:r])
            np.testing.assert_allclose(got, want, atol=1e-12)
            assert np.linalg.matrix_rank(got) <= r
    with pytest.raises(ValueError, match="client rank 5"):
        SubLayout(LAYOUT, 5)
    assert [client_rank([2, 4, 8], c) for c in range(7)] == [2, 4, 8, 2, 4, 8, 2]


def test_wire_messages_follow_each_clients_rank():
    """Dense fp32: a client's message is 4 bytes per value of its sub-layout + the protocol tail; a worker's
    buffer is its clients' messages back to back; unpacking gives the full-size delta of the zero-padded
    adapter. The uniform wire is unchanged."""
    ranks = [1, 2, 4]
    wire = Wire(CommConfig(), LAYOUT, workers=2, client_ranks=ranks)
    plain = Wire(CommConfig(), LAYOUT, workers=2)
    rng = np.random.default_rng(1)
    g = torch.from_numpy(rng.normal(size=sum(SIZES))).float()
    table = [[0, 4], [2]]  # ranks 1, 2 | 4
    want = {c: 4 * len(_np_take(g.numpy(), ranks[c % 3])) + UP_TAIL_BYTES for c in (0, 2, 4)}
    assert want[2] == plain.up_nbytes and want[0] < want[4] < want[2]
    assert wire.up_sizes(table) == [want[0] + want[4], want[2]] and plain.up_sizes(table) == [2 * want[2], want[2]]
    assert wire.up_bytes_for([0, 4, 2, 0]).total == 2 * want[0] + want[4] + want[2]
    metrics = {"train_loss": 0.5, "train_seconds": 1.0, "client_seconds": 1.0}
    deltas, bufs = {}, []
    for c in table[0]:
        start = wire.start_of(c, g)
        np.testing.assert_array_equal(start.numpy(), _np_pad(_np_take(g.numpy(), ranks[c % 3]), ranks[c % 3]))
        deltas[c] = torch.from_numpy(rng.normal(size=sum(SIZES))).float() * (start != 0)  # trained: own components
        bufs.append(wire.pack_uplink(c, deltas[c], None, 10 + c, metrics))
    buf = torch.cat(bufs)
    assert buf.numel() == wire.up_sizes(table)[0]
    for c, msg in zip(table[0], wire.split_uplink(buf, table[0])):
        assert msg.numel() == want[c]
        u = wire.unpack_uplink(msg, c, g)
        assert u.client_id == c and u.num_examples == 10 + c
        r = ranks[c % 3]
        local = _np_pad(_np_take(g.numpy(), r) + _np_take(deltas[c].numpy(), r), r)
        np.testing.assert_allclose(u.delta.double().numpy(), local - g.double().numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="needs the clients' ids"):
        wire.split_uplink(buf, 2)
    with pytest.raises(ValueError, match="needs the slot's client"):
        wire.unpack_uplink(bufs[0])
    with pytest.raises(ValueError, match="expected"):  # a rank-1 message in a rank-2 slot is the wrong size
        wire.unpack_uplink(bufs[0], 4, g)


def test_client_codec_state_is_sized_by_its_sub_layout():
    """Error feedback (top-k): a rank-2 client's residuals have its sub-layout's shapes, and what it sent plus
    what it keeps is its own components' delta."""
    comm = CommConfig(uplink=["topk", "int8"], topk_fraction=0.25, min_numel=0)
    wire = Wire(comm, LAYOUT, client_ranks=[2])
    rng = np.random.default_rng(2)
    g = torch.zeros(sum(SIZES))
    d = torch.from_numpy(rng.normal(size=sum(SIZES))).float()
    state = ChainState(seed=5)
    msg = wire.pack_uplink(0, d, state, 3, {"train_loss": 0.0, "train_seconds": 0.0, "client_seconds": 0.0})
    assert {n: tuple(t.shape) for n, t in state.residual.items()} == dict(SubLayout(LAYOUT, 2).layout)
    sent = SubLayout(LAYOUT, 2).take(wire.unpack_uplink(msg, 0, g).delta)
    residual = torch.cat([state.residual[n].reshape(-1) for n, _ in SubLayout(LAYOUT, 2).layout])
    np.testing.assert_allclose((sent + residual).numpy(), _np_take(d.numpy(), 2), atol=1e-5)
    assert msg.numel() < Wire(comm, LAYOUT).up_nbytes


def test_flexlora_on_expanded_deltas_is_svd_of_the_clients_own_products():
    """FlexLoRA over clients of ranks 1, 2 and 4 (through the wire): the new global's product per layer is the
    rank-R truncated SVD of the sample-weighted mean of each client's zero-padded B_k·A_k (numpy)."""
    ranks, n = [1, 2, 4], [3, 1, 6]
    wire = Wire(CommConfig(), LAYOUT, client_ranks=ranks)
    rng = np.random.default_rng(3)
    g = torch.from_numpy(rng.normal(size=sum(SIZES)))
    zeros = {"train_loss": 0.0, "train_seconds": 0.0, "client_seconds": 0.0}
    ups, locals_ = [], []
    for c in range(3):
        d = torch.from_numpy(rng.normal(scale=0.3, size=sum(SIZES))) * (wire.start_of(c, g) != 0)
        ups.append(wire.unpack_uplink(wire.pack_uplink(c, d.float(), None, n[c], zeros), c, g.float()))
        locals_.append(_np_pad(_np_take(g.numpy(), ranks[c]) + _np_take(d.numpy(), ranks[c]), ranks[c]))
    ups = [ClientUpdate(u.client_id, u.delta.double(), u.num_examples) for u in ups]
    new, m = FlexLora(local_steps=1, lr=1.0, layout=LAYOUT).aggregate(1, g, ups)
    w = np.array(n) / sum(n)
    for k, got in enumerate(_np_products(new.numpy())):
        target = sum(wi * _np_products(x)[k] for wi, x in zip(w, locals_))
        u, s, vt = np.linalg.svd(target, full_matrices=False)
        np.testing.assert_allclose(got, (u[:, :R] * s[:R]) @ vt[:R], atol=1e-5)
    mean_x = sum(wi * _np_tensors(x)[2] for wi, x in zip(w, locals_))  # outside the pairs: FedAvg
    np.testing.assert_allclose(_np_tensors(new.numpy())[2], mean_x, atol=1e-6)
    assert m["truncation_error_max"] >= 0


def test_config_errors_are_one_line():
    cases = [(["lora.rank=8", "lora.client_ranks=[2,4,16]"], r"lora.client_ranks=\[2, 4, 16\]: .*\[1, lora.rank=8\]"),
             (["lora.client_ranks=[0,2]"], r"lora.client_ranks=\[0, 2\]: every client rank .*\[1, lora.rank=4\]"),
             (["lora.client_ranks=[2,4]", "fed.strategy=ffa_lora"], "ffa_lora"),
             (["lora.client_ranks=[2,4]", "fed.strategy=scaffold"], "scaffold"),
             (["lora.client_ranks=[2,4]", "train.method=full"], "train.method=lora"),
             (["lora.client_ranks=[2,4]", "privacy.secagg=true", "fed.num_clients=4"], "privacy"),
             (["lora.client_ranks=[2,4]", "privacy.dp.noise_multiplier=1.0", "fed.sampling=poisson",
               "fed.sample_rate=0.5"], "privacy"),
             (["lora.client_ranks=[2,4]", "privacy.dp.clip_norm=1.0"], "privacy"),
             (["lora.client_ranks=[2,4]", "wireless.enabled=true"], "wireless.enabled"),
             (["lora.client_ranks=[2,4]", "fed.aggregator=median"], "fed.aggregator=median"),
             (["lora.client_ranks=[2,4]", "personal.mode=split"], "personal.mode=split")]
    for overrides, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as e:
            load_config(TINY, overrides)
        assert "\n" not in str(e.value) and str(e.value).startswith("lora.client_ranks="), str(e.value)
    cfg = load_config(ROOT / "configs" / "population.yaml", ["lora.client_ranks=[2,4,8]"])
    assert cfg.lora.client_ranks == [2, 4, 8]
    load_config(ROOT / "configs" / "quickstart.yaml", ["lora.client_ranks=[2,4,8]", "fed.strategy=flexlora"])
    load_config(TINY, ["lora.client_ranks=[1,4]", "comm.uplink=[topk,int8]"])  # stateful codecs are fine


# ----------------------------------------------------------------------------- ranks 2, 4, 8 over gloo

CLIENT_RANKS = [2, 4, 8]
GLOO_ARGS = ["lora.rank=8", "lora.alpha=8", "lora.client_ranks=[2,4,8]", "fed.num_clients=3", "fed.workers=2",
             "fed.rounds=2", "fed.local_steps=2", "train.lr=0.05", "train.weight_decay=0.01",
             "data.partition=dirichlet", "data.dirichlet_alpha=0.5", "eval.images_per_prompt=2",
             "eval.inference_steps=2", "eval.sample_seeds=[0]"]


@pytest.fixture(scope="module")
def gloo_run(tiny_base, tmp_path_factory):
    """1 server + 2 worker ranks over gloo (worker 0 plays two clients of different ranks in one buffer),
    recording every buffer and every trained delta (tests/spy_rank.py)."""
    from test_distributed import launch

    out = tmp_path_factory.mktemp("hetero")
    spy = out / "spy"
    spy.mkdir()
    launch(3, [TINY, f"model.pretrained={tiny_base}", f"run.output_dir={out}", "run.name=het", *GLOO_ARGS],
           {"FED_DDP_SPY_DIR": str(spy), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    return out / "het", spy


def _layout_and_init(run_dir: Path):
    from fed_ddp.compression import layout_of
    from fed_ddp.diffusion.lora import attach_lora, get_flat
    from fed_ddp.diffusion.models import load_pipeline

    cfg = load_config(run_dir / "config.yaml")
    pipe = load_pipeline(cfg.model.pretrained, torch.device("cpu"))
    attach_lora(pipe.unet, cfg.lora, seed=cfg.run.seed)
    return layout_of(pipe.unet), get_flat(pipe.unet).double().numpy()


def _by_hand(layout, r):
    """Per tensor, the index of the values a rank-r client keeps (numpy, from the shapes and peft's names)."""
    idx, o = [], 0
    for name, shape in layout:
        pos = np.arange(o, o + int(np.prod(shape))).reshape(shape)
        o += pos.size
        idx.append((pos[:r] if ".lora_A." in name else pos[:, :r] if ".lora_B." in name else pos).ravel())
    return np.concatenate(idx)


@pytest.mark.slow
def test_gloo_run_bytes_follow_ranks_and_global_is_zero_padded_average(gloo_run):
    from fed_ddp.checkpoint import load_state

    run_dir, spy = gloo_run
    layout, prev = _layout_and_init(run_dir)
    keep = {c: _by_hand(layout, CLIENT_RANKS[c]) for c in range(3)}
    size = {c: 4 * len(keep[c]) + UP_TAIL_BYTES for c in range(3)}  # dense fp32 + the protocol tail
    assert size[0] < size[1] < size[2] == 4 * len(prev) + UP_TAIL_BYTES
    rows = {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "seconds" in r}
    msgs = {rank: [torch.load(spy / f"rank{rank}_msg{n}.pt") for n in (1, 2)] for rank in (1, 2)}
    for rnd in (1, 2):
        head = msgs[1][rnd - 1]["head"].clone().view(torch.float32)
        slots = int(head[5].item())
        body = msgs[1][rnd - 1]["body"]
        ids = body[:8 * 2 * slots].clone().view(torch.int32).reshape(2, slots, 2)[..., 0].tolist()
        table = [[c for c in row if c >= 0] for row in ids]
        seen = body[8 * 2 * slots:].clone().view(torch.float32).double().numpy()
        np.testing.assert_allclose(seen, prev, atol=1e-6)  # dense downlink: the clients got the global
        new = np.zeros_like(prev)
        counts, locals_ = [], []
        for w, row in enumerate(table):
            up = msgs[w + 1][rnd - 1]["up"].numpy()
            assert len(up) == sum(size[c] for c in row)  # the worker's buffer: its clients' messages by rank
            o = 0
            for c in row:
                msg = up[o:o + size[c]]
                o += size[c]
                assert msg[-UP_TAIL_BYTES:-UP_TAIL_BYTES + 4].view(np.int32)[0] == c
                counts.append(msg[-16:-12].view(np.float32)[0])
                sub = msg[:-UP_TAIL_BYTES].view(np.float32).astype(np.float64)
                local = np.zeros_like(prev)  # the client's adapter, zero-padded to rank 8
                local[keep[c]] = prev[keep[c]] + sub
                locals_.append(local)
                # it trained its components only: the rest of its delta is exactly zero (AdamW, weight decay)
                fit = torch.load(spy / f"fit_rank{w + 1}_round{rnd}_client{c}.pt").double().numpy()
                outside = np.setdiff1d(np.arange(len(prev)), keep[c])
                assert np.all(fit[outside] == 0) and np.abs(fit[keep[c]]).max() > 0
                np.testing.assert_allclose(fit[keep[c]], sub, rtol=0, atol=0)
        assert sorted(c for row in table for c in row) == [0, 1, 2] and counts[0] != counts[1]
        weights = np.array(counts, dtype=np.float64) / sum(counts)
        new = sum(wi * x for wi, x in zip(weights, locals_))  # FedAvg of the zero-padded adapters
        state = load_state(run_dir / "checkpoints" / f"round_{rnd:04d}")
        np.testing.assert_allclose(state["global"].double().numpy(), new, rtol=0, atol=1e-6)
        prev = state["global"].double().numpy()
        air = rows[rnd]["comm"]["air"]["up"]
        assert air["total"] == air["payload"] + air["metadata"] == sum(size.values())  # the messages, exactly
        sent = [len(msgs[w + 1][rnd - 1]["up"]) for w in range(2)]
        cluster = rows[rnd]["comm"]["cluster"]["up"]  # the gather pads every buffer to the fullest worker's
        assert rows[rnd]["bytes_up"] == cluster["moved"] == 2 * max(sent) and cluster["padding"] == 2 * max(sent) - sum(sent)
        assert air["by_rank"] == {str(CLIENT_RANKS[c]): {"messages": 1, "total": size[c]} for c in range(3)}
    summary = json.loads((run_dir / "summary.json").read_text())
    classes = summary["comm"]["rank_classes"]
    assert summary["comm"]["client_ranks"] == CLIENT_RANKS
    for c, r in enumerate(CLIENT_RANKS):
        assert classes[str(r)] == {"clients": 1, "up_per_client_round": {"payload": size[c] - 20, "metadata": 20,
                                                                         "total": size[c]},
                                   "messages": 2, "up_total": 2 * size[c]}
    assert summary["comm"]["air"]["up"]["total"] == 2 * sum(size.values())
    assert summary["bytes_up_total"] == rows[1]["bytes_up"] + rows[2]["bytes_up"]
    info = json.loads((run_dir / "checkpoints" / "final" / "fed_ddp.json").read_text())
    assert info["lora"]["client_ranks"] == CLIENT_RANKS


@pytest.mark.slow
def test_gloo_run_exports_an_adapter_diffusers_loads(gloo_run, tiny_base):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from fed_ddp.checkpoint import load_state

    run_dir, _ = gloo_run
    layout, _ = _layout_and_init(run_dir)
    final = run_dir / "checkpoints" / "final"
    g = load_state(final)["global"]
    exported = load_file(str(final / "pytorch_lora_weights.safetensors"))
    for (name, shape), x in zip(layout, g.split([int(np.prod(s)) for _, s in layout])):
        assert torch.equal(exported["unet." + name.replace(".default", "")], x.reshape(shape)), name
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None, requires_safety_checker=False)
    gen = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    text = torch.randn(2, 3, cfg.cross_attention_dim, generator=gen)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        before = pipe.unet(x, t, text).sample
        pipe.load_lora_weights(final)
        after = pipe.unet(x, t, text).sample
    assert (after - before).abs().max() > 1e-4
