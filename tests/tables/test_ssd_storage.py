# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Tables with rows on disk behind a DRAM cache (storage="ssd"), against the same table in memory."""

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

import recis_torchrec as rt
from recis_torchrec import HashTable, HashTableOptions
from recis_torchrec.checkpoint import CheckpointError

DIM = 8


def ssd(tmp_path, cache_rows: int = 16, **kw) -> HashTableOptions:
    """A cache of about cache_rows rows: cache_bytes counts each row's bytes plus 32 of IdMap (a D=8
    row of float32 with one state float takes 36 + 32)."""
    return HashTableOptions(storage="ssd", storage_path=str(tmp_path), cache_bytes=cache_rows * 68, **kw)


def model(options: HashTableOptions, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, dtype=None):
    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=DIM, num_embeddings=100, feature_names=["fa"]),
        EmbeddingBagConfig(name="b", embedding_dim=DIM, num_embeddings=100, feature_names=["fb1", "fb2"]),
    ]
    if dtype is not None:
        for t in tables:
            t.data_type = dtype
    return rt.HashEmbeddingBagCollection(
        tables, fused_params={"optimizer": optimizer, "learning_rate": 0.1}, options=options
    )


def batches(steps: int, seed: int = 0, vocab: int = 400, batch: int = 6):
    """Zipf-like ids (a few hot, many cold), 3 keys, bags of 0-3 ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, 4, (3 * batch,), generator=g)
        u = torch.rand(int(lengths.sum()), generator=g)
        values = (vocab ** u).long() - 1 + 1000 * torch.randint(0, 2, u.shape, generator=g)
        out.append(KeyedJaggedTensor(keys=["fa", "fb1", "fb2"], values=values, lengths=lengths))
    return out


def train(m, kjts):
    outs = []
    for kjt in kjts:
        out = m(kjt).values()
        (out * torch.arange(out.numel()).reshape(out.shape) / out.numel()).sum().backward()
        outs.append(out.detach())
    return outs


def rows(table: HashTable):
    ids, weights, state, meta = table.export_rows()
    order = torch.argsort(ids)
    return ids[order], weights[order], state[order], meta[order]


def assert_same_rows(a: HashTable, b: HashTable, all_meta: bool = False):
    """Ids, weights, state and last_update equal; last_seen and freq too with all_meta (a table in
    memory tracks them only under TTL or a cap; one with rows on disk always does)."""
    ra, rb = rows(a), rows(b)
    for x, y in zip(ra[:3], rb[:3]):
        assert torch.equal(x, y)
    cols = [0, 1, 2] if all_meta else [1]
    assert torch.equal(ra[3][:, cols], rb[3][:, cols])


def test_training_matches_the_table_in_memory_bit_for_bit(tmp_path):
    """The same steps on the same ids: every output, and every row, state and metadata after, equal;
    the cache held a fraction of the rows and the others went to disk and came back."""
    kjts = batches(30)
    # a TTL far away: the table in memory tracks last_seen and freq too, and never evicts
    mem, dsk = model(HashTableOptions(ttl_steps=10**6)), model(ssd(tmp_path, cache_rows=24))
    for a, b in zip(train(mem, kjts), train(dsk, kjts)):
        assert torch.equal(a, b)
    for name in ("a", "b"):
        t = dsk.tables()[name]
        info = t.info()
        assert info["disk_rows"] > 0 and info["disk_bytes_read"] > 0 and info["disk_bytes_written"] > 0
        assert info["rows"] == len(mem.tables()[name]) == info["cache_rows"] + info["disk_rows"]
        assert_same_rows(mem.tables()[name], t, all_meta=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_rows_round_trip_through_disk(tmp_path, dtype):
    from torchrec.modules.embedding_configs import DataType

    data_type = {torch.float16: DataType.FP16, torch.bfloat16: DataType.BF16}[dtype]
    kjts = batches(12, seed=3)
    mem = model(HashTableOptions(), EmbOptimType.EXACT_SGD, data_type)
    dsk = model(ssd(tmp_path, cache_rows=8), EmbOptimType.EXACT_SGD, data_type)
    assert dsk.tables()["a"].dtype == dtype
    for a, b in zip(train(mem, kjts), train(dsk, kjts)):
        assert torch.equal(a, b)
    assert_same_rows(mem.tables()["b"], dsk.tables()["b"])


def test_the_cache_stays_within_its_budget_while_far_more_rows_stream_through(tmp_path):
    dim, budget = 64, 64
    t = HashTable("t", dim, 1, options=ssd(tmp_path, cache_rows=budget))
    assert t.cache_rows == budget * 68 // (t.info()["row_bytes"] + 32)
    budget = t.cache_rows
    for start in range(0, 20_000, 500):
        t.find_or_insert(torch.arange(start, start + 500))
        info = t.info()
        # the rows a call brings in or creates stay even past the budget; nothing else does
        assert info["cache_rows"] <= budget + 500
    info = t.info()
    assert info["rows"] == 20_000 and info["disk_rows"] >= 20_000 - budget - 500
    mem = HashTable("t", dim, 1, options=HashTableOptions())
    mem.find_or_insert(torch.arange(20_000))
    # resident: the cache and the disk's index, well under the rows in memory
    assert t.memory_bytes() < 0.5 * mem.memory_bytes()
    assert info["disk_file_bytes"] >= info["disk_rows"] * (4 * dim + 4)  # a record: the row's floats and state
    torch.testing.assert_close(t.lookup(torch.arange(0, 20_000, 97)), mem.lookup(torch.arange(0, 20_000, 97)))


def test_lookup_reads_rows_on_disk_without_moving_them(tmp_path):
    t = HashTable("t", DIM, 0, options=ssd(tmp_path, cache_rows=4))
    mem = HashTable("t", DIM, 0, options=HashTableOptions())
    ids = torch.arange(40)
    weights = torch.randn(40, DIM)
    t.import_(ids, weights)
    mem.import_(ids, weights)
    before = t.info()
    assert before["disk_rows"] >= 30
    probe = torch.tensor([0, 39, 5, 12345])  # on disk, cached, on disk, absent (initial value)
    assert torch.equal(t.lookup(probe), mem.lookup(probe))
    after = t.info()
    assert after["cache_rows"] == before["cache_rows"] and after["disk_rows"] == before["disk_rows"]


def test_slots_freed_by_rows_coming_back_are_reused(tmp_path):
    """Rows move between cache and disk over and over; the file does not grow past the most rows it
    held at once."""
    t = HashTable("t", DIM, 0, options=ssd(tmp_path, cache_rows=10))
    t.find_or_insert(torch.arange(100))
    t.prefetch(torch.arange(0))  # the 100 rows created above go to disk but for the cache's share
    slots = t.info()["disk_file_bytes"]
    assert slots > 0
    for k in range(19):  # windows over ids 0..99
        t.find_or_insert(torch.arange(k * 5, k * 5 + 10))
    assert t.info()["disk_file_bytes"] <= slots + 10 * t.info()["row_bytes"]
    assert len(t) == 100


def test_export_chunks_run_from_the_cache_into_the_disk(tmp_path):
    t = HashTable("t", DIM, 2, options=ssd(tmp_path, cache_rows=8))
    t.find_or_insert(torch.arange(50))
    seen = []
    start = 0
    while True:
        ids = torch.empty(7, dtype=torch.int64)
        w, s, m = torch.empty(7, DIM), torch.empty(7, 2), torch.empty(7, 3, dtype=torch.int64)
        n, start = t.export_chunk(start, -1, ids, w, s, m)
        seen += ids[:n].tolist()
        if n < 7:
            break
    assert sorted(seen) == list(range(50))


def test_erase_and_clear_reach_the_rows_on_disk(tmp_path):
    t = HashTable("t", DIM, 0, options=ssd(tmp_path, cache_rows=4))
    t.find_or_insert(torch.arange(30))
    t.restart_eviction_log(0)
    assert t.erase(torch.tensor([0, 1, 29, 999]), clock=3) == 3
    assert len(t) == 27
    assert sorted(t.evicted_since(0)[0].tolist()) == [0, 1, 29]  # deltas see the erased disk rows
    assert 0 not in t.export()[0].tolist()
    t.clear()
    assert len(t) == 0 and t.info()["disk_rows"] == 0
    t.find_or_insert(torch.arange(10))
    assert len(t) == 10


def test_deepcopy_copies_the_rows_on_disk(tmp_path):
    t = HashTable("t", DIM, 1, options=ssd(tmp_path, cache_rows=4))
    t.import_(torch.arange(20), torch.randn(20, DIM), torch.rand(20, 1))
    c = copy.deepcopy(t)
    assert c.on_disk and c.info()["disk_rows"] > 0
    assert_same_rows(t, c)


@pytest.mark.parametrize("blocking", [True, False])
def test_checkpoints_load_into_either_storage(tmp_path, blocking):
    kjts = batches(10, seed=1)
    dsk = model(ssd(tmp_path, cache_rows=16))
    train(dsk, kjts)
    path = rt.checkpoint.save(str(tmp_path / "ckpt"), dsk, step=10, blocking=blocking)
    if not blocking:
        rt.checkpoint.wait()
    mem = model(HashTableOptions())
    rt.checkpoint.load(str(tmp_path / "ckpt"), mem)
    dsk2 = model(ssd(tmp_path, cache_rows=16))
    rt.checkpoint.load(path, dsk2)
    for name in ("a", "b"):
        assert_same_rows(dsk.tables()[name], mem.tables()[name])
        assert_same_rows(dsk.tables()[name], dsk2.tables()[name])
        assert dsk2.tables()[name].info()["cache_rows"] <= 16
    # and training goes on the same from either
    more = batches(5, seed=2)
    for a, b in zip(train(mem, more), train(dsk2, more)):
        assert torch.equal(a, b)


def test_a_background_save_too_large_for_memory_is_refused(tmp_path, monkeypatch):
    from recis_torchrec.tables import hash_table

    dsk = model(ssd(tmp_path, cache_rows=4))
    train(dsk, batches(3))
    monkeypatch.setattr(hash_table, "mem_available_bytes", lambda: 1000)
    with pytest.raises(CheckpointError, match="blocking=True"):
        rt.checkpoint.save(str(tmp_path / "ckpt"), dsk, step=3, blocking=False)
    monkeypatch.setattr(hash_table, "mem_available_bytes", lambda: None)  # no /proc/meminfo: no check
    rt.checkpoint.save(str(tmp_path / "ckpt"), dsk, step=3, blocking=False)
    rt.checkpoint.wait()


def test_a_copy_into_memory_too_large_for_it_is_refused(tmp_path, monkeypatch):
    """export_rows (and deepcopy, state dicts, inference packages, which use it) of a table on disk
    refuses, naming the table, a copy larger than half the memory available."""
    from recis_torchrec.tables import hash_table

    t = HashTable("big", DIM, 0, options=ssd(tmp_path, cache_rows=4))
    t.find_or_insert(torch.arange(100))
    monkeypatch.setattr(hash_table, "mem_available_bytes", lambda: 1000)
    with pytest.raises(MemoryError, match="'big'.*checkpoint.save"):
        t.export_rows()
    with pytest.raises(MemoryError, match="'big'"):
        copy.deepcopy(t)
    monkeypatch.setattr(hash_table, "mem_available_bytes", lambda: None)  # no /proc/meminfo: no check
    assert t.export_rows()[0].numel() == 100


def test_bad_storage_options_raise_naming_them(tmp_path):
    with pytest.raises(ValueError, match="storage must be one of"):
        HashTableOptions(storage="disk")
    with pytest.raises(ValueError, match="needs storage_path"):
        HashTableOptions(storage="ssd", cache_bytes=1 << 20)
    with pytest.raises(ValueError, match="needs cache_bytes"):
        HashTableOptions(storage="ssd", storage_path=str(tmp_path))
    with pytest.raises(ValueError, match="cache_bytes applies to storage='ssd'"):
        HashTableOptions(cache_bytes=1 << 20)
    with pytest.raises(ValueError, match="storage_path applies to storage='ssd'"):
        HashTableOptions(storage_path=str(tmp_path))
    with pytest.raises(ValueError, match="io_threads"):
        ssd(tmp_path, io_threads=0)
    with pytest.raises(ValueError, match="io_threads applies to storage='ssd'"):
        HashTableOptions(io_threads=8)
    with pytest.raises(NotImplementedError, match="max_capacity"):
        ssd(tmp_path, max_capacity=100, eviction_policy="lru")
    with pytest.raises(ValueError, match="CPU tables"):
        HashTableOptions(storage="ssd", storage_path=str(tmp_path), cache_bytes=1 << 20, device="cuda")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        HashTable("t", DIM, options=ssd(tmp_path / "no-such-dir"))


def test_options_round_trip_through_dicts(tmp_path):
    o = ssd(tmp_path, io_threads=2)
    assert HashTableOptions.from_dict(o.to_dict()) == o


class _Task(torch.nn.Module):
    """A model as TorchRec's pipelines call it: batch in, (loss, output) out."""

    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):
        out = self.ebc(kjt).values()
        return (out * torch.arange(out.numel()).reshape(out.shape) / out.numel()).sum(), out.detach()


def test_the_prefetch_pipeline_trains_the_same_and_its_steps_read_nothing(tmp_path):
    """The next batch's rows come in on the worker while the step runs: same outputs and rows as the
    table in memory, and the lookups found every row of theirs already cached."""
    kjts = batches(40, seed=5, vocab=2000, batch=16)
    mem = model(HashTableOptions(ttl_steps=10**6))
    reference = train(mem, kjts)
    dsk = model(ssd(tmp_path, cache_rows=64))
    pipe = rt.PrefetchTrainPipeline(_Task(dsk))
    it = iter(kjts)
    outs = []
    while True:
        try:
            outs.append(pipe.progress(it))
        except StopIteration:
            break
    pipe.close()
    assert len(outs) == len(kjts)
    for a, b in zip(reference, outs):
        assert torch.equal(a, b)
    for name in ("a", "b"):
        t = dsk.tables()[name]
        assert t.info()["disk_bytes_read"] > 0  # rows did come back from disk, through the prefetch
        assert t.rows_read_at_lookup == 0
        assert_same_rows(mem.tables()[name], t, all_meta=True)


def test_without_a_prefetch_stage_lookups_read_their_own_rows(tmp_path):
    kjts = batches(20, seed=5, vocab=2000, batch=16)
    dsk = model(ssd(tmp_path, cache_rows=64))
    train(dsk, kjts)
    assert sum(t.rows_read_at_lookup for t in dsk.tables().values()) > 0


def test_ttl_evicts_the_same_rows_on_disk_as_in_memory(tmp_path):
    """Rows unseen for ttl_steps updates go wherever they are (cache or disk), at the same scans as in
    memory: the same rows survive, with the same values, and the eviction log (what deltas read) holds
    the same ids."""
    kjts = batches(40, seed=7, vocab=600)
    mem, dsk = model(HashTableOptions(ttl_steps=8)), model(ssd(tmp_path, cache_rows=24, ttl_steps=8))
    for m in (mem, dsk):
        for t in m.tables().values():
            t.restart_eviction_log(0)
    for a, b in zip(train(mem, kjts), train(dsk, kjts)):
        assert torch.equal(a, b)
    for name in ("a", "b"):
        m, d = mem.tables()[name], dsk.tables()[name]
        assert m.info()["evicted"] > 0 and d.info()["evicted"] == m.info()["evicted"]
        assert_same_rows(m, d, all_meta=True)
        assert sorted(m.evicted_since(0)[0].tolist()) == sorted(d.evicted_since(0)[0].tolist())
    # an explicit scan reaches the disk too
    for name in ("a", "b"):
        m, d = mem.tables()[name], dsk.tables()[name]
        assert m.evict_stale(100) == d.evict_stale(100) > 0
        assert len(m) == len(d) == 0


def test_resident_memory_stays_near_the_cache_and_the_index_while_rows_stream_through(tmp_path):
    """300,000 rows of D=256 with state (310 MB in memory) through a 2 MB cache: the process's own memory
    (RssAnon) grows by the cache and the disk's index (about 58 bytes an id), not by the rows (the rows
    file's pages are page cache: RssFile where reads mapped them); memory_bytes says so too."""
    import gc

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    gc.collect()
    t = HashTable("t", 256, 4, options=HashTableOptions(storage="ssd", storage_path=str(tmp_path),
                                                        cache_bytes=2 << 20))
    before = rss()
    for start in range(0, 300_000, 10_000):
        t.find_or_insert(torch.arange(start, start + 10_000))
    t.prefetch(torch.arange(0))
    grown = rss() - before
    info = t.info()
    rows_in_memory = 300_000 * info["row_bytes"]
    assert info["rows"] == 300_000 and info["disk_rows"] >= 300_000 - info["cache_budget_rows"]
    assert info["memory_bytes"] < 0.25 * rows_in_memory
    assert grown < 0.35 * rows_in_memory, (grown, rows_in_memory, info)  # measured: 0.20


@pytest.mark.parametrize("span", ["few clocks", "clocks far apart"])
def test_a_spill_moves_the_least_recently_seen_rows_ties_by_row(tmp_path, span):
    """disk_spill takes the rows with the lowest (last_seen, row): counted per clock where the clocks
    span few values, chosen by a partial sort where they lie far apart. Never a row of `keep`, nor one
    seen at the spill's clock or later."""
    from recis_torchrec import _C as C

    g = torch.Generator().manual_seed(1)
    n = 300
    ids = torch.randperm(10 * n, generator=g)[:n]  # row r holds ids[r]: inserted in this order
    seen = torch.randint(0, 12, (n,), generator=g)
    if span == "clocks far apart":
        seen = seen * 100_000
    meta = torch.stack([seen, seen + 1, torch.ones(n, dtype=torch.int64)], 1)
    clock = int(seen.max())  # rows seen at it stay
    t = HashTable("t", DIM, 0, options=ssd(tmp_path, cache_rows=10 * n))
    t.import_(ids, torch.randn(n, DIM), meta=meta)
    assert t.info()["disk_rows"] == 0
    keep = ids[::7]
    want = 120
    moved = C.disk_spill(t.handle, want, clock, keep)
    eligible = [r for r in range(n) if int(seen[r]) < clock and r % 7 != 0]
    expect = sorted(eligible, key=lambda r: (int(seen[r]), r))[:want]
    assert moved == len(expect) == want
    on_disk = [r for r in range(n) if C.disk_has_any(t.handle, ids[r : r + 1])]
    assert on_disk == sorted(expect)
