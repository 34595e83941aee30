# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Table ops on every device: growth, extreme ids, initial rows, concurrent inserts, host rows and
owner bucketing, each against the CPU table or a plain-PyTorch reference."""

import pytest
import torch

import recis_torchrec as rt
from recis_torchrec import ops
from recis_torchrec.tables.hash_table import HashTable
from tests.devices import devices, needs_cuda


def make_table(device: str, name="t", dim=8, state_dim=0, **options):
    return HashTable(name, dim, state_dim, rt.HashTableOptions(**options), num_embeddings=16, device=device)


@pytest.mark.parametrize("device", devices())
def test_find_or_insert_duplicates_extremes_and_growth(device):
    table = make_table(device, initial_capacity=4, block_rows=8)
    ids = torch.tensor([5, -(2**63), 2**63 - 1, 5, 0, -1, 5, 2**63 - 1], device=device)
    rows = table.find_or_insert(ids)
    assert len(table) == 5
    assert rows[0] == rows[3] == rows[6] and rows[2] == rows[7]
    assert rows.unique().numel() == 5
    assert torch.equal(table.find(ids), rows)
    assert int(table.find(torch.tensor([42], device=device))[0]) == -1
    before = table.lookup(ids).cpu()
    # Grow well past the initial capacity and block size: earlier rows neither move nor change.
    many = torch.arange(10_000, 30_000, device=device)
    table.find_or_insert(many)
    assert len(table) == 5 + 20_000
    torch.testing.assert_close(table.lookup(ids).cpu(), before, atol=0, rtol=0)
    assert torch.equal(table.find(ids), rows)


@needs_cuda
@pytest.mark.parametrize("initializer", ["uniform", "normal", "truncated_normal", "constant"])
def test_initial_rows_equal_the_cpu_tables(initializer):
    ids = torch.cat([torch.arange(-50, 50), torch.tensor([-(2**63), 2**63 - 1])])
    cpu = make_table("cpu", name="items", dim=12, initializer=initializer, init_value=0.5)
    gpu = make_table("cuda", name="items", dim=12, initializer=initializer, init_value=0.5)
    cpu.find_or_insert(ids)
    gpu.find_or_insert(ids.cuda())
    c_ids, c_w, _ = cpu.export()
    g_ids, g_w, _ = gpu.export()
    order = torch.argsort(c_ids)
    assert torch.equal(g_ids, c_ids[order])
    if initializer in ("uniform", "constant"):
        assert torch.equal(g_w, c_w[order])  # bit for bit
    else:  # the GPU's logf/cosf may differ from the host's by a few ulps
        torch.testing.assert_close(g_w, c_w[order], atol=1e-6, rtol=1e-5)
    # Absent ids read the same initial value without being inserted.
    probe = torch.tensor([1000, -1000])
    torch.testing.assert_close(gpu.lookup(probe.cuda()).cpu(), cpu.lookup(probe), atol=1e-6, rtol=1e-5)


@needs_cuda
def test_concurrent_inserts_of_one_hot_id():
    """Every thread of a launch asks for the same few ids: each gets one row."""
    table = make_table("cuda", initial_capacity=2)
    ids = torch.tensor([7, 8, 9], device="cuda").repeat(100_000)
    rows = table.find_or_insert(ids)
    assert len(table) == 3
    assert rows.view(-1, 3).unique(dim=0).shape[0] == 1


@needs_cuda
def test_host_rows_table_matches_device_rows():
    ids = torch.arange(0, 5000, 7)
    dev = make_table("cuda", name="h", dim=16)
    host = make_table("cuda", name="h", dim=16, host_rows=True)
    dev.find_or_insert(ids.cuda())
    host.find_or_insert(ids.cuda())
    assert torch.equal(host.lookup(ids.cuda()).cpu(), dev.lookup(ids.cuda()).cpu())


@needs_cuda
def test_owner_of_and_bucketing_match_the_cpu():
    ids = torch.randint(-(2**62), 2**62, (50_000,))
    for world_size in (1, 2, 3, 8):
        want = ops.owner_of(ids, world_size)
        got = ops.owner_of(ids.cuda(), world_size).cpu()
        assert torch.equal(got, want)
        perm, counts = torch.ops.recis.gpu_bucketize_by_owner(ids.cuda(), world_size)
        assert torch.equal(counts.cpu(), torch.bincount(want, minlength=world_size))
        expected = torch.argsort(want, stable=True)
        assert torch.equal(perm.cpu(), expected)


@pytest.mark.parametrize("device", devices())
def test_threads_on_one_table_each_see_the_table_as_a_lock_would(device):
    """torch.ops release the GIL: four Python threads insert and find on one table at once, each on
    its own stream on CUDA (where the table had no lock and growth raced); every id gets one row, a
    find from another thread sees it, and the table holds each id once."""
    import contextlib
    import threading

    table = make_table(device, initial_capacity=8, block_rows=64)
    errors, rows = [], {}

    def work(k):
        try:
            stream = torch.cuda.Stream() if device == "cuda" else None
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                for r in range(20):
                    ids = torch.arange(k * 100_000 + r * 500, k * 100_000 + (r + 1) * 500, device=device)
                    got = table.find_or_insert(torch.cat([ids, torch.tensor([-1], device=device)]))
                    again = table.find(ids)
                    if not torch.equal(got[:-1], again):
                        errors.append(f"thread {k}: find disagrees with find_or_insert at round {r}")
                    rows[(k, r)] = got[:-1].cpu()
            if stream is not None:
                stream.synchronize()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(table) == 4 * 20 * 500 + 1  # the shared id -1 once
    everything = torch.cat(list(rows.values()))
    assert everything.unique().numel() == everything.numel()  # no two ids share a row


@pytest.mark.parametrize("device", devices())
def test_a_bad_kjt_or_bad_rows_raise_on_every_device(device):
    """The checks the modules leave to the ops (``check_values=False``): offsets that decrease inside a
    feature (a bag reaching outside the values), offsets that do not end at the number of values, and
    rows that are not rows of their table raise, naming the problem, instead of reading out of bounds."""
    from recis_torchrec.optim.fused import OPTIM_SGD
    from tests.ops.test_embedding_bag_ops import update_args

    table = make_table(device, dim=4)
    ids = torch.tensor([1, 2, 3, 4], device=device)
    rows = ops.find_or_insert(table, ids)
    # Two features of batch 2 on one table; bag 1 of feature 0 claims values [5, 2) then [2, 4).
    ft, modes, cols = [0, 0], [0, 0], [0, 4]
    good = torch.tensor([0, 1, 2, 3, 4], device=device)
    decreasing = torch.tensor([0, 5, 2, 3, 4], device=device)
    short = torch.tensor([0, 1, 2, 3, 3], device=device)

    def forward(offsets, r=rows):
        return ops.pooled_forward([table], ids, r, offsets, None, ft, modes, cols, 8)

    def lookup(offsets):
        return ops.lookup_pooled_forward([table], ids, offsets, None, ft, modes, cols, 8, True)

    def backward(offsets, r=rows):
        ops.pooled_backward_update([table], torch.ones(2, 8, device=device), r, offsets, None, ft, modes, cols,
                                   update_args(OPTIM_SGD, 0.1, 1e-8, 0.9, 0.99, 0.0, 0, [1]))

    assert forward(good).shape == (2, 8)
    for call in (forward, lookup, backward):
        with pytest.raises(RuntimeError, match=r"offsets decrease inside feature index 0 \(negative length at bag 1\)"):
            call(decreasing)
        with pytest.raises(RuntimeError, match="lengths do not sum to the number of values"):
            call(short)
    bad = rows.clone()
    bad[3] = 99
    with pytest.raises(RuntimeError, match=r"rows\[3\] = 99 is not a row of table 0"):
        forward(good, bad)
    with pytest.raises(RuntimeError, match=r"is not a row of table 0"):
        backward(good, bad)
    bad[3] = -7  # any negative row is an absent id, as find returns -1: its initial row is pooled
    absent = rows.clone()
    absent[3] = -1
    assert torch.equal(forward(good, bad), forward(good, absent))
    assert torch.equal(ops.find(table, ids), rows)  # nothing was inserted or changed by the refused calls
