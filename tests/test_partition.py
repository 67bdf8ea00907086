"""Client partitioning: iid, dirichlet(alpha) and label-sorted shards."""

from __future__ import annotations

from itertools import combinations, pairwise

import numpy as np
import pytest

from fed_ddp.data.partition import dirichlet, iid, partition, shards

KINDS = ("iid", "dirichlet", "shards")


def _labels(num_labels: int = 5, per_label: int = 40, shuffle_seed: int | None = 99) -> np.ndarray:
    y = np.repeat(np.arange(num_labels), per_label)
    if shuffle_seed is not None:
        y = np.random.default_rng(shuffle_seed).permutation(y)
    return y


def _run(kind: str, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    if kind == "iid":
        return iid(len(labels), num_clients, seed)
    if kind == "dirichlet":
        return dirichlet(labels, num_clients, 0.5, seed)
    return shards(labels, num_clients, 2, seed)


def _entropy(counts: np.ndarray) -> float:
    q = counts[counts > 0] / counts.sum()
    return float(-(q * np.log(q)).sum())


# ----------------------------------------------------------------------------- common properties

@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_is_deterministic_other_seed_differs(kind):
    y = _labels()
    a = _run(kind, y, 4, seed=3)
    b = _run(kind, y, 4, seed=3)
    c = _run(kind, y, 4, seed=4)
    assert len(a) == len(b) == len(c) == 4
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(len(x) == len(z) and np.array_equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_clients", [1, 3, 4, 7])
def test_parts_are_disjoint_sorted_and_cover_everything(kind, num_clients):
    y = _labels(5, 41)  # 205 samples: not a multiple of most client/shard counts
    parts = _run(kind, y, num_clients, seed=0)
    assert len(parts) == num_clients
    allidx = np.concatenate(parts)
    assert np.issubdtype(allidx.dtype, np.integer)
    assert len(allidx) == len(y)  # no duplicates across or within clients ...
    assert np.array_equal(np.sort(allidx), np.arange(len(y)))  # ... and the union is every index
    for p in parts:
        assert np.all(np.diff(p) > 0), "each part is a strictly increasing (sorted, unique) index array"


@pytest.mark.parametrize("kind", KINDS)
def test_partition_dispatch_covers_everything(kind):
    y = _labels()
    parts = partition(kind, y, 4, seed=1)
    assert len(parts) == 4
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))


def test_unknown_kind_raises_value_error():
    with pytest.raises(ValueError, match="bogus"):
        partition("bogus", _labels(), 4, seed=0)


# ----------------------------------------------------------------------------- iid

@pytest.mark.parametrize("n,k", [(200, 4), (203, 4), (10, 3), (7, 7), (1000, 9)])
def test_iid_sizes_differ_by_at_most_one(n, k):
    parts = iid(n, k, seed=5)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_shuffled_not_contiguous():
    parts = iid(400, 4, seed=0)
    # contiguous blocks would make every part a range; a random split should not
    assert not any(np.array_equal(p, np.arange(p[0], p[0] + len(p))) for p in parts)


def test_iid_too_few_samples_raises_value_error():
    with pytest.raises(ValueError):
        iid(3, 5, seed=0)


# ----------------------------------------------------------------------------- shards

def test_shards_sizes_are_shards_per_client_pieces():
    y = _labels(5, 40)  # 200 samples, 8 shards of 25
    parts = shards(y, 4, 2, seed=0)
    assert [len(p) for p in parts] == [50, 50, 50, 50]
    parts3 = partition("shards", _labels(6, 30), 4, seed=0, shards_per_client=3)  # 12 shards of 15
    assert [len(p) for p in parts3] == [45] * 4


def test_shards_sizes_when_not_divisible():
    y = np.random.default_rng(1).integers(0, 5, 203)
    parts = shards(y, 4, 2, seed=2)
    sizes = sorted(len(p) for p in parts)
    # 8 pieces: three of 26 and five of 25; each client takes two of them
    assert sum(sizes) == 203
    assert all(50 <= s <= 52 for s in sizes)


def _shard_label_counts(labels: np.ndarray, n_shards: int) -> list[np.ndarray]:
    """Label histogram of each of the n_shards equal cuts of the label-sorted data (independent of fed_ddp)."""
    num_labels = labels.max() + 1
    sorted_y = np.sort(labels)
    bounds = np.linspace(0, len(labels), n_shards + 1)
    assert np.allclose(bounds, bounds.round())  # the tests use divisible sizes
    return [np.bincount(sorted_y[int(a):int(b)], minlength=num_labels) for a, b in pairwise(bounds)]


def _cover(client_counts: list[np.ndarray], shard_counts: list[np.ndarray], per_client: int) -> bool:
    """Is there an assignment of every shard to exactly one client reproducing each client's label counts?"""
    def rec(c: int, free: frozenset) -> bool:
        if c == len(client_counts):
            return not free
        for combo in combinations(sorted(free), per_client):
            if np.array_equal(sum(shard_counts[s] for s in combo), client_counts[c]) and rec(c + 1, free - set(combo)):
                return True
        return False

    return rec(0, frozenset(range(len(shard_counts))))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_shards_clients_hold_whole_label_sorted_shards(seed):
    y = _labels(5, 40)  # given in shuffled order: shards() must sort by label itself
    parts = shards(y, 4, 2, seed=seed)
    client_counts = [np.bincount(y[p], minlength=5) for p in parts]
    shard_counts = _shard_label_counts(y, 8)
    assert _cover(client_counts, shard_counts, 2)
    # a 25-sample shard spans at most 2 of the 40-sample label blocks -> at most 4 labels per client
    distinct = [int((c > 0).sum()) for c in client_counts]
    assert max(distinct) <= 4
    assert np.mean(distinct) < 4  # clearly non-iid (an iid split gives all 5 labels to every client)


@pytest.mark.parametrize("seed", [0, 7])
def test_shards_aligned_with_labels_give_at_most_two_labels(seed):
    y = _labels(4, 50, shuffle_seed=seed + 100)  # 8 shards of 25: every shard holds a single label
    parts = shards(y, 4, 2, seed=seed)
    for p in parts:
        vals, counts = np.unique(y[p], return_counts=True)
        assert len(vals) <= 2
        assert np.all(counts % 25 == 0)


def test_shards_too_few_samples_raise_value_error():
    with pytest.raises(ValueError):
        shards(_labels(1, 7), 4, 2, seed=0)  # 7 samples cannot fill 8 shards


# ----------------------------------------------------------------------------- dirichlet

@pytest.mark.parametrize("alpha", [0.05, 0.1, 1.0, 100.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_every_client_gets_a_sample(alpha, seed):
    y = _labels(10, 30)
    parts = dirichlet(y, 8, alpha, seed)
    assert all(len(p) >= 1 for p in parts)
    assert sum(len(p) for p in parts) == len(y)


def test_dirichlet_min_size_is_respected():
    y = _labels(10, 30)
    parts = dirichlet(y, 6, 0.3, seed=0, min_size=20)
    assert min(len(p) for p in parts) >= 20


def test_smaller_alpha_gives_more_label_skew():
    y = _labels(10, 60)
    num_clients = 6

    def mean_entropy(alpha: float) -> float:
        parts = dirichlet(y, num_clients, alpha, seed=0)
        return float(np.mean([_entropy(np.bincount(y[p], minlength=10)) for p in parts]))

    low, high = mean_entropy(0.1), mean_entropy(100.0)
    uniform = np.log(10)
    assert high > 0.95 * uniform  # alpha=100 is nearly iid
    assert low < high - 0.5  # alpha=0.1 is clearly skewed


def test_dirichlet_alpha_passes_through_partition():
    y = _labels(10, 60)
    ent = {a: np.mean([_entropy(np.bincount(y[p], minlength=10))
                       for p in partition("dirichlet", y, 6, seed=0, alpha=a)]) for a in (0.1, 100.0)}
    assert ent[0.1] < ent[100.0] - 0.5


def test_dirichlet_too_few_samples_raise_value_error():
    with pytest.raises(ValueError):
        dirichlet(_labels(1, 3), 5, 0.5, seed=0)


def test_dirichlet_gives_up_when_min_size_is_unreachable():
    # one label, 10 samples, 2 clients that each need 5: tiny alpha almost never splits evenly
    with pytest.raises(ValueError, match="100 draws"):
        dirichlet(np.zeros(10, dtype=int), 2, 0.001, seed=0, min_size=5)
