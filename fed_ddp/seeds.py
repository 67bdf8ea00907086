"""Every random stream of a run, derived from ``run.seed`` in one place.

Each stream is a function of the run seed and of who and when (round, client), never of which rank or
worker plays a client, so a client's training is the same whatever worker plays it and a resumed run
draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import numpy as np

_PRIME = 1_000_003


def client_round(run_seed: int, rnd: int, client_id: int) -> int:
    """Local training of ``client_id`` in round ``rnd``: batches, noise, timesteps, LoRA dropout.

    Clients 0..1008 keep the formula the project started with (so earlier measurements reproduce);
    beyond it ``rnd * 1009 + id`` would collide ((r + 1, c) with (r, c + 1009)), so larger ids draw
    from numpy's SeedSequence of (seed, round, id), a 63-bit value far above the small formula's range."""
    if client_id < 1_009:
        return run_seed * _PRIME + rnd * 1_009 + client_id
    return int(np.random.SeedSequence([run_seed, rnd, client_id]).generate_state(1, np.uint64)[0] >> 1) | (1 << 62)


def client_codec(run_seed: int, client_id: int) -> int:
    """Base of a client's uplink codec streams (stochastic rounding, random-k); the round advances them."""
    return run_seed * _PRIME + client_id


def server_codec(run_seed: int) -> int:
    """Base of the server's downlink codec streams."""
    return run_seed * _PRIME + 999_983


# numpy streams of the server's round decisions (SeedSequence keys: seed, round, purpose)
AVAILABILITY, SAMPLING, DROPOUT = 1, 2, 3


def round_rng(run_seed: int, rnd: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([run_seed, rnd, purpose])


def client_objective(run_seed: int, rnd: int, client_id: int) -> int:
    """A client objective's own draws in round ``rnd`` (noise_offset's offsets): apart from the batches' stream,
    so an objective that draws changes nothing else a client draws."""
    return int(np.random.SeedSequence([run_seed, rnd, client_id, 5]).generate_state(1, np.uint64)[0] >> 1)


def client_prior(run_seed: int, client_id: int) -> int:
    """The class images ``client_id`` generates for prior preservation (train.objective=prior), once per client."""
    return int(np.random.SeedSequence([run_seed, client_id, 6]).generate_state(1, np.uint64)[0] >> 1)


def client_personal(run_seed: int, client_id: int) -> int:
    """Initial personal adapter of ``client_id`` (personal.mode=split), drawn the first time it plays."""
    return int(np.random.SeedSequence([run_seed, client_id, 4]).generate_state(1, np.uint64)[0] >> 1)


def eval_metrics(run_seed: int, which: int, chunk: int) -> int:
    """eval.metrics: the images generated for set ``which`` (0: the pooled validation set, 1 + c: client c), batch
    ``chunk``; the same every round, so rounds compare at fixed noise. ``chunk=-1``: which real images the set takes."""
    return int(np.random.SeedSequence([run_seed, which, chunk + 1, 7]).generate_state(1, np.uint64)[0] >> 1)
