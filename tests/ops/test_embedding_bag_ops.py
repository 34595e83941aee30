# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""pooled_forward / pooled_backward / sparse_update against plain-PyTorch references."""


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis_torchrec import HashTable, HashTableOptions, ops
from recis_torchrec.ops.update_args import UpdateArgs


def update_args(optimizer, lr, eps, beta1, beta2, weight_decay, weight_decay_mode, steps, eta=0.001, momentum=0.9):
    values = dict(learning_rate=lr, eps=eps, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eta=eta,
                  momentum=momentum)
    return UpdateArgs(optimizer, values, weight_decay_mode, steps)
from recis_torchrec.optim.fused import OPTIM_ADAGRAD, OPTIM_ADAM, OPTIM_ROWWISE_ADAGRAD, OPTIM_SGD
from recis_torchrec.testing import (
    reference_adam_rows,
    reference_pooled,
    reference_pooled_backward,
    reference_rowwise_adagrad_rows,
)


def dense_weights(table):
    """The table's rows as a dense matrix indexed by row."""
    ids, w, s = table.export()
    return w, s


def make_case(batch, dims, features, max_len, weighted, seed, num_ids=50):
    """Tables with given dims, a KJT-style layout, rows from find_or_insert."""
    g = torch.Generator().manual_seed(seed)
    tables = [HashTable(f"t{i}", d, 0, HashTableOptions(block_rows=16)) for i, d in enumerate(dims)]
    feature_table = [i % len(dims) for i in range(features)]
    if features > 1:
        feature_table[-1] = -1  # a skipped (extra) key
    lengths = torch.randint(0, max_len + 1, (features * batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = torch.randint(-num_ids, num_ids, (int(lengths.sum()),), generator=g)
    seg = offsets[:: batch] if batch else torch.zeros(features + 1, dtype=torch.int64)
    rows = ops.find_or_insert([tables[t] if t >= 0 else None for t in feature_table], ids, seg.contiguous())
    cols, col = [], 0
    for t in feature_table:
        cols.append(col)
        col += dims[t] if t >= 0 else 0
    psw = torch.rand(ids.numel(), generator=g) if weighted else None
    return tables, ids, rows, offsets, psw, feature_table, cols, col


@given(
    batch=st.integers(0, 6),
    dims=st.lists(st.sampled_from([1, 4, 7, 16]), min_size=1, max_size=3),
    features=st.integers(1, 4),
    max_len=st.integers(0, 5),
    weighted=st.booleans(),
    mean=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_forward_and_backward_match_reference(batch, dims, features, max_len, weighted, mean, seed):
    tables, ids, rows, offsets, psw, ft, cols, out_dim = make_case(batch, dims, features, max_len, weighted, seed)
    modes = [ops.POOLING_MEAN if mean else ops.POOLING_SUM] * features
    out = ops.pooled_forward(tables, ids, rows, offsets, psw, ft, modes, cols, out_dim)
    dense = [dense_weights(t)[0] for t in tables]
    ref = reference_pooled(dense, rows, offsets, psw, ft, modes, cols, out_dim)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)

    grad = torch.randn(batch, out_dim)
    urows, grads = ops.pooled_backward([t.dim for t in tables], grad, rows, offsets, psw, ft, modes, cols)
    ref_rows, ref_grads = reference_pooled_backward(dense, grad, rows, offsets, psw, ft, modes, cols)
    for a, b, ga, gb in zip(urows, ref_rows, grads, ref_grads):
        assert torch.equal(a, b)
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)


def test_missing_rows_read_initial_value_without_insert():
    t = HashTable("m", 5, 0, HashTableOptions(block_rows=16))
    ids = torch.tensor([11, 12, 11], dtype=torch.int64)
    rows = ops.find(t, ids)
    assert (rows == -1).all()
    out = ops.pooled_forward([t], ids, rows, torch.tensor([0, 2, 3]), None, [0], [0], [0], 5)
    assert len(t) == 0
    ops.find_or_insert(t, ids)
    expected = t.lookup(ids)
    torch.testing.assert_close(out, torch.stack([expected[0] + expected[1], expected[2]]))


def _touch(table, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n, dtype=torch.int64) * 1000003
    rows = ops.find_or_insert(table, ids)
    table.import_(ids, torch.randn(n, table.dim, generator=g), None)
    return ids, torch.sort(rows).values


@pytest.mark.parametrize("wd_mode", [0, 1, 2])
@pytest.mark.parametrize("optimizer", [OPTIM_SGD, OPTIM_ADAGRAD, OPTIM_ROWWISE_ADAGRAD, OPTIM_ADAM])
def test_sparse_update_matches_formulas(optimizer, wd_mode):
    dim, n = 6, 20
    state_dim = {OPTIM_SGD: 0, OPTIM_ADAGRAD: dim, OPTIM_ROWWISE_ADAGRAD: 1, OPTIM_ADAM: 2 * dim}[optimizer]
    t = HashTable("u", dim, state_dim, HashTableOptions(block_rows=16))
    ids, rows = _touch(t, n, 0)
    lr, eps, b1, b2, wd = 0.05, 1e-6, 0.8, 0.95, 0.1 if wd_mode else 0.0
    _, w, s = t.export()
    w, s = w[rows], s[rows]
    for step in (1, 2, 3):
        g = torch.randn(n, dim, generator=torch.Generator().manual_seed(step))
        ops.sparse_update(t, rows, g, update_args(optimizer, lr, eps, b1, b2, wd, wd_mode, [step]))
        ge = g + wd * w if wd_mode == 1 else g
        we = w * (1 - lr * wd) if wd_mode == 2 else w
        if optimizer == OPTIM_SGD:
            w = we - lr * ge
        elif optimizer == OPTIM_ADAGRAD:
            s = s + ge * ge
            w = we - lr * ge / (s.sqrt() + eps)
        elif optimizer == OPTIM_ROWWISE_ADAGRAD:
            w, m = reference_rowwise_adagrad_rows(we, s[:, 0], ge, lr, eps)
            s = m[:, None]
        else:
            w, m, v = reference_adam_rows(we, s[:, :dim], s[:, dim:], ge, lr, b1, b2, eps, step)
            s = torch.cat([m, v], 1)
        _, w_got, s_got = t.export()
        torch.testing.assert_close(w_got[rows], w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_got[rows], s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("optimizer", [OPTIM_SGD, OPTIM_ROWWISE_ADAGRAD, OPTIM_ADAM])
def test_fused_backward_update_equals_backward_then_update(optimizer):
    dims = [4, 8]
    state = lambda d: {OPTIM_SGD: 0, OPTIM_ROWWISE_ADAGRAD: 1, OPTIM_ADAM: 2 * d}[optimizer]  # noqa: E731
    pair = []
    for _ in range(2):
        tables = [HashTable(f"t{i}", d, state(d), HashTableOptions(block_rows=16)) for i, d in enumerate(dims)]
        pair.append(tables)
    g = torch.Generator().manual_seed(3)
    batch, ft, modes, cols = 5, [0, 1, 0], [0, 1, 0], [0, 4, 12]
    lengths = torch.randint(0, 4, (3 * batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = torch.randint(0, 9, (int(lengths.sum()),), generator=g)
    psw = torch.rand(ids.numel(), generator=g)
    seg = offsets[::batch].contiguous()
    grad = torch.randn(batch, 16, generator=g)
    update = update_args(optimizer, 0.1, 1e-8, 0.9, 0.99, 0.0, 0, [1, 1])
    rows_a = ops.find_or_insert([pair[0][t] for t in ft], ids, seg)
    rows_b = ops.find_or_insert([pair[1][t] for t in ft], ids, seg)
    ops.pooled_backward_update(pair[0], grad, rows_a, offsets, psw, ft, modes, cols, update)
    urows, grads = ops.pooled_backward(dims, grad, rows_b, offsets, psw, ft, modes, cols)
    for t, r, gr in zip(pair[1], urows, grads):
        ops.sparse_update(t, r, gr, update)
    for ta, tb in zip(*pair):
        for a, b in zip(ta.export(), tb.export()):
            assert torch.equal(a, b)


def test_layout_errors_name_the_problem():
    t = HashTable("e", 4, 0, HashTableOptions(block_rows=16))
    ids = torch.tensor([1, 2, 3])
    rows = ops.find_or_insert(t, ids)
    call = lambda offsets, **kw: ops.pooled_forward(  # noqa: E731
        [t], ids, rows, offsets, kw.get("psw"), [0], [0], [0], kw.get("out_dim", 4)
    )
    with pytest.raises(RuntimeError, match="lengths do not sum"):
        call(torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="offsets decrease inside feature index 0"):
        call(torch.tensor([0, 2, 1, 3]))
    with pytest.raises(RuntimeError, match="per_sample_weights must be float32"):
        call(torch.tensor([0, 3]), psw=torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="outside the output"):
        call(torch.tensor([0, 3]), out_dim=3)
    with pytest.raises(RuntimeError, match="is not a row of table 0"):
        ops.pooled_forward([t], ids, torch.tensor([0, 1, 99]), torch.tensor([0, 3]), None, [0], [0], [0], 4)
    with pytest.raises(RuntimeError, match="needs 8"):
        ops.sparse_update(t, rows, torch.zeros(3, 4), update_args(OPTIM_ADAM, 0.1, 1e-8, 0.9, 0.99, 0.0, 0, [1]))
    with pytest.raises(RuntimeError, match="unique and sorted"):
        ops.sparse_update(t, torch.tensor([1, 1, 2]), torch.zeros(3, 4), update_args(OPTIM_SGD, 0.1, 1e-8, 0.9, 0.99, 0, 0, [1]))
    with pytest.raises(RuntimeError, match="unknown optimizer code 9"):
        ops.sparse_update(t, rows.sort().values, torch.zeros(3, 4), update_args(9, 0.1, 1e-8, 0.9, 0.99, 0, 0, [1]))
    # The optimizers whose update is bias-corrected (as optimizers.h declares them) need a step count.
    from recis_torchrec.ops.constants import OPTIMIZERS

    for code in (OPTIM_ADAM, OPTIMIZERS["lamb"]):
        with pytest.raises(RuntimeError, match="bias correction needs step >= 1, got 0"):
            ops.sparse_update(t, rows.sort().values, torch.zeros(3, 4), update_args(code, 0.1, 1e-8, 0.9, 0.99, 0, 0, [0]))
    ops.sparse_update(t, rows.sort().values, torch.zeros(3, 4), update_args(OPTIM_SGD, 0.1, 1e-8, 0.9, 0.99, 0, 0, [0]))


def _opcheck_case():
    tables, ids, rows, offsets, psw, ft, cols, out_dim = make_case(4, [4, 8], 3, 3, True, 7)
    return tables, ids, rows, offsets, psw, ft, [0, 1, 0], cols, out_dim


def test_opcheck_pooled_forward_and_backward():
    tables, ids, rows, offsets, psw, ft, modes, cols, out_dim = _opcheck_case()
    handles = [t.handle for t in tables]
    torch.library.opcheck(
        torch.ops.recis.pooled_forward.default, (handles, ids, rows, offsets, psw, ft, modes, cols, out_dim)
    )
    grad = torch.randn(4, out_dim)
    torch.library.opcheck(
        torch.ops.recis.pooled_backward.default, ([4, 8], grad, rows, offsets, psw, ft, modes, cols)
    )


def test_opcheck_pooled_weight_grad():
    tables, ids, rows, offsets, psw, ft, modes, cols, out_dim = _opcheck_case()
    grad = torch.randn(4, out_dim)
    torch.library.opcheck(
        torch.ops.recis.pooled_weight_grad.default, ([t.handle for t in tables], grad, ids, rows, offsets, ft, modes, cols)
    )


def test_opcheck_updates():
    tables, ids, rows, offsets, psw, ft, modes, cols, out_dim = _opcheck_case()
    handles = [t.handle for t in tables]
    grad = torch.randn(4, out_dim)
    opt = (*update_args(OPTIM_SGD, 0.01, 1e-8, 0.9, 0.999, 0.0, 0, [1]).hyperparameters(), 1)
    torch.library.opcheck(
        torch.ops.recis.pooled_backward_update.default,
        (handles, grad, rows, offsets, psw, ft, modes, cols, *opt[:-1], [1, 1]),
    )
    urows, grads = ops.pooled_backward([4, 8], grad, rows, offsets, psw, ft, modes, cols)
    torch.library.opcheck(torch.ops.recis.sparse_update.default, (handles[0], urows[0], grads[0], *opt))


@given(
    batch=st.integers(0, 5),
    features=st.integers(1, 4),
    max_len=st.integers(0, 4),
    weighted=st.booleans(),
    mean=st.booleans(),
    insert=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_lookup_pooled_forward_equals_lookup_then_pool(batch, features, max_len, weighted, mean, insert, seed):
    # Two identical table sets, half the ids already present; one takes the
    # fused op, the other find(_or_insert) then pooled_forward.
    g = torch.Generator().manual_seed(seed)
    pair = [[HashTable(f"t{i}", d, 0, HashTableOptions(block_rows=16)) for i, d in enumerate([4, 8])] for _ in range(2)]
    ft = [i % 2 for i in range(features)]
    if features > 2:
        ft[-1] = -1
    lengths = torch.randint(0, max_len + 1, (features * batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = torch.randint(-30, 30, (int(lengths.sum()),), generator=g)
    for tables in pair:
        for t in tables:
            ops.find_or_insert(t, torch.arange(-30, 30, 2, dtype=torch.int64))
    cols, col = [], 0
    for t in ft:
        cols.append(col)
        col += [4, 8][t] if t >= 0 else 0
    modes = [int(mean)] * features
    psw = torch.rand(ids.numel(), generator=g) if weighted else None
    out, rows = ops.lookup_pooled_forward(pair[0], ids, offsets, psw, ft, modes, cols, col, insert)
    seg = offsets[::batch].contiguous() if batch else torch.zeros(features + 1, dtype=torch.int64)
    lookup = ops.find_or_insert if insert else ops.find
    ref_rows = lookup([pair[1][t] if t >= 0 else None for t in ft], ids, seg)
    ref = ops.pooled_forward(pair[1], ids, ref_rows, offsets, psw, ft, modes, cols, col)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for a, b in zip(*pair):
        assert len(a) == len(b)


def test_opcheck_lookup_pooled_forward():
    tables, ids, rows, offsets, psw, ft, modes, cols, out_dim = _opcheck_case()
    handles = [t.handle for t in tables]
    for insert in (False, True):
        torch.library.opcheck(
            torch.ops.recis.lookup_pooled_forward.default,
            (handles, ids, offsets, psw, ft, modes, cols, out_dim, insert),
        )


@pytest.mark.parametrize("dim", [7, 8, 64])
def test_segment_sum_rows_equals_index_add(dim):
    g = torch.Generator().manual_seed(dim)
    n, unique = 5000, 300
    grads = torch.randn(n, dim, generator=g)
    inverse = torch.randint(0, unique, (n,), generator=g)
    want = torch.zeros(unique, dim).index_add_(0, inverse, grads)
    got = ops.segment_sum_rows(grads, inverse, unique)
    assert torch.equal(got, want)  # each row summed in input order, as index_add_ does
    assert ops.segment_sum_rows(grads[:0], inverse[:0], 4).shape == (4, dim)
    torch.library.opcheck(torch.ops.recis.segment_sum_rows.default, (grads[:50], inverse[:50] % 7, 7))
    with pytest.raises(RuntimeError, match=r"inverse\[3\] = 300 is not in \[0, 300\)"):
        bad = inverse.clone()
        bad[3] = unique
        ops.segment_sum_rows(grads, bad, unique)
