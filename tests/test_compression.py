"""Codecs and chains against their documented bounds, their byte counts and the chain rules.

Pure tensor maths on CPU, no process group: the bounds are recomputed here from the inputs (block
absmax, k, matrix rank), not read back from the codecs.
"""

from __future__ import annotations

import math

import pytest
import torch

from fed_ddp.compression import REGISTRY, ChainState, Codec, CommConfig, Payload, build_chain, register
from fed_ddp.compression.base import ENCODER, PieceState
from fed_ddp.compression.cast import Bf16, Fp16
from fed_ddp.compression.chain import downlink_chain, uplink_chain
from fed_ddp.compression.lowrank import LowRank
from fed_ddp.compression.quantize import Int4, Int8
from fed_ddp.compression.sparsify import BlockTopK, RandomK, SegmentTopK, TopK, index_format, num_kept
from fed_ddp.config import ConfigError

SHAPES = [(1001,), (64, 33), (8, 16, 3, 3), (4, 320)]
LAYOUT = [("a.lora_A", (4, 320)), ("a.lora_B", (320, 4)), ("conv.lora_A", (8, 16, 3, 3)), ("tiny.lora_A", (4, 16)),
          ("b.lora_A", (40, 32)), ("vec", (999,))]
CHAINS = [[], ["fp16"], ["bf16"], ["int8"], ["int4"], ["topk"], ["randomk"], ["lowrank"], ["topk", "int8"],
          ["topk", "int4"], ["randomk", "int8"], ["lowrank", "int8"], ["lowrank", "bf16"], ["randomk", "fp16"],
          ["blocktopk"], ["blocktopk", "int4"], ["segtopk"], ["segtopk", "int4"]]


def numel(layout) -> int:
    return sum(math.prod(s) for _, s in layout)


def rand(shape, seed=0, scale=0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per value: the absmax of its block (recomputed independently of the codec)."""
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for s in range(0, flat.numel(), block):
        out[s:s + block] = flat[s:s + block].abs().max()
    return out


def chain_for(names, layout=LAYOUT, **kw):
    kw = {"min_numel": 0, "lowrank_rank": 2, **kw}
    return uplink_chain(CommConfig(uplink=names, **kw), layout)


# -- each codec against its documented bound -------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_and_bf16_relative_error(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.exp(torch.empty(shape).uniform_(-20, 7, generator=g)) * torch.randn(shape, generator=g).sign()
    for codec, u, floor_ in ((Fp16(), 2**-11, 2**-25), (Bf16(), 2**-8, 0.0)):
        p = codec.encode(x)
        err = (codec.decode(p) - x).abs()
        assert bool((err <= u * x.abs() + floor_).all()), codec.name
        assert p.fields["values"].dtype == codec.dtype and p.bytes.metadata == 0
    big = torch.tensor([1e6, -1e6, 1.0])
    assert Fp16().decode(Fp16().encode(big)).tolist() == [65504.0, -65504.0, 1.0]  # saturates, no inf


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cls,levels", [(Int8, 127), (Int4, 7)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_block_quantizer_error_within_bound(shape, cls, levels, stochastic):
    x = rand(shape, seed=2)
    x.view(-1)[::97] *= 30  # outliers: blocks with very different scales
    block = 64
    codec = cls(block, stochastic)
    x_hat = codec.decode(codec.encode(x, PieceState(seed=5)))
    a = block_absmax(x, block).reshape(shape)
    err = (x_hat - x).abs()
    slack = 1 + 1e-6
    if stochastic:
        assert bool((err < a / levels * slack + 2**-24 * x.abs()).all())
    else:
        assert bool((err <= a / (2 * levels) * slack + 2**-24 * x.abs()).all())
    assert x_hat.abs().max() <= x.abs().max() * slack  # symmetric codes: never beyond the absmax


@pytest.mark.parametrize("cls", [Int8, Int4])
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(cls):
    """Mean over N independent draws of each value is within 5 standard errors of the value."""
    levels, block, n_draws = cls.qmax, 64, 4000
    base = torch.linspace(-1, 1, block) * 0.37
    base[0] = 1.0  # absmax of every block: the scale is 1 / levels, and x / s has all sorts of fractions
    x = base.repeat(n_draws)  # n_draws copies of one block: identical scales, independent roundings
    scale = 1.0 / levels
    sigma = scale / 2 / math.sqrt(n_draws)  # per-value rounding noise is at most scale/2 in sd
    frac = (base / scale - torch.floor(base / scale))
    off_grid = (frac > 0.2) & (frac < 0.8)
    assert int(off_grid.sum()) > 10
    for stochastic in (True, False):
        codec = cls(block, stochastic)
        mean = codec.decode(codec.encode(x, PieceState(seed=11))).view(n_draws, block).double().mean(0)
        dev = (mean - base.double()).abs()
        if stochastic:
            assert float(dev.max()) < 5 * sigma, float(dev.max() / sigma)
        else:  # round-to-nearest is deterministic: its bias on off-grid values is far outside that band
            assert float(dev[off_grid].min()) > 20 * sigma
    # the random stream moves on: two rounds draw differently
    st = ChainState(seed=3)
    chain = build_chain([cls.name], [("w", (block,))], CommConfig(stochastic_rounding=True, min_numel=0))
    first, second = (chain.encode(base, st).to_bytes() for _ in range(2))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_largest_exactly_and_meets_the_l2_bound(shape, fraction):
    x = rand(shape, seed=3)
    n = x.numel()
    k = max(1, math.ceil(round(fraction * n, 6)))
    codec = TopK(fraction)
    x_hat = codec.decode(codec.encode(x))
    kept = x_hat != 0
    assert int(kept.sum()) == k
    assert torch.equal(x_hat[kept], x[kept])  # exact
    if k < n:
        assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())
    assert float((x - x_hat).pow(2).sum()) <= (1 - k / n) * float(x.pow(2).sum()) * (1 + 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction,block", [(0.01, 8), (0.1, 8), (0.1, 7), (0.5, 64), (1.0, 8)])
def test_blocktopk_keeps_the_largest_blocks_exactly_and_meets_the_l2_bound(shape, fraction, block):
    x = rand(shape, seed=5)
    n = x.numel()
    nb = math.ceil(n / block)
    k = num_kept(nb, fraction)
    codec = BlockTopK(fraction, block)
    p = codec.encode(x)
    assert p.fields["values"].numel() == k * block  # whole blocks, the last one zero-padded
    assert p.bytes.metadata == index_format(nb, k)[1]  # one index (or bit) per block
    x_hat = codec.decode(p)
    pad = torch.nn.functional.pad(x.reshape(-1), (0, nb * block - n)).reshape(nb, block)
    kept = pad.norm(dim=1)[torch.nn.functional.pad(x_hat.reshape(-1), (0, nb * block - n)).reshape(nb, block)
                            .ne(0).any(dim=1)]
    got = x_hat.reshape(-1)
    assert torch.equal(got[got != 0], x.reshape(-1)[got != 0])  # kept values exact
    norms = pad.norm(dim=1)
    if k < nb:
        assert float(norms.sort(descending=True).values[k:].max()) <= float(kept.min()) + 1e-12
    assert float((x - x_hat).pow(2).sum()) <= (1 - k / nb) * float(x.pow(2).sum()) * (1 + 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction,segment", [(0.1, 64), (0.09, 64), (0.1, 128), (0.02, 50), (0.5, 16), (1.0, 8)])
def test_segtopk_keeps_each_segments_largest_exactly_with_combinadic_positions(shape, fraction, segment):
    x = rand(shape, seed=9)
    n = x.numel()
    ns = math.ceil(n / segment)
    k = num_kept(segment, fraction)
    codec = SegmentTopK(fraction, segment)
    p = codec.encode(x)
    assert p.fields["values"].numel() == ns * k
    width = 0 if k == segment else 4 if math.comb(segment, k) < 2**31 else 8
    assert p.bytes.metadata == ns * width  # one rank per segment, not k indices
    x_hat = codec.decode(p)
    # independently: per zero-padded segment, keep the k largest magnitudes
    seg = torch.nn.functional.pad(x.reshape(-1), (0, ns * segment - n)).reshape(ns, segment)
    idx = seg.abs().topk(k, dim=1).indices
    ref = torch.zeros_like(seg).scatter_(1, idx, seg.gather(1, idx)).reshape(-1)[:n].reshape(x.shape)
    assert torch.equal(x_hat, ref)
    assert float((x - x_hat).pow(2).sum()) <= (1 - k / segment) * float(x.pow(2).sum()) * (1 + 1e-6)


def test_segtopk_positions_round_trip_every_subset_rank():
    """The combinadic rank is a bijection: every 3-subset of 9 positions survives encode -> decode."""
    import itertools

    codec = SegmentTopK(3 / 9, 9)
    subsets = list(itertools.combinations(range(9), 3))
    x = torch.zeros(len(subsets), 9)
    for r, sub in enumerate(subsets):
        x[r, list(sub)] = torch.tensor([3.0, -2.0, 1.0])
    p = codec.encode(x)
    assert sorted(p.fields["positions"].tolist()) == list(range(math.comb(9, 3)))  # ranks 0 .. C(9,3)-1
    assert torch.equal(codec.decode(p), x)


@pytest.mark.parametrize("shape", SHAPES)
def test_randomk_kept_values_exact_and_receiver_regenerates_indices_from_seed(shape):
    x = rand(shape, seed=4)
    k = num_kept(x.numel(), 0.1)
    codec = RandomK(0.1)
    p = codec.encode(x, PieceState(seed=123))
    assert set(p.fields) == {"values", "seed"} and p.bytes.metadata == 8  # 8-byte seed, no indices
    wire = Payload(p.codec, p.shape, {k_: v.clone() for k_, v in p.fields.items()}, p.metadata)
    x_hat = RandomK(0.1).decode(wire)  # a fresh codec on the "server"
    kept = x_hat != 0
    assert int(kept.sum()) == k and torch.equal(x_hat[kept], x[kept])
    assert float((x - x_hat).pow(2).sum()) == pytest.approx(float(x[~kept].pow(2).sum()), rel=1e-5)
    other = RandomK(0.1).decode(codec.encode(x, PieceState(seed=124))) != 0
    assert not torch.equal(kept, other)  # another seed, another subset


def test_lowrank_projection_bounds_exact_low_rank_and_warm_start():
    g = torch.Generator().manual_seed(5)
    codec = LowRank(rank=3)
    # exact for a matrix of rank <= r
    m3 = torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g)
    assert torch.allclose(codec.decode(codec.encode(m3, PieceState(seed=1))), m3, atol=1e-4 * float(m3.abs().max()))
    # contraction always; warm start converges to the best rank-3 error (SVD tail) on a fixed matrix
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    s = torch.tensor([10.0, 8, 6] + [0.5 ** i for i in range(45)])
    m = (u[:, :48] * s) @ v.T
    best = float(s[3:].pow(2).sum().sqrt())
    st, errs = PieceState(seed=2), []
    for _ in range(8):
        err = float((codec.decode(codec.encode(m, st)) - m).norm())
        assert err <= float(m.norm()) * (1 + 1e-6)
        errs.append(err)
    assert errs[-1] <= errs[0] and errs[-1] == pytest.approx(best, rel=1e-3)
    # 1-D and thin tensors are not factored: they go on dense and exact
    for shape in [(100,), (4, 320)]:
        x = rand(shape)
        p = LowRank(rank=4).encode(x)
        assert set(p.fields) == {"dense"} and torch.equal(LowRank(rank=4).decode(p), x)


# -- byte accounting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("names,fraction,payload,metadata", [
    ([], 0.1, 5120, 0),
    (["fp16"], 0.1, 2560, 0),
    (["int8"], 0.1, 1280, 20 * 4),  # 1280 codes, 20 fp32 block scales
    (["int4"], 0.1, 640, 20 * 4),
    (["topk"], 0.1, 128 * 4, 160),  # k=128 fp32 values; bitmap of 1280 bits beats 128 int16 indices
    (["topk"], 0.01, 13 * 4, 13 * 2),  # k=13: 13 int16 indices beat the bitmap
    (["topk"], 1.0, 1280 * 4, 0),  # everything kept: no indices at all
    (["topk", "int8"], 0.1, 128, 160 + 2 * 4),
    (["randomk", "int4"], 0.1, 64, 8 + 2 * 4),  # 128 codes in 64 bytes; seed + 2 scales
    (["lowrank"], 0.1, (4 * 2 + 320 * 2) * 4, 0),  # rank 2: P 4x2, Q 320x2
    (["lowrank", "int8"], 0.1, 8 + 640, 4 + 10 * 4),  # P: 8 codes, 1 scale; Q: 640 codes, 10 scales
])
def test_byte_counts_hand_computed_for_a_4x320_lora_matrix(names, fraction, payload, metadata):
    chain = chain_for(names, [("w", (4, 320))], topk_fraction=fraction)
    msg = chain.encode(rand((1280,)), ChainState())
    assert (msg.bytes.payload, msg.bytes.metadata) == (payload, metadata)
    assert msg.to_bytes().numel() == msg.nbytes == payload + metadata == chain.wire_bytes.total


def test_index_formats():
    assert index_format(200, 10) == ("uint8", 10)
    assert index_format(200, 30) == ("bitmap", 25)
    assert index_format(70000, 100) == ("int32", 400)
    assert index_format(5, 5) == ("all", 0)
    for n, fraction in [(256, 0.3), (257, 0.01), (65536, 0.01), (65537, 0.001), (3000, 0.2)]:
        x = rand((n,), seed=n)
        codec = TopK(fraction)
        p = codec.encode(x)
        fmt, nb = index_format(n, num_kept(n, fraction))
        assert p.bytes.metadata == nb, fmt
        kept = codec.decode(p) != 0
        assert torch.equal(codec.decode(p)[kept], x[kept]) and int(kept.sum()) == num_kept(n, fraction)


@pytest.mark.parametrize("names", CHAINS, ids=str)
def test_message_bytes_are_the_tensors_sent_and_do_not_depend_on_data(names):
    chain = chain_for(names)
    for seed, scale in [(0, 0.01), (1, 100.0)]:
        msg = chain.encode(rand((numel(LAYOUT),), seed, scale), ChainState(seed))
        leaves = [(n, t.dtype, tuple(t.shape), m) for p in msg.pieces for n, t, m in p.leaves()]
        skeleton = [(n, t.dtype, tuple(t.shape), m) for p in chain.skeleton for n, t, m in p.leaves()]
        assert leaves == skeleton
        counted = sum(t.numel() * t.element_size() for p in msg.pieces for _, t, _ in p.leaves())
        buf = msg.to_bytes()
        assert buf.dtype == torch.uint8 and buf.numel() == counted == msg.nbytes == chain.wire_bytes.total
        assert msg.bytes.payload + msg.bytes.metadata == counted


@pytest.mark.parametrize("names", CHAINS, ids=str)
def test_bytes_roundtrip_decodes_exactly_what_the_sender_decodes(names):
    chain = chain_for(names)
    x = rand((numel(LAYOUT),), seed=6)
    msg = chain.encode(x, ChainState(7))
    server = chain_for(names)  # a separate instance, as on another rank
    got = server.decode(server.from_bytes(msg.to_bytes().clone()))
    assert torch.equal(got, chain.decode(msg))
    assert got.dtype == torch.float32 and got.shape == x.shape
    with pytest.raises(ValueError, match="bytes"):
        server.from_bytes(msg.to_bytes()[:-1])


@pytest.mark.parametrize("names", CHAINS, ids=str)
def test_encode_bytes_and_decode_bytes_equal_the_payload_path(names):
    """The one-copy path the wire uses (the empty chain's fast path included) sends the same bytes and decodes
    the same values as encode/to_bytes and from_bytes/decode; the dense message is the fp32 values themselves."""
    x = rand((numel(LAYOUT),), seed=11)
    a, b = chain_for(names), chain_for(names)
    sa, sb = ChainState(3), ChainState(3)
    buf = a.encode_bytes(x, sa)
    assert torch.equal(buf, b.encode(x, sb).to_bytes()) and sa.step == sb.step == 1
    if not names:
        assert buf.numpy().tobytes() == x.numpy().astype("<f4").tobytes()
    got = a.decode_bytes(buf)
    want = b.decode(b.from_bytes(buf))
    assert torch.equal(got, want) and got.dtype == torch.float32
    buf.fill_(0)  # neither decoded vector shares the received buffer's memory
    assert torch.equal(got, want) and torch.equal(want, a.decode_bytes(a.encode_bytes(x, ChainState(3))))
    with pytest.raises(ValueError, match="bytes"):
        a.decode_bytes(buf[:-1])


def test_topk_then_int8_decodes_to_quantized_topk():
    layout = [("w", (40, 32))]
    x = rand((1280,), seed=8)
    chain = chain_for(["topk", "int8"], layout, topk_fraction=0.1, block_size=16)
    x_hat = chain.decode(chain.from_bytes(chain.encode(x, ChainState()).to_bytes()))
    top = x.abs().topk(128).indices.sort().values
    support = x_hat.nonzero().reshape(-1)
    assert set(support.tolist()) <= set(top.tolist())  # nothing outside the top-k (a value may round to 0)
    vals = x[top]
    err = (x_hat[top] - vals).abs()
    assert bool((err <= block_absmax(vals, 16) / 254 * (1 + 1e-6)).all())  # int8 bound on the k values
    assert float(err.max()) > 0  # and it really was quantized
    other = torch.ones(1280, dtype=torch.bool)
    other[top] = False
    assert bool((x_hat[other] == 0).all())


def test_small_tensors_travel_untouched():
    layout = [("small", (4, 16)), ("big", (40, 32))]
    x = rand((64 + 1280,), seed=9)
    chain = chain_for(["topk", "int8"], layout, min_numel=1024)
    msg = chain.encode(x, ChainState())
    assert msg.pieces[0].codec == "raw" and msg.pieces[1].codec == "topk"
    assert msg.pieces[0].bytes.payload == 64 * 4 and msg.pieces[0].bytes.metadata == 0
    assert torch.equal(chain.decode(msg)[:64], x[:64])


def test_dense_dtype_marks_messages_a_reduce_can_add():
    x = rand((numel(LAYOUT),), seed=10)
    assert chain_for([]).dense_dtype == torch.float32
    half = chain_for(["fp16"])
    assert half.dense_dtype == torch.float16
    assert torch.equal(half.encode(x, ChainState()).to_bytes().view(torch.float16), x.half())
    assert chain_for(["fp16"], min_numel=1024).dense_dtype is None  # small tensors stay fp32: mixed
    assert chain_for(["int8"]).dense_dtype is None and chain_for(["topk"]).dense_dtype is None


# -- error feedback ----------------------------------------------------------------------------------
def _contraction(names, n, k):
    """rho with ||y - C(y)|| <= rho ||y|| for a tensor of n values (k kept), and the EF bound rho/(1-rho)."""
    rho = {"topk": math.sqrt(1 - k / n), "topk+int8": math.sqrt(1 - k / n) + math.sqrt(k) / 254}["+".join(names)]
    return rho / (1 - rho)


@pytest.mark.parametrize("names", [["topk"], ["topk", "int8"], ["randomk"], ["lowrank"], ["int8"], ["int4"],
                                   ["blocktopk", "int4"], ["segtopk", "int4"]], ids=str)
def test_error_feedback_sum_sent_tracks_sum_of_true_deltas(names):
    """sum(sent) = sum(true) - residual exactly, and the residual stays bounded while sums grow."""
    layout = [("a", (16, 80)), ("b", (40, 32))]
    n_all, rounds = numel(layout), 300
    g = torch.Generator().manual_seed(12)
    drift = torch.randn(n_all, generator=g) * 1e-3  # a consistent direction, as in training
    chain = chain_for(names, layout, topk_fraction=0.1, lowrank_rank=2)
    plain = build_chain(names, layout, CommConfig(min_numel=0, lowrank_rank=2))  # no error feedback
    st, st_plain = ChainState(1), ChainState(1)
    true = sent = sent_plain = torch.zeros(n_all, dtype=torch.float64)
    max_d = torch.zeros(n_all)
    for _ in range(rounds):
        d = drift + torch.randn(n_all, generator=g) * 1e-3
        max_d = torch.maximum(max_d, d.abs())
        true = true + d.double()
        sent = sent + chain.decode(chain.from_bytes(chain.encode(d, st).to_bytes())).double()
        sent_plain = sent_plain + plain.decode(plain.encode(d, st_plain)).double()
    resid = torch.cat([st.residual[name].reshape(-1) for name, _ in layout]).double()
    scale = float(true.abs().max())
    assert torch.allclose(sent + resid, true, atol=1e-5 * scale, rtol=0)
    gap = float((true - sent).norm())
    if names[0] == "topk":  # the contraction bound, tensor by tensor
        off = 0
        for _, shape in layout:
            n = math.prod(shape)
            bound = _contraction(names, n, num_kept(n, 0.1)) * float(max_d[off:off + n].norm())
            assert float(resid[off:off + n].norm()) <= bound
            off += n
    elif names[0] in ("int8", "int4"):  # |e| <= absmax(d + e) / (2 qmax) per value, so max|e| <= max|d| / (2 qmax - 1)
        levels = Int8.qmax if names[0] == "int8" else Int4.qmax
        assert float(resid.abs().max()) <= float(max_d.max()) / (2 * levels - 1) * (1 + 1e-6)
    else:
        assert gap <= 20 * float(max_d.norm())
    if names[0] not in ("int8", "int4"):  # biased compressors: without feedback the sums drift apart
        assert float((true - sent_plain).norm()) > 5 * gap


def test_state_dict_resume_continues_bit_for_bit(tmp_path):
    layout = [("a", (16, 80)), ("b", (40, 32))]
    cfg = {"topk_fraction": 0.1, "lowrank_rank": 2, "stochastic_rounding": True}
    deltas = [rand((numel(layout),), seed=s) for s in range(5)]
    for names in (["topk", "int8"], ["lowrank", "int4"], ["randomk", "int8"]):
        chain = chain_for(names, layout, **cfg)
        st = ChainState(42)
        straight = [chain.encode(d, st).to_bytes() for d in deltas]
        st1 = ChainState(42)
        for d in deltas[:3]:
            chain.encode(d, st1)
        torch.save(st1.state_dict(), tmp_path / "ef.pt")
        st2 = ChainState(0)
        st2.load_state_dict(torch.load(tmp_path / "ef.pt"))
        resumed = [chain_for(names, layout, **cfg).encode(d, st2).to_bytes() for d in deltas[3:]]
        assert all(torch.equal(a, b) for a, b in zip(straight[3:], resumed)), names
        assert st2.residual_norm() > 0


# -- configuration errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,needles", [
    ({"uplink": ["nope"]}, ["comm.uplink", "nope", "unknown codec", "topk"]),
    ({"uplink": ["int8", "topk"]}, ["comm.uplink", "'topk' cannot follow 'int8'", "end a chain"]),
    ({"uplink": ["fp16", "int8"]}, ["comm.uplink", "'int8' cannot follow 'fp16'"]),
    ({"uplink": ["lowrank", "topk"]}, ["comm.uplink", "'topk' cannot follow 'lowrank'", "comes first"]),
    ({"uplink": ["topk", "topk"]}, ["comm.uplink", "at most one"]),
    ({"downlink": ["topk", "int8"]}, ["comm.downlink", "global adapter", "fp16"]),
    ({"downlink": ["bogus"]}, ["comm.downlink", "bogus"]),
    ({"uplink": ["int4"], "block_size": 63}, ["comm.block_size", "63", "2 must divide"]),
    ({"block_size": 0}, ["comm.block_size", ">= 1"]),
    ({"topk_fraction": 0.0}, ["comm.topk_fraction", "0.0", "(0, 1]"]),
    ({"topk_fraction": 1.5}, ["comm.topk_fraction", "1.5", "(0, 1]"]),
    ({"lowrank_rank": 0}, ["comm.lowrank_rank"]),
    ({"min_numel": -1}, ["comm.min_numel"]),
    ({"topk_block": 0}, ["comm.topk_block", "0", ">= 1"]),
    ({"gather": "allreduce"}, ["comm.gather", "allreduce", "p2p"]),
])
def test_bad_config_is_one_line_value_error_naming_the_key(kwargs, needles):
    with pytest.raises(ValueError) as e:
        CommConfig(**kwargs)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_build_chain_validates_names_with_the_given_key():
    for names, key in ((["int8", "topk"], "comm.uplink"), (["zip"], "comm.downlink")):
        with pytest.raises(ConfigError, match=key):
            build_chain(names, LAYOUT, key=key)
    with pytest.raises(ConfigError, match="comm.block_size"):
        Int4(block_size=7)
    with pytest.raises(ConfigError, match="comm.topk_fraction"):
        TopK(1.5)
    assert downlink_chain(CommConfig(downlink=["INT8"]), LAYOUT).names == ["int8"]  # names are case-insensitive


def test_registry_register_refuses_duplicates_and_accepts_new_codecs():
    with pytest.raises(ValueError, match="already registered"):
        register("topk")(TopK)
    with pytest.raises(ValueError, match="lower-case"):
        register("Neg")(Int8)

    class Negate(Codec):
        kind = ENCODER

        def encode(self, x, state=None):
            return Payload(self.name, tuple(x.shape), {"v": -x.float()})

        def decode(self, p):
            return -p.fields["v"].reshape(p.shape)

    try:
        register("negate")(Negate)
        chain = chain_for(["topk", "negate"], [("w", (40, 32))], topk_fraction=1.0)
        x = rand((1280,))
        assert torch.equal(chain.decode(chain.encode(x, ChainState())), x)
    finally:
        REGISTRY.pop("negate", None)
