# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The fused feature ops against per-feature torch references, with edge cases and opcheck."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis_torchrec import ops
from recis_torchrec.testing import feature_reference as ref

INT64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def jagged(draw, max_features=4, max_batch=6, max_len=5, weighted=None):
    """A KJT-layout input: (values, lengths, weights or None, num_features, batch)."""
    F = draw(st.integers(1, max_features))
    B = draw(st.integers(0, max_batch))
    long_bag = draw(st.booleans())
    lengths = [draw(st.integers(0, max_len)) for _ in range(F * B)]
    if long_bag and lengths:
        lengths[draw(st.integers(0, len(lengths) - 1))] = 300  # a very long sequence
    n = sum(lengths)
    values = draw(st.lists(INT64, min_size=n, max_size=n)) if n < 50 else np.random.default_rng(n).integers(
        -(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True).tolist()
    w = draw(st.booleans()) if weighted is None else weighted
    weights = torch.rand(n) if w else None
    return torch.tensor(values, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64), weights, F, B


def split(values, lengths, weights, F, B):
    """Per feature (values, lengths, weights)."""
    per = lengths.view(F, B).sum(1).tolist() if B else [0] * F
    vs = torch.split(values, per)
    ws = torch.split(weights, per) if weights is not None else [None] * F
    return [(vs[f], lengths[f * B : (f + 1) * B], ws[f]) for f in range(F)]


def joined(parts):
    v = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
    l = torch.cat([p[1] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
    w = None if not parts or parts[0][2] is None else torch.cat([p[2] for p in parts])
    return v, l, w


def assert_same(got, want):
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[2] is None) == (want[2] is None)
    if want[2] is not None:
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


def test_hash_is_pinned():
    """Known values: the id hash must never drift between versions (ids in saved tables depend on it)."""
    x = torch.tensor([0, 1, -1, 2**63 - 1, 123456789])
    got = ops.feature_hash(x, torch.tensor([5]), None, 1, [0], [0], [0])[0].tolist()
    assert got == [3803688792395291579, -6977822845260490347, -8804195676797548855, -40307683044198644,
                   -3784104224768917427]
    assert 3803688792395291579 == 0x34C96ACDCADB1BBB  # XXH64 of eight zero bytes, seed 0
    salted = ops.feature_hash(x, torch.tensor([5]), None, 1, [0], [42], [0])[0].tolist()
    assert salted == [-5252525462095825812, -7001672635703045582, 3858142552250413010, -3246596055638297850,
                      3415128141240069951]
    pair = ops.feature_cross(torch.tensor([1, 2]), torch.tensor([1, 1]), None, 2, [0], [1], [0], [0])[0].tolist()
    assert pair == [5411092459628516524]


@given(INT64, st.integers(0, 2**63 - 1))
def test_hashes_are_xxh64_of_the_bytes(x, seed):
    """The id hash is XXH64 over the id's 8 bytes, the cross hash over 16: the loader's string hash family."""
    ids = torch.tensor([x, x ^ 1])
    data = torch.from_numpy(np.frombuffer(ids.numpy().tobytes(), dtype=np.uint8).copy())
    want = ops.hash_strings(data, torch.tensor([0, 8, 16]), seed)
    got = ops.feature_hash(ids, torch.tensor([2]), None, 1, [0], [seed], [0])[0]
    assert torch.equal(got, want)
    pair = ops.feature_cross(ids, torch.tensor([1, 1]), None, 2, [0], [1], [seed], [0])[0]
    assert torch.equal(pair, ops.hash_strings(data, torch.tensor([0, 16]), seed))
    assert torch.equal(ref.hash_ids(ids, seed), want)


@given(jagged(), st.data())
def test_hash_and_mod_match_reference(inp, data):
    values, lengths, weights, F, B = inp
    feats = data.draw(st.lists(st.integers(0, F - 1), min_size=1, max_size=5))
    salts = [data.draw(st.integers(0, 2**63 - 1)) for _ in feats]
    moduli = [data.draw(st.sampled_from([0, 1, 7, 2**40, 2**63 - 1])) for _ in feats]
    parts = split(values, lengths, weights, F, B)
    want = joined([(ref.umod(ref.hash_ids(parts[f][0], s), m), parts[f][1], parts[f][2])
                   for f, s, m in zip(feats, salts, moduli)])
    assert_same(ops.feature_hash(values, lengths, weights, F, feats, salts, moduli), want)
    pos = [m or 3 for m in moduli]
    want = joined([(ref.umod(parts[f][0], m), parts[f][1], parts[f][2]) for f, m in zip(feats, pos)])
    got = ops.feature_mod(values, lengths, weights, F, feats, pos)
    assert_same(got, want)
    # Unsigned: a negative id's residue is that of its 64-bit pattern.
    for v, r in zip(parts[feats[0]][0].tolist()[:20], got[0].tolist()):
        assert r == (v % 2**64) % pos[0]


@given(jagged(), st.data())
def test_multi_hash_matches_reference(inp, data):
    values, lengths, weights, F, B = inp
    feats = data.draw(st.lists(st.integers(0, F - 1), min_size=1, max_size=3))
    k = data.draw(st.integers(1, 3))
    salts = [data.draw(st.integers(0, 2**62)) for _ in feats]
    parts = split(values, lengths, weights, F, B)
    want = joined([(ref.umod(ref.hash_ids(parts[f][0], (s + r * ref.SEED_STEP) % 2**64), 1000), parts[f][1],
                    parts[f][2]) for f, s in zip(feats, salts) for r in range(k)])
    assert_same(ops.feature_multi_hash(values, lengths, weights, F, feats, salts, [1000] * len(feats), k), want)
    # Hash 0 is the plain hash.
    h0 = ops.feature_multi_hash(values, lengths, None, F, feats[:1], salts[:1], [0], k)[0]
    plain = ops.feature_hash(values, lengths, None, F, feats[:1], salts[:1], [0])[0]
    assert torch.equal(h0[: plain.numel()], plain)


@given(jagged(max_len=8), st.data())
def test_truncate_matches_reference(inp, data):
    values, lengths, weights, F, B = inp
    feats = data.draw(st.lists(st.integers(0, F - 1), min_size=1, max_size=4))
    sizes = [data.draw(st.integers(1, 6)) for _ in feats]
    ends = [data.draw(st.integers(0, 1)) for _ in feats]
    parts = split(values, lengths, weights, F, B)
    want = joined([ref.truncate(*parts[f], n, bool(e)) for f, n, e in zip(feats, sizes, ends)])
    assert_same(ops.feature_truncate(values, lengths, weights, F, feats, sizes, ends), want)


def test_truncate_keeps_the_first_or_last_ids():
    v, l = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([4, 0, 2])
    assert ops.feature_truncate(v, l, None, 1, [0], [2], [0])[0].tolist() == [1, 2, 5, 6]
    assert ops.feature_truncate(v, l, None, 1, [0], [2], [1])[0].tolist() == [3, 4, 5, 6]
    assert ops.feature_truncate(v, l, None, 1, [0], [2], [1])[1].tolist() == [2, 0, 2]


@given(jagged(max_features=3, max_len=4), st.data())
def test_cross_matches_reference(inp, data):
    values, lengths, weights, F, B = inp
    P = data.draw(st.integers(1, 3))
    left = [data.draw(st.integers(0, F - 1)) for _ in range(P)]
    right = [data.draw(st.integers(0, F - 1)) for _ in range(P)]
    salts = [data.draw(st.integers(0, 2**63 - 1)) for _ in range(P)]
    moduli = [data.draw(st.sampled_from([0, 97])) for _ in range(P)]
    parts = split(values, lengths, weights, F, B)
    want = []
    for a, b, s, m in zip(left, right, salts, moduli):
        v, l, w = ref.cross(*parts[a], *parts[b], s)
        want.append((ref.umod(v, m), l, w))
    assert_same(ops.feature_cross(values, lengths, weights, F, left, right, salts, moduli), joined(want))


def test_cross_is_the_cartesian_product_a_outer():
    v = torch.tensor([1, 2, 10, 20, 30])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out, lens, ws = ops.feature_cross(v, torch.tensor([2, 3]), w, 2, [0], [1], [0], [0])
    pairs = [(a, b) for a in (1, 2) for b in (10, 20, 30)]
    want = [ref.hash_pairs(torch.tensor([a]), torch.tensor([b]), 0).item() for a, b in pairs]
    assert out.tolist() == want and lens.tolist() == [6]
    assert ws.tolist() == [wa * wb for wa in (1.0, 2.0) for wb in (3.0, 4.0, 5.0)]
    # An empty bag crossed with anything is empty.
    out, lens, _ = ops.feature_cross(torch.tensor([1, 2]), torch.tensor([2, 0]), None, 2, [0], [1], [0], [0])
    assert out.numel() == 0 and lens.tolist() == [0]


FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@given(st.integers(0, 8), st.data())
def test_bucketize_matches_torch_with_duplicates_nan_and_inf(batch, data):
    D = data.draw(st.integers(1, 3))
    dense = torch.tensor([[data.draw(FLOATS) for _ in range(D)] for _ in range(batch)], dtype=torch.float32)
    dense = dense.reshape(batch, D)
    cols = data.draw(st.lists(st.integers(0, D - 1), min_size=1, max_size=4))
    bounds = [sorted(data.draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 0.5, 1.0, 3.0]), max_size=5)))
              for _ in cols]
    flat = torch.tensor([b for bs in bounds for b in bs], dtype=torch.float32)
    offs = [0]
    for bs in bounds:
        offs.append(offs[-1] + len(bs))
    got, lens = ops.feature_bucketize(dense, cols, flat, offs)
    want = torch.cat([ref.bucketize(dense[:, c], bs) for c, bs in zip(cols, bounds)]) if batch else got
    assert torch.equal(got, want) and lens.tolist() == [1] * (batch * len(cols))


def test_bucketize_boundaries_and_nan():
    dense = torch.tensor([[-5.0], [1.0], [1.5], [2.0], [9.0], [math.nan], [math.inf]])
    got = ops.feature_bucketize(dense, [0], torch.tensor([1.0, 2.0, 2.0]), [0, 3])[0].tolist()
    # b <= x counts; duplicates make bucket 2 empty; NaN gets bucket len + 1 = 4.
    assert got == [0, 1, 1, 3, 3, 4, 3]


def test_empty_batch_and_single_feature():
    empty = torch.empty(0, dtype=torch.int64)
    v, l, w = ops.feature_hash(empty, empty, None, 3, [2, 0], [1, 2], [0, 5])
    assert v.numel() == 0 and l.numel() == 0 and w is None
    v, l, _ = ops.feature_cross(empty, empty, None, 2, [0], [1], [0], [0])
    assert v.numel() == 0 and l.numel() == 0
    v, l, _ = ops.feature_truncate(torch.tensor([5]), torch.tensor([1]), None, 1, [0], [3], [1])
    assert v.tolist() == [5] and l.tolist() == [1]


def test_bad_inputs_name_the_argument():
    v, l = torch.tensor([1, 2, 3]), torch.tensor([1, 1])
    with pytest.raises(RuntimeError, match="lengths sum to 2 but there are 3 values"):
        ops.feature_hash(v, l, None, 1, [0], [0], [0])
    with pytest.raises(RuntimeError, match="negative length"):
        ops.feature_hash(v, torch.tensor([4, -1]), None, 1, [0], [0], [0])
    with pytest.raises(RuntimeError, match="feature index 2 is out of range for 2 features"):
        ops.feature_hash(v[:2], l, None, 2, [2], [0], [0])
    with pytest.raises(RuntimeError, match="moduli must be > 0"):
        ops.feature_mod(v[:2], l, None, 1, [0], [0])
    with pytest.raises(RuntimeError, match="max_lengths must be > 0"):
        ops.feature_truncate(v[:2], l, None, 1, [0], [0], [0])
    with pytest.raises(RuntimeError, match="salts has 2 entries"):
        ops.feature_hash(v[:2], l, None, 1, [0], [0, 1], [0])
    with pytest.raises(RuntimeError, match="values must have dtype Long"):
        ops.feature_hash(v[:2].float(), l, None, 1, [0], [0], [0])
    with pytest.raises(RuntimeError, match="weights has 1 entries"):
        ops.feature_hash(v[:2], l, torch.ones(1), 1, [0], [0], [0])
    with pytest.raises(RuntimeError, match="must be sorted"):
        ops.feature_bucketize(torch.zeros(2, 1), [0], torch.tensor([2.0, 1.0]), [0, 2])
    with pytest.raises(RuntimeError, match="column 3 is out of range"):
        ops.feature_bucketize(torch.zeros(2, 1), [3], torch.tensor([1.0]), [0, 1])


def test_opcheck_every_op():
    v, l, w = torch.tensor([1, -2, 3, 4, 5]), torch.tensor([2, 0, 1, 2]), torch.rand(5)
    cases = [
        (torch.ops.recis.feature_hash.default, (v, l, w, 2, [1, 0], [3, 0], [0, 10])),
        (torch.ops.recis.feature_mod.default, (v, l, None, 2, [0], [7])),
        (torch.ops.recis.feature_multi_hash.default, (v, l, w, 2, [0, 1], [1, 2], [0, 0], 3)),
        (torch.ops.recis.feature_truncate.default, (v, l, w, 2, [1], [1], [1])),
        (torch.ops.recis.feature_cross.default, (v, l, w, 2, [0], [1], [5], [0])),
        (torch.ops.recis.feature_concat.default,
         ([v, torch.tensor([7, 8])], [l, torch.tensor([1, 1])], [w, torch.ones(2)], 2, [1, 0, 0], [0, 1, 0])),
        (torch.ops.recis.feature_bucketize.default,
         (torch.tensor([[0.5, 2.0], [math.nan, -1.0]]), [1, 0], torch.tensor([0.0, 1.0, 1.5]), [0, 2, 3])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_concat_picks_features_from_several_buffers():
    a = (torch.tensor([1, 2, 3]), torch.tensor([2, 0, 1, 0]), torch.tensor([0.1, 0.2, 0.3]))  # 2 features, B=2
    b = (torch.tensor([9, 8, 7]), torch.tensor([1, 2]), torch.tensor([0.9, 0.8, 0.7]))  # 1 feature
    v, l, w = ops.feature_concat([a[0], b[0]], [a[1], b[1]], [a[2], b[2]], 2, [1, 0, 0], [0, 1, 0])
    assert v.tolist() == [9, 8, 7, 3, 1, 2] and l.tolist() == [1, 2, 1, 0, 2, 0]
    torch.testing.assert_close(w, torch.tensor([0.9, 0.8, 0.7, 0.3, 0.1, 0.2]))
    v, l, w = ops.feature_concat([a[0]], [a[1]], [], 2, [0], [1])
    assert v.tolist() == [3] and l.tolist() == [1, 0] and w is None
    with pytest.raises(RuntimeError, match="lengths sum to 3 but it has 2 values"):
        ops.feature_concat([a[0][:2]], [a[1]], [], 2, [0], [0])


@pytest.mark.parametrize("n", [65, 100, 1000])
def test_bucketize_with_more_than_64_boundaries_takes_the_binary_search(n):
    """Past 64 boundaries the kernel binary-searches (the count below runs only up to 64)."""
    g = torch.Generator().manual_seed(n)
    bounds = torch.sort(torch.randn(n, generator=g) * 10).values
    bounds[n // 2] = bounds[n // 2 + 1]  # a duplicate
    dense = torch.cat([torch.randn(500, 1, generator=g) * 12, bounds[:, None], torch.tensor([[math.nan], [math.inf],
                                                                                               [-math.inf]])])
    got = ops.feature_bucketize(dense, [0], bounds, [0, n])[0]
    want = ref.bucketize(dense[:, 0], bounds.tolist())
    assert torch.equal(got, want)


def program_of(*outputs):
    """A feature_program: each output is (source, a, b, c, d, truncations, steps)."""
    prog = [len(outputs)]
    for source, a, b, c, d, cuts, steps in outputs:
        prog += [source, a, b, c, d, len(cuts), *[x for t in cuts for x in t], len(steps),
                 *[x for s in steps for x in s]]
    return prog


def test_program_bad_inputs_name_the_output_and_argument():
    v, l = torch.tensor([1, 2, 3]), torch.tensor([2, 1])  # 2 features, B=1
    none = torch.empty(0)
    dense = torch.zeros(1, 2)
    bounds = torch.tensor([1.0, 2.0, 0.5])
    cases = [
        (program_of((3, 0, 0, 0, 0, [], [])), None, "output 0 has an unknown source kind 3"),
        (program_of((0, 2, 0, 0, 0, [], [])), None, "input feature index 2 is out of range for 2 features"),
        (program_of((1, 0, 5, 0, 0, [], [])), None, "input feature index 5 is out of range"),
        (program_of((1, 0, 1, 0, -1, [], [])), None, "a cross's modulus must be >= 0"),
        (program_of((2, 0, 0, 1, 0, [], [])), None, "output 0 bucketizes a dense column, but no dense input"),
        (program_of((2, 2, 0, 1, 0, [], [])), dense, "dense column 2 is out of range for 2 columns"),
        (program_of((2, 0, 0, 4, 0, [], [])), dense, r"boundaries \[0, 4\) are out of range for 3"),
        (program_of((2, 1, 1, 3, 0, [], [])), dense, "boundaries of column 1 must be sorted"),
        (program_of((0, 0, 0, 0, 0, [(0, 0)], [])), None, "output 0: max_length must be > 0, got 0"),
        (program_of((0, 0, 0, 0, 0, [], []), (0, 1, 0, 0, 0, [(2, 2)], [])), None, "output 1: a truncation's side"),
        (program_of((0, 0, 0, 0, 0, [], [(2, 0, 5)])), None, "output 0 has an unknown step kind 2"),
        (program_of((0, 0, 0, 0, 0, [], [(1, 0, 0)])), None, "modulus 0 must be > 0"),
        (program_of((0, 0, 0, 0, 0, [], [(0, 3, -5)])), None, r"modulus -5 must be >= 0 \(0: none\)"),
        (program_of((0, 0, 0, 0, 0, [], []))[:-1], None, r"the program ends early, in output 0 \(step count\)"),
        (program_of((0, 0, 0, 0, 0, [], [])) + [7], None, "1 entries after its 1 outputs"),
        ([-1], None, "output count must be >= 0"),
    ]
    for prog, d, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.feature_program(v, l, None, 2, d, bounds, prog)
    with pytest.raises(RuntimeError, match="dense has 3 rows but the batch size is 1"):
        ops.feature_program(v, l, None, 2, torch.zeros(3, 1), none, program_of((0, 0, 0, 0, 0, [], [])))
    with pytest.raises(RuntimeError, match="lengths sum to 3 but there are 2 values"):
        ops.feature_program(v[:2], l, None, 2, None, none, program_of((0, 0, 0, 0, 0, [], [])))


def test_program_equals_the_single_ops():
    """Each source and step of a program against the single op that does the same."""
    g = torch.Generator().manual_seed(3)
    F, B = 3, 2500  # more samples than a bucketize tile
    lengths = torch.randint(0, 4, (F * B,), generator=g)
    v = torch.randint(-(2**63), 2**63 - 1, (int(lengths.sum()),), generator=g)
    w = torch.rand(v.numel(), generator=g)
    dense = torch.randn(B, 2, generator=g) * 10
    dense[::7, 1] = math.nan
    dense[::11, 0] = math.inf
    many = torch.sort(torch.randn(80, generator=g) * 10).values  # past 64: the binary search
    bounds = torch.cat([torch.tensor([-1.0, 0.0, 0.0, 3.0]), many])
    prog = program_of(
        (0, 2, 0, 0, 0, [], [(0, 7, 1000), (1, 0, 2**20)]),
        (0, 1, 0, 0, 0, [(2, 1)], []),
        (1, 0, 2, 9, 2**30, [], []),
        (2, 1, 0, 4, 0, [], [(1, 0, 3)]),
        (2, 0, 4, 84, 0, [], []),
    )
    got = ops.feature_program(v, lengths, w, F, dense, bounds, prog)
    hashed = ops.feature_mod(*ops.feature_hash(v, lengths, w, F, [2], [7], [1000]), 1, [0], [2**20])
    cut = ops.feature_truncate(v, lengths, w, F, [1], [2], [1])
    crossed = ops.feature_cross(v, lengths, w, F, [0], [2], [9], [2**30])
    b_small = ops.feature_mod(*ops.feature_bucketize(dense, [1], bounds[:4], [0, 4]), None, 1, [0], [3])[:2]
    b_many = ops.feature_bucketize(dense, [0], many, [0, 80])
    want_v = torch.cat([hashed[0], cut[0], crossed[0], b_small[0], b_many[0]])
    want_l = torch.cat([hashed[1], cut[1], crossed[1], b_small[1], b_many[1]])
    want_w = torch.cat([hashed[2], cut[2], crossed[2], torch.ones(2 * B)])
    assert torch.equal(got[0], want_v) and torch.equal(got[1], want_l)
    assert torch.equal(got[2], want_w)


def test_opcheck_program():
    v, l, w = torch.tensor([1, -2, 3, 4, 5]), torch.tensor([2, 0, 1, 2]), torch.rand(5)
    prog = program_of((1, 0, 1, 5, 0, [(1, 1)], [(0, 3, 10)]), (2, 0, 0, 2, 0, [], []), (0, 1, 0, 0, 0, [], []))
    torch.library.opcheck(torch.ops.recis.feature_program.default,
                          (v, l, w, 2, torch.tensor([[0.5], [math.nan]]), torch.tensor([0.0, 1.0]), prog))


@given(st.integers(1, 4), st.integers(1, 40), st.data())
def test_program_crosses_bags_of_at_most_one_id(F, B, data):
    """Crosses whose bags all hold 0 or 1 ids (Criteo's categorical features) take a branch-free loop that
    writes every bag's pair and advances only past non-empty ones: the same as the cross op, with empty
    bags at the ends of the batch (the last pairs' writes) and crosses of the last feature (reads at the
    end of the values)."""
    lengths = [data.draw(st.integers(0, 1)) for _ in range(F * B)]
    if data.draw(st.booleans()):  # empty bags at the end of the batch
        k = data.draw(st.integers(1, len(lengths)))
        lengths[-k:] = [0] * k
    lengths = torch.tensor(lengths, dtype=torch.int64)
    values = torch.from_numpy(np.random.default_rng(B).integers(-(2**63), 2**63 - 1, int(lengths.sum()),
                                                                dtype=np.int64, endpoint=True))
    pairs = [(data.draw(st.integers(0, F - 1)), data.draw(st.integers(0, F - 1))) for _ in range(3)]
    pairs.append((F - 1, F - 1))
    mods = [data.draw(st.sampled_from([0, 97, 2**20])) for _ in pairs]
    prog = program_of(*[(1, a, b, 11 * i, m, [], [(0, 5, 0)]) for i, ((a, b), m) in enumerate(zip(pairs, mods))])
    got = ops.feature_program(values, lengths, None, F, None, torch.empty(0), prog)
    crossed = ops.feature_cross(values, lengths, None, F, [a for a, _ in pairs], [b for _, b in pairs],
                                [11 * i for i in range(len(pairs))], mods)
    want = ops.feature_hash(*crossed, len(pairs), range(len(pairs)), [5] * len(pairs), [0] * len(pairs))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] is None
