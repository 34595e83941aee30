# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""owner_of and bucketize_dedup against plain-Python references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recis_torchrec import ops

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_owner_of_spreads_sequential_ids_evenly(world_size):
    owners = ops.owner_of(torch.arange(80_000, dtype=torch.int64), world_size)
    counts = torch.bincount(owners, minlength=world_size)
    assert owners.min() >= 0 and owners.max() < world_size
    assert (counts - 80_000 / world_size).abs().max() < 0.02 * 80_000 / world_size
    extremes = ops.owner_of(torch.tensor([INT64_MIN, -1, 0, INT64_MAX]), world_size)
    assert ((extremes >= 0) & (extremes < world_size)).all()


@given(
    st.lists(st.lists(st.integers(INT64_MIN, INT64_MAX) | st.integers(-3, 3), max_size=6), max_size=12),
    st.integers(1, 4),
)
def test_bucketize_dedup_matches_reference(bags, world_size):
    ids = torch.tensor([v for bag in bags for v in bag], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(b) for b in bags], dtype=torch.int64).cumsum(0)
    b = ops.bucketize_dedup(ids, offsets, world_size)
    owners = ops.owner_of(ids, world_size).tolist()
    # value order: owner-major, stable
    expected_perm = [i for o in range(world_size) for i in range(len(ids)) if owners[i] == o]
    assert b.value_perm.tolist() == expected_perm
    assert b.value_counts.tolist() == [owners.count(o) for o in range(world_size)]
    u_start = 0
    v_start = 0
    for o in range(world_size):
        vals = [ids[i].item() for i in expected_perm if owners[i] == o]
        uniq = list(dict.fromkeys(vals))
        n_u = int(b.unique_counts[o])
        assert b.unique_ids[u_start : u_start + n_u].tolist() == uniq
        inv = b.inverse[v_start : v_start + len(vals)].tolist()
        assert [uniq[j] for j in inv] == vals
        u_start += n_u
        v_start += len(vals)
        for q, bag in enumerate(bags):
            assert int(b.bag_lengths[o, q]) == sum(ops.owner_of(torch.tensor(bag, dtype=torch.int64), world_size).eq(o).tolist()) if bag else int(b.bag_lengths[o, q]) == 0


def test_bucketize_dedup_rejects_bad_offsets():
    with pytest.raises(RuntimeError, match="offsets must run from 0"):
        ops.bucketize_dedup(torch.tensor([1, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(RuntimeError, match="world_size must be >= 1"):
        ops.bucketize_dedup(torch.tensor([1]), torch.tensor([0, 1]), 0)


def test_opcheck_sharding_ops():
    ids = torch.tensor([5, -1, 5, 7, 2**62, 0], dtype=torch.int64)
    torch.library.opcheck(torch.ops.recis.owner_of.default, (ids, 3))
    torch.library.opcheck(torch.ops.recis.bucketize_dedup.default, (ids, torch.tensor([0, 2, 2, 6]), 3))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=0, max_size=60),
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=0, max_value=4),
    st.randoms(use_true_random=False),
)
def test_torch_bucketing_for_gpus_makes_the_same_buckets(values, world_size, extra_repeats, rnd):
    """bucketize_dedup_torch (what GPU ids use) against the C++ op, on the CPU: the same owners,
    counts, value order and bag lengths; the same set of unique ids per owner (ascending instead of
    first-occurrence order) and an inverse that maps every value to its own id."""
    from recis_torchrec.ops.sharding import bucketize_dedup_torch

    values = values + [values[rnd.randrange(len(values))] for _ in range(extra_repeats)] if values else values
    ids = torch.tensor(values, dtype=torch.int64)
    cuts = sorted(rnd.randrange(len(values) + 1) for _ in range(3))
    offsets = torch.tensor([0, *cuts, len(values)], dtype=torch.int64)
    want = ops.bucketize_dedup(ids, offsets, world_size)
    got = bucketize_dedup_torch(ids, offsets, world_size)
    for name in ("unique_counts", "value_counts", "value_perm", "bag_lengths"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.inverse.dtype == torch.int32
    for o, (a, b) in enumerate(zip(got.unique_ids.split(got.unique_counts.tolist()),
                                   want.unique_ids.split(want.unique_counts.tolist()))):
        assert torch.equal(a, torch.sort(b).values), o
    # Rebuild each owner's values from the uniques and the inverse.
    per_owner_values = ids[got.value_perm].split(got.value_counts.tolist())
    inverse = got.inverse.split(got.value_counts.tolist())
    uniques = got.unique_ids.split(got.unique_counts.tolist())
    for v, inv, u in zip(per_owner_values, inverse, uniques):
        assert torch.equal(u[inv.long()], v)


def test_owner_of_is_pinned_and_independent_of_the_id_map():
    """Fixed values: a change of the owner hash moves every id to another rank (a checkpoint then
    loads rows onto ranks that do not own them); the owner does not depend on any table."""
    from recis_torchrec import HashTable

    ids = torch.tensor([0, 1, 2, 3, 12345, -1, 2**62, -(2**63), 2**63 - 1])
    first = ops.owner_of(ids, 8).tolist()
    t = HashTable("x", 4)
    t.find_or_insert(torch.arange(100_000))  # a table of any size, with the IdMap grown
    assert ops.owner_of(ids, 8).tolist() == first
    for world in (2, 3, 8):
        owners = ops.owner_of(torch.arange(100_000), world)
        counts = torch.bincount(owners, minlength=world).float()
        assert (counts / counts.mean() - 1).abs().max() < 0.05, world  # balanced
    assert first == [_reference_owner(int(i), 8) for i in ids], first
    assert first == [1, 2, 0, 2, 5, 5, 6, 4, 7]


def _reference_owner(key: int, world: int) -> int:
    """The owner in plain Python: MurmurHash3's fmix64 of the salted id, reduced by multiply-shift."""
    m = 2**64 - 1
    k = (key & m) ^ 0x5851F42D4C957F2D
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & m
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & m
    k ^= k >> 33
    return (k * world) >> 64


def test_owner_of_matches_the_reference_on_random_ids():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(-(2**63), 2**63 - 1, (2000,), generator=g)
    for world in (2, 3, 7, 64):
        assert ops.owner_of(ids, world).tolist() == [_reference_owner(int(i), world) for i in ids], world
