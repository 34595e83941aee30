# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""find / find_or_insert / export / import against a Python dict reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis_torchrec import HashTable, HashTableOptions, ops

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def make_table(dim=4, name="t", block_rows=16, **kw):
    return HashTable(name, dim, 0, HashTableOptions(block_rows=block_rows, **kw), num_embeddings=8)


def test_full_int64_range_and_duplicates():
    t = make_table()
    ids = torch.tensor([INT64_MIN, -1, 0, 1, INT64_MAX, 0, INT64_MIN, -1], dtype=torch.int64)
    assert (ops.find(t, ids) == -1).all()
    rows = ops.find_or_insert(t, ids)
    assert len(t) == 5
    assert rows[5] == rows[2] and rows[6] == rows[0] and rows[7] == rows[1]
    assert len(set(rows[:5].tolist())) == 5
    assert torch.equal(ops.find(t, ids), rows)
    exported_ids, weights, state = t.export()
    assert sorted(exported_ids.tolist()) == sorted(set(ids.tolist()))
    assert weights.shape == (5, 4) and state.shape == (5, 0)


@given(st.lists(st.integers(INT64_MIN, INT64_MAX), max_size=300), st.integers(1, 4))
def test_matches_dict_reference(keys, chunks):
    t = make_table()
    reference = {}
    ids = torch.tensor(keys, dtype=torch.int64)
    for part in torch.tensor_split(ids, chunks):
        rows = ops.find_or_insert(t, part)
        for k, r in zip(part.tolist(), rows.tolist()):
            assert reference.setdefault(k, r) == r
    assert len(t) == len(reference)
    assert sorted(reference.values()) == list(range(len(reference)))


def test_initialisation_is_per_id_and_order_free():
    ids = torch.randint(INT64_MIN, INT64_MAX, (5000,), dtype=torch.int64)
    a, b = make_table(dim=8, name="emb"), make_table(dim=8, name="emb", block_rows=1024)
    ops.find_or_insert(a, ids)
    for part in torch.tensor_split(ids.flip(0), 7):  # other order, other batches
        ops.find_or_insert(b, part)
    assert torch.equal(a.lookup(ids), b.lookup(ids))
    # Another table name (or seed) gives other rows.
    c = make_table(dim=8, name="other")
    ops.find_or_insert(c, ids)
    assert not torch.equal(a.lookup(ids), c.lookup(ids))


@pytest.mark.parametrize(
    "opts, check",
    [
        (dict(initializer="uniform", init_min=-0.5, init_max=0.25), lambda w: w.min() >= -0.5 and w.max() <= 0.25),
        (dict(initializer="normal", init_mean=1.0, init_std=0.1), lambda w: abs(w.mean() - 1) < 0.01),
        (dict(initializer="truncated_normal", init_std=0.1), lambda w: w.abs().max() <= 0.2 + 1e-6),
        (dict(initializer="constant", init_value=0.5), lambda w: (w == 0.5).all()),
    ],
)
def test_initializers(opts, check):
    t = make_table(dim=16, **opts)
    ids = torch.arange(4000, dtype=torch.int64)
    w = t.lookup(ids)
    assert check(w)
    if opts["initializer"] == "normal":
        assert abs(w.std() - 0.1) < 0.01
    if opts["initializer"] == "uniform":
        # Uniform: mean in the middle of the range, all of it used.
        assert abs(w.mean() - (-0.125)) < 0.01 and w.min() < -0.49 and w.max() > 0.24


def test_growth_keeps_rows_in_place():
    t = make_table(dim=4, block_rows=16)
    first = torch.arange(10, dtype=torch.int64)
    ops.find_or_insert(t, first)
    t.import_(first, torch.full((10, 4), 3.0))
    before = t.lookup(first)
    ops.find_or_insert(t, torch.arange(10, 100_000, dtype=torch.int64))  # thousands of blocks, rehashes
    assert len(t) == 100_000
    assert torch.equal(t.lookup(first), before)
    info = t.info()
    assert info["capacity"] >= 100_000 and info["num_blocks"] == info["capacity"] // 16
    assert info["memory_bytes"] >= 100_000 * (16 + 8 + 16 + 16)  # rows (stride 16) + ids + metadata + IdMap slots


def test_segments_route_to_tables():
    a, b = make_table(name="a"), make_table(name="b")
    ids = torch.tensor([1, 2, 3, 1, 2], dtype=torch.int64)
    rows = ops.find_or_insert([a, None, b], ids, torch.tensor([0, 2, 3, 5]))
    assert rows[2] == -1
    assert len(a) == 2 and len(b) == 2
    assert torch.equal(ops.find(a, torch.tensor([1, 2])), rows[:2])
    assert torch.equal(ops.find(b, torch.tensor([1, 2])), rows[3:])


def test_import_export_round_trip_with_state():
    t = HashTable("s", 3, 2, HashTableOptions(block_rows=16))
    ids = torch.tensor([7, -7, 2**62], dtype=torch.int64)
    w, s = torch.randn(3, 3), torch.randn(3, 2)
    t.import_(ids, w, s)
    e_ids, e_w, e_s = t.export()
    order = torch.argsort(e_ids)
    ref = torch.argsort(ids)
    assert torch.equal(e_ids[order], ids[ref])
    assert torch.equal(e_w[order], w[ref]) and torch.equal(e_s[order], s[ref])
    t.import_(ids[:1], None, torch.zeros(1, 2))  # state only: weights kept
    assert torch.equal(t.lookup(ids[:1]), w[:1])


def test_bad_arguments_raise_clear_errors():
    t = make_table()
    with pytest.raises(RuntimeError, match="ids must have dtype Long"):
        ops.find(t, torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="ids must be 1-D"):
        ops.find_or_insert(t, torch.tensor([[1, 2]]))
    with pytest.raises(RuntimeError, match="segment_offsets must have len"):
        ops.find([t, t], torch.tensor([1, 2]), torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="segment_offsets must run from 0"):
        ops.find([t], torch.tensor([1, 2]), torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="unknown hash table handle"):
        ops.find(10**9, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="ids must be distinct"):
        t.import_(torch.tensor([1, 1]), torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match=r"weights must have shape \(2, 4\)"):
        t.import_(torch.tensor([1, 2]), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="block_rows must be a power of two"):
        HashTableOptions(block_rows=100)
    with pytest.raises(ValueError, match="max_capacity needs eviction_policy"):
        HashTableOptions(max_capacity=10)
    with pytest.raises(ValueError, match="ttl_steps must be > 0"):
        HashTableOptions(ttl_steps=0)


def test_released_table_handle_is_rejected():
    t = make_table()
    handle = t.handle
    del t
    with pytest.raises(RuntimeError, match="unknown hash table handle"):
        ops.find(handle, torch.tensor([1]))


def test_copy_and_pickle_copy_rows():
    import copy
    import pickle

    t = HashTable("p", 4, 1, HashTableOptions(block_rows=16))
    ids = torch.arange(50, dtype=torch.int64) * 7919
    t.import_(ids, torch.randn(50, 4), torch.rand(50, 1))
    for clone in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        assert clone.handle != t.handle
        (ca, cw, cs), (ta, tw, ts) = clone.export(), t.export()
        oc, ot = torch.argsort(ca), torch.argsort(ta)
        assert torch.equal(ca[oc], ta[ot]) and torch.equal(cw[oc], tw[ot]) and torch.equal(cs[oc], ts[ot])


def test_options_round_trip():
    o = HashTableOptions(initializer="normal", init_std=0.2, seed=3, block_rows=64)
    assert HashTableOptions.from_dict(o.to_dict()) == o
    with pytest.raises(ValueError, match="unknown fields"):
        HashTableOptions.from_dict({"bogus": 1})


@pytest.mark.parametrize("insert", [False, True])
def test_opcheck(insert):
    t = make_table()
    ops.find_or_insert(t, torch.tensor([3, 4], dtype=torch.int64))
    op = torch.ops.recis.find_or_insert.default if insert else torch.ops.recis.find.default
    ids = torch.tensor([3, 5, -9, 3, 4], dtype=torch.int64)
    torch.library.opcheck(op, ([t.handle, -1], ids, torch.tensor([0, 3, 5])))


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "erase"]),
            st.integers(0, 3000),  # first key
            st.integers(1, 1000),  # how many keys
            st.integers(1, 5),  # every stride-th key of them
        ),
        max_size=10,
    ),
    st.sampled_from([0, 1 << 40, INT64_MIN]),
)
def test_insert_erase_find_match_dict_reference(steps, offset):
    # Keys from a pool of 4,000, so that erased keys come back and the shards'
    # buckets fill, overflow and empty again (erase must keep every later key
    # findable).
    t = make_table()
    reference = {}
    pool = torch.arange(offset, offset + 4000, dtype=torch.int64)
    for op, first, count, stride in steps:
        ids = pool[first : first + count : stride]
        if op == "insert":
            rows = ops.find_or_insert(t, ids)
            for k, r in zip(ids.tolist(), rows.tolist()):
                assert reference.setdefault(k, r) == r
        else:
            assert t.erase(ids) == sum(k in reference for k in ids.tolist())
            for k in ids.tolist():
                reference.pop(k, None)
        assert ops.find(t, pool).tolist() == [reference.get(k, -1) for k in pool.tolist()]
    assert len(t) == len(reference)


def test_erase_half_of_a_loaded_map_keeps_the_rest():
    # 200k keys in one table (shards near their 0.7 load, long overflow runs),
    # every other one erased in random order, then re-inserted.
    t = make_table(dim=1, block_rows=1 << 14)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(INT64_MIN, INT64_MAX, (200_000,), generator=gen, dtype=torch.int64).unique()
    rows = ops.find_or_insert(t, ids)
    gone = ids[torch.randperm(len(ids), generator=gen)[: len(ids) // 2]]
    assert t.erase(gone) == len(gone)
    found = ops.find(t, ids)
    kept = ~torch.isin(ids, gone)
    assert torch.equal(found[kept], rows[kept])
    assert (found[~kept] == -1).all()
    assert len(t) == int(kept.sum())
    again = ops.find_or_insert(t, gone)
    assert (again >= 0).all() and len(t) == len(ids)
    assert torch.equal(ops.find(t, ids)[kept], rows[kept])


@pytest.mark.parametrize("dim,state_dim", [(1, 0), (8, 0), (64, 1), (37, 74)])
def test_memory_breakdown_adds_up_and_float_rows_are_not_padded(dim, state_dim):
    """info()['memory'] splits memory_bytes() by what holds it; each live float32 row costs its
    elements, its state (no padding), its id and its metadata."""
    t = HashTable("m", dim, state_dim, HashTableOptions(block_rows=64), num_embeddings=8)
    n = 1000
    ops.find_or_insert(t, torch.arange(n, dtype=torch.int64) * 7919)
    info = t.info()
    m = info["memory"]
    assert sum(m.values()) == info["memory_bytes"]
    assert info["row_bytes"] == 4 * (dim + state_dim)
    assert m["embedding"] == n * dim * 4 and m["optimizer_state"] == n * state_dim * 4
    assert m["row_padding"] == 0
    assert m["ids"] == n * 8 and m["metadata"] == n * 16
    assert m["block_slack"] == (info["capacity"] - n) * (info["row_bytes"] + 8 + 16)
    assert m["spare_blocks"] % (64 * (info["row_bytes"] + 8 + 16)) == 0  # whole blocks prepared ahead of growth
    assert m["id_map"] > 16 * n and m["other"] >= 0


def test_row_metadata_is_16_bytes_and_a_clock_32_bits_cannot_hold_raises_before_writing():
    """Row metadata keeps its clocks and counts in 32 bits (16 bytes a row, from 24). A restored clock or
    count outside [0, 2^32 - 1] raises, naming the field, and writes no row; the largest one round-trips."""
    t = HashTable("meta32", 4, 0, HashTableOptions(block_rows=16), num_embeddings=8)
    ids = torch.tensor([3, 5], dtype=torch.int64)
    top = 2**32 - 1
    t.import_(ids, torch.ones(2, 4), meta=torch.tensor([[top - 1, top, top], [0, 1, 7]], dtype=torch.int64))
    out_ids, _, _, meta = t.export_rows()
    assert out_ids.tolist() == [3, 5] and meta.tolist() == [[top - 1, top, top], [0, 1, 7]]
    assert t.info()["memory"]["metadata"] == 2 * 16
    for bad, field in (([[2**32, 1, 1]], "last_seen 4294967296"), ([[1, -1, 1]], "last_update -1"),
                       ([[1, 1, 2**40]], "freq 1099511627776")):
        with pytest.raises(ValueError, match=field):
            t.import_(torch.tensor([9]), torch.ones(1, 4), meta=torch.tensor(bad, dtype=torch.int64))
        assert len(t) == 2 and int(ops.find(t, torch.tensor([9]))[0]) == -1
    # A step whose clock the metadata cannot hold raises before a row is inserted.
    with pytest.raises(ValueError, match="clock 4294967296"):
        ops.find_or_insert(t, torch.tensor([11, 12]), clock=2**32 - 1)
    assert len(t) == 2
