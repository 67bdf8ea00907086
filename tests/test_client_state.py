"""A client's codec state (error-feedback residuals, warm starts) survives rounds it sits out and restarts:
saved through the state store as safetensors (nothing unpickled), reloaded for the round a resumed server
continues from, and the byte stream continues exactly."""

from __future__ import annotations

import torch

from fed_ddp.compression import ChainState, CommConfig, uplink_chain
from fed_ddp.population import ClientStateStore

LAYOUT = [("a.lora_A.weight", (4, 32)), ("a.lora_B.weight", (32, 4))]


def test_saved_state_resumes_the_same_stream(tmp_path):
    chain = uplink_chain(CommConfig(uplink=["lowrank", "int8"], lowrank_rank=2, min_numel=0), LAYOUT)
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(chain.numel, generator=gen) for _ in range(4)]
    store = ClientStateStore(tmp_path, cache_size=0)
    state = ChainState(seed=7)
    for rnd in (1, 2, 3):
        chain.encode(deltas[rnd - 1], state)
        store.save(5, rnd, *state.to_tensors())
    assert store.rounds(5) == [2, 3]
    assert all(p.suffix == ".safetensors" for p in store.folder(5).iterdir())
    expected = chain.encode(deltas[3], state).to_bytes()  # round 4 of the uninterrupted client

    resumed = ChainState(seed=0)
    rnd, tensors, meta = store.load(5, max_round=3)
    resumed.load_tensors(tensors, meta)
    assert rnd == 3 and resumed.seed == 7 and resumed.step == 3 and resumed.residual_norm() > 0
    assert resumed.slots  # the low-rank warm start came back too
    assert torch.equal(chain.encode(deltas[3], resumed).to_bytes(), expected)  # same residual, warm start, seeds
    assert store.load(6, max_round=9) is None  # a client that never played starts from zero
