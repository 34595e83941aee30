# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The copy-on-write snapshot a background save reads (csrc/hashtable/embedding_blocks.h).

A snapshot taken at one moment must read back exactly what ``export_rows()`` returned at that
moment (ids, rows, optimizer state, metadata, in row order), whatever the table does while it is
read: training steps that update rows, create rows (new blocks, reused free rows), touch rows,
evict them (TTL, the capacity cap, ``erase``, ``evict_stale``), imports over live rows, and a
``clear()`` followed by a restore. Each combination of options and optimizer runs a seeded random
interleaving of those with reads of random sizes.
"""

import random
import threading
import time

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType

import recis_torchrec as rt
from recis_torchrec import HashTableOptions
from recis_torchrec import checkpoint
from recis_torchrec._ext import C
from recis_torchrec.checkpoint.saver import _TableSnapshot

DIM = 8

OPTIONS = {
    "plain": {},
    "ttl": {"ttl_steps": 3},
    "cap-lru": {"max_capacity": 300, "eviction_policy": "lru"},
    "cap-lfu": {"max_capacity": 300, "eviction_policy": "lfu"},
    "admit": {"admit_threshold": 2},
    "admit-ttl-cap": {"admit_threshold": 2, "ttl_steps": 4, "max_capacity": 250, "eviction_policy": "lru"},
}
OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "rowwise-adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
}


def make_module(options: dict, optimizer, dtype=torch.float32) -> rt.HashEmbeddingBagCollection:
    cfg = EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=64, feature_names=["f"],
                             data_type=DataType.FP16 if dtype == torch.float16 else DataType.FP32)
    return rt.HashEmbeddingBagCollection(
        [cfg], fused_params={"optimizer": optimizer, "learning_rate": 0.05},
        options=HashTableOptions(block_rows=64, **options),
    )


def batch(rng: random.Random, hi: int, n: int) -> KeyedJaggedTensor:
    ids = [rng.randrange(hi) for _ in range(n)]
    return KeyedJaggedTensor(keys=["f"], values=torch.tensor(ids, dtype=torch.int64),
                             lengths=torch.ones(n, dtype=torch.int64))


def read_all(table, rng: random.Random, between) -> tuple:
    """Reads the table's snapshot in buffers of random sizes, calling between() after each read."""
    parts = []
    while True:
        cap = rng.choice([1, 7, 30, 64, 150])
        ids, weights = torch.empty(cap, dtype=torch.int64), torch.empty(cap, table.dim, dtype=table.dtype)
        state, meta = torch.empty(cap, table.state_dim), torch.empty(cap, 3, dtype=torch.int64)
        n, _ = C.snapshot_read(table.handle, ids, weights, state, meta)
        parts.append((ids[:n].clone(), weights[:n].clone(), state[:n].clone(), meta[:n].clone()))
        if n < cap:
            break
        between()
    return tuple(torch.cat([p[k] for p in parts]) for k in range(4))


def assert_same(got, want, what):
    for name, g, w in zip(("ids", "weights", "state", "meta"), got, want):
        assert g.shape == w.shape, f"{what}: {name} {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.equal(g, w), f"{what}: {name} differ at rows {torch.nonzero((g != w).reshape(len(g), -1).any(1))[:5].tolist()}"


class Mutator:
    """A seeded random mix of what a table goes through while a snapshot of it is read."""

    def __init__(self, m, table, rng):
        self.m, self.table, self.rng = m, table, rng
        self.hi, self.fresh, self.restored = 600, 10**6, False

    def train(self, n=None):
        self.m(batch(self.rng, self.hi, n or self.rng.choice([5, 50, 400, 2500]))).values().sum().backward()

    def __call__(self):
        rng, table = self.rng, self.table
        op = rng.random()
        if op < 0.55:
            self.hi += rng.choice([0, 0, 40, 400])  # now and then new ids: new rows, new blocks
            self.train()
        elif op < 0.65:
            self.m.eval()
            self.m(batch(rng, self.hi, 100))  # reads only
            self.m.train()
        elif op < 0.75:
            ids = table.export_rows()[0]
            if ids.numel():
                table.erase(ids[torch.randperm(ids.numel())[: max(1, ids.numel() // 10)]])
        elif op < 0.82:
            table.evict_stale(10_000 if rng.random() < 0.3 else 0)
        elif op < 0.95:
            ids, w, s, meta = table.export_rows()
            k = min(ids.numel(), 50)
            new = torch.arange(self.fresh, self.fresh + 20)
            self.fresh += 20
            table.import_(torch.cat([ids[:k], new]), torch.randn(k + 20, DIM).to(w.dtype),
                          torch.rand(k + 20, table.state_dim), None)
        elif not self.restored:
            self.restored = True
            rows = table.export_rows()
            table.clear()
            table.import_(rows[0], rows[1], rows[2], rows[3])


# Every option set with every optimizer on float32 rows; 16-bit rows with two option sets.
CASES = [(k, o, torch.float32) for k in OPTIONS for o in OPTIMIZERS] + [
    (k, o, torch.float16) for k in ("plain", "admit-ttl-cap") for o in OPTIMIZERS
]


@pytest.mark.parametrize("opt_key,opt_name,dtype", CASES)
def test_snapshot_reads_the_table_as_it_was_while_the_table_changes(opt_key, opt_name, dtype):
    rng = random.Random(f"{opt_key}-{opt_name}-{dtype}")
    m = make_module(OPTIONS[opt_key], OPTIMIZERS[opt_name], dtype)
    table = m.tables()["t"]
    mutate = Mutator(m, table, rng)
    train = mutate.train

    for _ in range(20):
        train()
    for trial in range(3):
        want = table.export_rows()
        snap = _TableSnapshot(table)
        assert len(snap) == len(table) == want[0].numel()
        mutate.restored = False

        train(400)  # before any read: this step's writes must be copied
        got = read_all(table, rng, mutate)
        assert_same(got, want, f"trial {trial}")
        copies = table.info()["snapshot_copies"]
        assert copies > 0  # the interleaved writes hit rows the reader had not reached
        # Rows behind the reader are not copied again.
        train(2500)
        assert table.info()["snapshot_copies"] == copies
        during = table.memory_bytes()
        snap.close()
        assert table.info()["snapshot_copies"] == 0
        assert table.memory_bytes() < during  # the copies were counted, and are freed
        with_none = table.memory_bytes()
        _TableSnapshot(table).close()
        assert table.memory_bytes() == with_none


THREADED = [("plain", "rowwise-adagrad"), ("plain", "adam"), ("admit-ttl-cap", "adam"), ("cap-lfu", "sgd"),
            ("ttl", "rowwise-adagrad")]


@pytest.mark.parametrize("opt_key,opt_name", THREADED)
def test_snapshot_read_in_another_thread_while_the_table_trains(opt_key, opt_name):
    """The reader takes no table lock: it runs in its own thread (without the GIL) while training
    steps, evictions, erases and imports write the same rows, and must still read the table as it was."""
    rng = random.Random(f"threaded-{opt_key}-{opt_name}")
    m = make_module(OPTIONS[opt_key], OPTIMIZERS[opt_name])
    table = m.tables()["t"]
    mutate = Mutator(m, table, rng)
    mutate.hi = 20_000
    for _ in range(30):
        mutate.train(2500)
    for trial in range(4):
        want = table.export_rows()
        snap = _TableSnapshot(table)
        mutate.restored = False
        parts, errors = [], []
        first_change = threading.Event()

        def reader():
            try:
                sizes = random.Random(trial)
                # At least one change lands while the snapshot is read, however the threads are
                # scheduled (on a loaded machine the reader could finish before the first change).
                first_change.wait()
                while True:
                    cap = sizes.choice([1, 16, 200, 1000])
                    buf = (torch.empty(cap, dtype=torch.int64), torch.empty(cap, DIM),
                           torch.empty(cap, table.state_dim), torch.empty(cap, 3, dtype=torch.int64))
                    n, _ = C.snapshot_read(table.handle, *buf)
                    parts.append(tuple(b[:n] for b in buf))
                    if n < cap:
                        return
                    time.sleep(0.0002)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        thread = threading.Thread(target=reader)
        thread.start()
        overlapped = 0
        while thread.is_alive():
            mutate()
            first_change.set()
            overlapped += 1
        thread.join()
        assert not errors, errors
        got = tuple(torch.cat([p[k] for p in parts]) for k in range(4))
        assert_same(got, want, f"trial {trial} ({overlapped} changes while it read)")
        assert overlapped > 0
        snap.close()
        assert table.info()["snapshot_copies"] == 0


def test_snapshot_misuse_is_refused_with_the_reason():
    m = make_module({}, EmbOptimType.EXACT_SGD)
    table = m.tables()["t"]
    m(KeyedJaggedTensor(keys=["f"], values=torch.arange(100), lengths=torch.ones(100, dtype=torch.int64)))
    buf = (torch.empty(10, dtype=torch.int64), torch.empty(10, DIM), torch.empty(10, 0),
           torch.empty(10, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="no snapshot in progress"):
        C.snapshot_read(table.handle, *buf)
    snap = _TableSnapshot(table)
    with pytest.raises(RuntimeError, match="already in progress"):
        C.snapshot_begin(table.handle)
    with pytest.raises(RuntimeError, match="buffers must be contiguous"):
        C.snapshot_read(table.handle, buf[0], torch.empty(10, DIM + 1), buf[2], buf[3])
    assert C.snapshot_read(table.handle, *buf) == (10, 10)
    with pytest.raises(checkpoint.CheckpointError, match="held 100 rows but 90 were read"):
        snap.read()  # read elsewhere already: the count gives it away
    with pytest.raises(RuntimeError, match="no snapshot in progress"):
        C.snapshot_read(table.handle, *buf)
    snap.close()  # again: harmless
    snap = _TableSnapshot(table)
    assert torch.equal(snap.views(0, 1000)[0], table.export_rows()[0])  # read whole into host memory
    assert table.info()["snapshot_copies"] == 0


def test_a_background_save_costs_the_step_only_the_rows_it_changes(tmp_path):
    """The snapshot of a background save copies nothing up front: the step after the save starts
    copies the rows it writes (at most once each), and the checkpoint holds the rows as they were."""
    m = make_module({}, EmbOptimType.EXACT_ROWWISE_ADAGRAD)
    table = m.tables()["t"]
    ids = torch.arange(200_000)
    table.find_or_insert(ids)
    at_save = table.export_rows()
    checkpoint.save(str(tmp_path), m, step=1, blocking=False, write_share=0.05)
    assert table.info()["snapshot_copies"] == 0
    touched = torch.arange(150_000, 150_500)
    kjt = KeyedJaggedTensor(keys=["f"], values=touched, lengths=torch.ones(500, dtype=torch.int64))
    m(kjt).values().sum().backward()
    assert table.info()["snapshot_copies"] <= 500
    checkpoint.wait()
    assert table.info()["snapshot_copies"] == 0
    fresh = make_module({}, EmbOptimType.EXACT_ROWWISE_ADAGRAD)
    checkpoint.load(str(tmp_path), fresh)
    got = fresh.tables()["t"].export_rows()
    order = torch.argsort(got[0])
    assert torch.equal(got[0][order], at_save[0])
    assert torch.equal(got[1][order], at_save[1])
    assert torch.equal(got[2][order], at_save[2])
