"""A client's codec state (error-feedback residuals, warm starts) survives a restart: saved each round,
older files pruned, reloaded for the round a resumed server continues from."""

from __future__ import annotations

import logging

import torch

from fed_ddp.compression import ChainState, CommConfig, uplink_chain
from fed_ddp.train import load_uplink_state, save_uplink_state

LAYOUT = [("a.lora_A.weight", (4, 32)), ("a.lora_B.weight", (32, 4))]


def test_saved_state_resumes_the_same_stream(tmp_path, caplog):
    chain = uplink_chain(CommConfig(uplink=["lowrank", "int8"], lowrank_rank=2, min_numel=0), LAYOUT)
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(chain.numel, generator=gen) for _ in range(4)]
    state = ChainState(seed=7)
    for rnd in (1, 2, 3):
        chain.encode(deltas[rnd - 1], state)
        save_uplink_state(state, tmp_path, rnd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comm_state_round_0002.pt", "comm_state_round_0003.pt"]
    expected = chain.encode(deltas[3], state).to_bytes()  # round 4 of the uninterrupted client

    resumed = ChainState(seed=7)
    load_uplink_state(resumed, tmp_path, 3, logging.getLogger("t"))
    assert resumed.step == 3 and resumed.residual_norm() > 0
    assert torch.equal(chain.encode(deltas[3], resumed).to_bytes(), expected)  # same residual, warm start, seeds

    fresh = ChainState(seed=7)
    with caplog.at_level(logging.WARNING):
        load_uplink_state(fresh, tmp_path, 9, logging.getLogger("t"))
    assert fresh.step == 0 and "restarts from zero" in caplog.text
