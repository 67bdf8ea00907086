"""gather_bytes over real gloo ranks: dst gets exactly what each rank sent, and every byte is counted.

Three processes (torch.multiprocessing spawn, file rendezvous: no ports). Each rank wraps the
torch.distributed calls to record the bytes it hands to them as a sender; the test checks that the
sum over ranks equals what ``GatherStats`` reports on dst.
"""

from __future__ import annotations

import zlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow
WORLD = 3

# name -> (method, dst (global), group ranks or None, payload size per global rank, sizes known in advance)
SCENARIOS = {
    "p2p_to_0": ("p2p", 0, None, [0, 1000, 37], False),
    "gather_to_0": ("gather", 0, None, [0, 1000, 37], False),
    "p2p_to_1_with_empty_sender": ("p2p", 1, None, [5, 11, 0], False),
    "gather_to_2_known_sizes": ("gather", 2, None, [64, 64, 64], True),
    "p2p_known_sizes": ("p2p", 0, None, [0, 300, 301], True),
    "p2p_subgroup_0_2_to_2": ("p2p", 2, [0, 2], [17, 0, 4099], False),
    "gather_subgroup_0_2_to_0": ("gather", 0, [0, 2], [0, 0, 250], False),
}


def _payload(name: str, rank: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}".encode()))
    return torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8)


def _spy(log: list):
    """Wrap the collectives gather_bytes uses: record (call, bytes this rank sends to others)."""
    real = {n: getattr(dist, n) for n in ("gather", "all_gather", "batch_isend_irecv")}
    isend = dist.isend

    def nb(t):
        return t.numel() * t.element_size()

    def gather(tensor, gather_list=None, dst=None, group=None, **kw):
        log.append(("gather", 0 if dist.get_rank() == dst else nb(tensor)))
        return real["gather"](tensor, gather_list=gather_list, dst=dst, group=group, **kw)

    def all_gather(tensor_list, tensor, group=None, **kw):
        log.append(("all_gather", nb(tensor) * (dist.get_world_size(group) - 1)))
        return real["all_gather"](tensor_list, tensor, group=group, **kw)

    def batch_isend_irecv(ops):
        log.append(("p2p", sum(nb(o.tensor) for o in ops if o.op is isend)))
        return real["batch_isend_irecv"](ops)

    dist.gather, dist.all_gather, dist.batch_isend_irecv = gather, all_gather, batch_isend_irecv


def _named() -> dict[str, torch.Tensor]:
    """Mixed dtypes and sizes, so later tensors start at offsets no wider dtype could be viewed at."""
    g = torch.Generator().manual_seed(5)
    return {"bool": torch.rand(3, generator=g) > 0.5, "f32": torch.randn(3, 4, generator=g),
            "bf16": torch.randn(5, generator=g).bfloat16(), "i64": torch.randint(-9, 9, (2, 1), generator=g),
            "empty": torch.zeros(0, 2), "u8": torch.arange(7, dtype=torch.uint8)}


def _worker(rank: int, store: str, out_dir: str) -> None:
    from fed_ddp.distributed.collectives import gather_bytes

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        groups = {tuple(g): dist.new_group(g) for g in {tuple(s[2]) for s in SCENARIOS.values() if s[2]}}
        for name, (method, dst, members, sizes, known) in SCENARIOS.items():
            if members is not None and rank not in members:
                continue
            group = groups[tuple(members)] if members else None
            ranks = members or list(range(WORLD))
            log: list = []
            _spy(log)
            try:
                got, stats = gather_bytes(_payload(name, rank, sizes[rank]), dst, group, method=method,
                                          sizes=[sizes[r] for r in ranks] if known else None)
            finally:
                dist.gather, dist.all_gather, dist.batch_isend_irecv = (
                    dist.distributed_c10d.gather, dist.distributed_c10d.all_gather,
                    dist.distributed_c10d.batch_isend_irecv)
            results[name] = {"log": log, "got": got, "stats": stats}
        from fed_ddp.distributed.collectives import broadcast_tensors, broadcast_text

        results["tensors"] = broadcast_tensors(_named() if rank == 1 else None, src=1)
        bad = ['[["x", "object", [3]]]', '[["x", "float32", [true]]]', '[["x", "uint8", [1]], ["x", "uint8", [1]]]']
        results["bad_header"] = []
        for header in bad:  # a dtype outside the allow-list, a bool as a size, a name twice: refused, nothing sent
            if rank == 1:
                broadcast_text(header, src=1)
                continue
            try:
                broadcast_tensors(None, src=1)
                results["bad_header"].append(None)
            except ValueError as e:
                results["bad_header"].append(str(e))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collectives")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_dst_receives_exactly_each_payload_and_counts_every_byte(ranks, name):
    method, dst, members, sizes, known = SCENARIOS[name]
    members = members or list(range(WORLD))
    res = {r: ranks[r][name] for r in members}
    assert all(name not in ranks[r] for r in range(WORLD) if r not in members)
    for r in members:
        if r != dst:
            assert res[r]["got"] is None and res[r]["stats"] is None
    got, stats = res[dst]["got"], res[dst]["stats"]
    assert len(got) == len(members)  # by group rank
    for gr, r in enumerate(members):
        assert got[gr].dtype == torch.uint8
        assert torch.equal(got[gr], _payload(name, r, sizes[r])), f"payload of rank {r}"

    others = [sizes[r] for r in members if r != dst]
    w = len(members)
    assert stats.payload_bytes == sum(others)
    if known:
        expected_size_bytes = 0
    else:
        expected_size_bytes = 8 * (w - 1) if method == "p2p" else 8 * w * (w - 1)
    assert stats.size_bytes == expected_size_bytes
    expected_padding = 0 if method == "p2p" else max(sizes[r] for r in members) * (w - 1) - sum(others)
    assert stats.padding_bytes == expected_padding
    assert stats.total_bytes == sum(others) + expected_size_bytes + expected_padding
    # what the ranks really handed to torch.distributed as senders, summed over ranks
    sent = sum(b for r in members for _, b in res[r]["log"])
    assert stats.total_bytes == sent
    assert stats.collectives == len(res[dst]["log"]) <= 2
    assert stats.collectives == (0 if known else 1) + (1 if sum(others) else 0)


def test_broadcast_tensors_delivers_each_tensor_exactly_and_refuses_a_bad_header(ranks):
    want = _named()
    for r in range(WORLD):
        got = ranks[r]["tensors"]
        assert list(got) == list(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), (r, k)
    assert ranks[1]["bad_header"] == []
    assert all(len(ranks[r]["bad_header"]) == 3 and all("malformed header from rank 1" in (m or "")
                                                       for m in ranks[r]["bad_header"]) for r in (0, 2))


def test_bad_payloads_are_refused_before_any_collective():
    from fed_ddp.distributed.collectives import gather_bytes

    with pytest.raises(ValueError, match="uint8"):
        gather_bytes(torch.zeros(3), dst=0)
    with pytest.raises(ValueError, match="method"):
        gather_bytes(torch.zeros(3, dtype=torch.uint8), dst=0, method="allreduce")


def _replay_rank(rank: int, store: str, base: str, out_dir: str) -> None:
    import types

    from fed_ddp.client import encode_set
    from fed_ddp.config import load_config
    from fed_ddp.data.federated import build_federated_data
    from fed_ddp.diffusion.models import load_pipeline, quiet_libraries
    from fed_ddp.train import shared_replay

    quiet_libraries()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        cfg = load_config(None, [f"model.pretrained={base}", "data.replay_fraction=0.25"])
        pipe = load_pipeline(base, torch.device("cpu"))
        data = build_federated_data(cfg, channels=pipe.vae.config.in_channels)
        got = shared_replay(cfg, pipe, data, types.SimpleNamespace(is_server=rank == 0), torch.device("cpu"))
        own = encode_set(pipe, data.replay)  # what this worker would have encoded itself
        torch.save({"got": None if got is None else (got.latents, got.cond), "own": (own.latents, own.cond)},
                   f"{out_dir}/replay{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_servers_replay_encoding_is_what_each_worker_would_compute(tiny_base, tmp_path):
    """The replay set travels once from the server: the worker gets exactly encode_set's tensors (values, dtypes,
    devices); the server keeps nothing."""
    mp.spawn(_replay_rank, args=(str(tmp_path / "store"), str(tiny_base), str(tmp_path)), nprocs=2, join=True)
    server, worker = (torch.load(tmp_path / f"replay{r}.pt", weights_only=False) for r in (0, 1))
    assert server["got"] is None
    (lat, cond), (own_lat, own_cond) = worker["got"], worker["own"]
    assert len(lat) > 0 and torch.equal(lat, own_lat) and lat.device == own_lat.device
    assert cond.keys() == own_cond.keys() and all(
        torch.equal(cond[k], own_cond[k]) and cond[k].device == own_cond[k].device for k in cond)
