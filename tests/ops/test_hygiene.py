# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Admission and eviction: through the module, as training sees them."""

import os

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

import recis_torchrec as rt
from recis_torchrec import HashTable, HashTableOptions


def module(options: HashTableOptions, dim: int = 64) -> rt.HashEmbeddingBagCollection:
    tables = [EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=16, feature_names=["f"])]
    return rt.HashEmbeddingBagCollection(
        tables, fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.5}, options=options
    )


def step(m, ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.int64)
    kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.ones(ids.numel(), dtype=torch.int64))
    out = m(kjt).values()
    out.sum().backward()
    return out.detach()


def test_admission_needs_n_sightings_and_trains_nothing_before():
    m = module(HashTableOptions(admit_threshold=3, block_rows=16))
    t = m.tables()["t"]
    initial = t.lookup(torch.tensor([7]))
    for seen in (1, 2):
        out = step(m, [7])
        torch.testing.assert_close(out, initial)  # reads its initial vector
        assert len(t) == 0 and t.info()["pending"] == 1
        torch.testing.assert_close(t.lookup(torch.tensor([7])), initial)  # and got no update
    out = step(m, [7])  # third sighting: admitted, trained from here on
    torch.testing.assert_close(out, initial)
    assert len(t) == 1 and t.info()["pending"] == 0
    assert not torch.equal(t.lookup(torch.tensor([7])), initial)
    info = t.info()
    assert info["admitted"] == 1 and info["rejected"] == 2
    # Sightings within one batch count too.
    step(m, [9, 9, 9])
    assert int(t.find(torch.tensor([9]))[0]) >= 0


def test_capacity_cap_keeps_rows_and_memory_flat_under_an_unbounded_stream():
    cap = 1000
    for policy in ("lru", "lfu"):
        m = module(HashTableOptions(max_capacity=cap, eviction_policy=policy, block_rows=64))
        t = m.tables()["t"]
        memory = []
        next_id = 0
        for i in range(100):  # 10x the cap of distinct ids, 100 per step
            step(m, list(range(next_id, next_id + 100)))
            next_id += 100
            assert len(t) <= cap
            if (i + 1) % 10 == 0:
                memory.append(t.memory_bytes())
        assert max(memory) <= 1.05 * memory[0], (policy, memory)
        assert t.info()["evicted"] >= next_id - cap
        # The most recent ids are there.
        assert (t.find(torch.arange(next_id - 100, next_id)) >= 0).all()


def test_lfu_keeps_frequent_ids_and_lru_recent_ones():
    cap = 50
    lfu = module(HashTableOptions(max_capacity=cap, eviction_policy="lfu", block_rows=16))
    lru = module(HashTableOptions(max_capacity=cap, eviction_policy="lru", block_rows=16))
    hot = list(range(10))
    for m in (lfu, lru):
        for _ in range(5):
            step(m, hot)  # hot ids seen 5 times, long ago
        for k in range(10):
            step(m, list(range(1000 + 20 * k, 1020 + 20 * k)))  # then a stream of cold ids
    assert (lfu.tables()["t"].find(torch.tensor(hot)) >= 0).all()
    assert (lru.tables()["t"].find(torch.tensor(hot)) < 0).all()


def test_ttl_removes_exactly_the_stale_ids():
    m = module(HashTableOptions(ttl_steps=5, block_rows=16))
    t = m.tables()["t"]
    step(m, [1, 2, 3])  # clock 0 -> 1
    for _ in range(3):
        step(m, [2])  # clocks 1..3
    step(m, [3])  # clock 4
    # At clock 6, rows unseen since before clock 1 (last seen < 6 - 5) go: only id 1.
    removed = t.evict_stale(6)
    assert removed == 1
    assert int(t.find(torch.tensor([1]))[0]) == -1
    assert (t.find(torch.tensor([2, 3])) >= 0).all()
    ids, steps = t.evicted_since(0)
    assert ids.tolist() == [1] and steps.tolist() == [7]


def test_evicted_rows_are_reused():
    t = HashTable("r", 4, 0, HashTableOptions(block_rows=16))
    t.find_or_insert(torch.arange(40))
    limit = t.info()["capacity"]
    assert t.erase(torch.arange(0, 40, 2)) == 20
    assert len(t) == 20
    t.find_or_insert(torch.arange(100, 120))
    assert len(t) == 40 and t.info()["capacity"] == limit  # no new block: freed rows were reused
    assert (t.find(torch.arange(0, 40, 2)) == -1).all() and (t.find(torch.arange(1, 40, 2)) >= 0).all()


def test_rows_in_use_this_step_are_never_evicted():
    cap = 8
    m = module(HashTableOptions(max_capacity=cap, eviction_policy="lru", block_rows=16))
    t = m.tables()["t"]
    before = t.lookup(torch.arange(12))
    out = step(m, list(range(12)))  # more new ids than fit: 8 get rows, 4 read their initial value
    assert len(t) == cap and t.info()["rejected"] == 4
    torch.testing.assert_close(out, before)  # every id pooled its initial vector in the forward
    refused = (t.find(torch.arange(12)) < 0).nonzero().flatten()
    assert refused.tolist() == [8, 9, 10, 11]
    torch.testing.assert_close(t.lookup(refused), before[refused])  # and was not trained
    # The next step may evict the 8 rows (they are no longer in use) to admit others.
    step(m, list(range(100, 104)))
    assert len(t) == cap and (t.find(torch.arange(100, 104)) >= 0).all()


def test_ttl_eviction_below_the_high_water_mark_does_not_break_the_forward():
    # Ids 1 and 2 take rows 0 and 1, id 3 row 2; TTL then frees rows 0 and 1, so the
    # one live row (id 3's) sits above the live-row count.
    m = module(HashTableOptions(ttl_steps=4, block_rows=16))
    t = m.tables()["t"]
    initial = t.lookup(torch.tensor([1, 2, 3]))
    step(m, [1, 2])
    for _ in range(10):
        step(m, [3])
    assert int(t.find(torch.tensor([3]))[0]) == 2 and len(t) == 1
    assert (t.find(torch.tensor([1, 2])) < 0).all() and t.info()["evicted"] == 2
    trained_3 = t.lookup(torch.tensor([3]))
    assert not torch.equal(trained_3, initial[2:])
    m.eval()
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.ones(3, dtype=torch.int64))
    torch.testing.assert_close(m(kjt).values(), torch.cat([initial[:2], trained_3]))
    m.train()
    # Training over the evicted ids and the survivor: 1 and 2 come back at their initial
    # values in freed rows, and the SGD step moves each row by lr * grad (grad = 1).
    out = step(m, [1, 2, 3])
    torch.testing.assert_close(out, torch.cat([initial[:2], trained_3]))
    assert sorted(t.find(torch.tensor([1, 2, 3])).tolist()) == [0, 1, 2] and len(t) == 3
    torch.testing.assert_close(t.lookup(torch.tensor([1, 2, 3])), out - 0.5)


def test_trainer_with_ttl_eviction_runs_past_the_first_evictions(tmp_path):
    from recis_torchrec.train import Trainer, build_run, load_config

    config = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "synthetic_dlrm.toml")
    run = build_run(load_config(config), overrides={
        "trainer.output_dir": str(tmp_path), "trainer.steps": 40, "trainer.save_every": 0, "trainer.eval_every": 0,
        "trainer.log_every": 10, "trainer.progress": False, "data.batch_size": 64, "data.eval_batches": 1,
        "tables.options.ttl_steps": 8})
    trainer = Trainer(run.model, run.args, run.train_data, run.eval_data, tasks=run.tasks,
                      dense_optimizer=run.dense_optimizer, fused_params=run.fused_params,
                      table_options=run.table_options)
    assert trainer.fit()["steps"] == 40
    assert trainer.table_stats()["evicted"] > 0


BOUNDED = {
    "lru_cap": HashTableOptions(max_capacity=4000, eviction_policy="lru", block_rows=256),
    "lfu_cap": HashTableOptions(max_capacity=4000, eviction_policy="lfu", block_rows=256),
    "ttl": HashTableOptions(ttl_steps=20, block_rows=256),
    "admission": HashTableOptions(admit_threshold=3, admit_capacity=50_000, block_rows=256),
    "admission_cap": HashTableOptions(admit_threshold=3, max_capacity=4000, eviction_policy="lru", block_rows=256),
}


@pytest.mark.parametrize("name", list(BOUNDED))
def test_memory_is_bounded_under_two_million_distinct_ids(name):
    """2M distinct ids (2,000 new a step, plus 200 hot ones that every step sees): after warm-up
    (the first quarter), memory_bytes stays within 5%. A capped table with admission once grew
    16x here, one pending entry per unseen id."""
    m = module(BOUNDED[name], dim=8)
    t = m.tables()["t"]
    hot = list(range(10**9, 10**9 + 200))
    samples = []
    for s in range(1000):
        step(m, list(range(s * 2000, (s + 1) * 2000)) + hot)
        if s >= 250 and s % 50 == 0:
            samples.append(t.memory_bytes())
    assert max(samples) <= 1.05 * samples[0], (name, samples)
    assert t.info()["pending_bytes"] <= t.memory_bytes()
    if BOUNDED[name].admit_threshold:
        assert (t.find(torch.tensor(hot)) >= 0).all()  # the hot ids were admitted
        assert t.info()["pending"] <= (BOUNDED[name].admit_capacity or 8000)


def test_a_forgotten_candidate_counts_again():
    """Past admit_capacity, the candidates seen least recently are forgotten."""
    m = module(HashTableOptions(admit_threshold=2, admit_capacity=100, block_rows=16))
    t = m.tables()["t"]
    step(m, [7])  # one sighting of 7
    for s in range(5):
        step(m, list(range(1000 + 100 * s, 1100 + 100 * s)))  # 500 newer candidates push 7 out
    step(m, [7])
    assert int(t.find(torch.tensor([7]))[0]) == -1  # counted once again, not twice
    step(m, [7])
    assert int(t.find(torch.tensor([7]))[0]) >= 0


@pytest.mark.parametrize("capacity", [1, 2, 100])
def test_an_id_seen_twice_in_a_row_is_admitted_whatever_the_capacity(capacity):
    """Room for new candidates is never made by forgetting an id the batch counts again: with
    admit_capacity=1 and admit_threshold=2 an id seen in two steps in a row was never admitted (each
    step forgot it before counting it)."""
    m = module(HashTableOptions(admit_threshold=2, admit_capacity=capacity, block_rows=16))
    t = m.tables()["t"]
    step(m, [7])
    assert int(t.find(torch.tensor([7]))[0]) == -1
    step(m, [7])
    assert int(t.find(torch.tensor([7]))[0]) >= 0
    # A second candidate past the capacity of 1 still pushes the older one out, as before.
    step(m, [8])
    step(m, [9])
    step(m, [8])
    admitted = int(t.find(torch.tensor([8]))[0]) >= 0
    assert admitted == (capacity > 1)  # with room for one candidate, 9 pushed 8 out and 8 counts from 1 again


def test_ttl_keeps_a_row_seen_exactly_ttl_steps_ago_and_drops_it_one_update_later():
    """The boundary: a row last seen at clock c survives every scan up to clock c + ttl_steps and
    is gone at the first scan after."""
    m = module(HashTableOptions(ttl_steps=5, block_rows=16))
    t = m.tables()["t"]
    step(m, [1])  # seen at clock 0
    for clock in range(1, 6):  # clocks 1..5: 5 - 0 == ttl_steps is not yet stale
        t.evict_stale(clock)
        assert int(t.find(torch.tensor([1]))[0]) >= 0, clock
    t.evict_stale(6)
    assert int(t.find(torch.tensor([1]))[0]) == -1


def test_truncated_normal_redraws_instead_of_clamping():
    """Values outside mean +/- 2 std are redrawn: none sits on a bound (clamping would pile ~4.6%
    of them there), and the spread matches the truncated normal's (std about 0.88 of the normal's)."""
    t = HashTable("tn", 8, 0, HashTableOptions(initializer="truncated_normal", init_mean=1.0, init_std=0.5,
                                              block_rows=1024))
    t.find_or_insert(torch.arange(20_000))
    w = t.export()[1].reshape(-1)
    assert float(w.min()) > 0.0 and float(w.max()) < 2.0
    at_bounds = ((w - 0.0).abs() < 1e-6) | ((w - 2.0).abs() < 1e-6)
    assert int(at_bounds.sum()) == 0
    assert abs(float(w.mean()) - 1.0) < 0.01
    assert abs(float(w.std()) - 0.5 * 0.8796) < 0.01


def test_admission_counts_survive_a_checkpoint(tmp_path):
    """Ids counted toward admission but not yet admitted are saved and loaded: one more sighting
    after the load admits an id seen threshold - 1 times before it."""
    from recis_torchrec import checkpoint

    m = torch.nn.ModuleDict({"m": module(HashTableOptions(admit_threshold=3, block_rows=16))})
    step(m["m"], [5, 6])
    step(m["m"], [5])  # 5 seen twice, 6 once: neither has a row
    checkpoint.save(str(tmp_path), m, step=2)
    fresh = torch.nn.ModuleDict({"m": module(HashTableOptions(admit_threshold=3, block_rows=16))})
    checkpoint.load(str(tmp_path), fresh)
    t = fresh["m"].tables()["t"]
    assert int(t.find(torch.tensor([5]))[0]) == -1
    step(fresh["m"], [5, 6])
    assert int(t.find(torch.tensor([5]))[0]) >= 0  # third sighting
    assert int(t.find(torch.tensor([6]))[0]) == -1  # second


def test_rows_in_use_this_step_are_never_evicted_even_when_new_ids_compete():
    """A full table, then a step whose batch holds old ids and more new ids than the cap frees:
    every old id of the batch keeps its row (and its trained value), only the others go."""
    cap = 64
    m = module(HashTableOptions(max_capacity=cap, eviction_policy="lru", block_rows=16), dim=4)
    t = m.tables()["t"]
    step(m, list(range(cap)))  # full, all seen at clock 0
    keep = list(range(0, cap, 2))  # half of them come back, with more new ids than room
    before = t.lookup(torch.tensor(keep)).clone()
    step(m, keep + list(range(1000, 1000 + cap)))
    assert (t.find(torch.tensor(keep)) >= 0).all()
    assert len(t) <= cap
    moved = t.lookup(torch.tensor(keep)) - before
    torch.testing.assert_close(moved, torch.full_like(moved, -0.5))  # SGD, lr 0.5, grad 1: trained once more


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_find_or_insert_under_a_full_cap_never_frees_a_row_the_same_call_found(policy):
    """``find_or_insert`` on a full table: the ids it finds are in use at its clock, so the room made
    for its new ids comes from other rows. It used to free the found id's row (the oldest) and hand
    it to the new id: both ids got row 0 and the found id's row was gone."""
    t = HashTable("t", 4, options=HashTableOptions(max_capacity=4, eviction_policy=policy, initial_capacity=4))
    assert rt.ops.find_or_insert(t, torch.tensor([1, 2, 3, 4]), clock=0).tolist() == [0, 1, 2, 3]
    trained = torch.full((1, 4), 7.0)
    t.import_(torch.tensor([1]), trained)
    rows = rt.ops.find_or_insert(t, torch.tensor([1, 5]), clock=1)
    assert rows[0] != rows[1] and (rows >= 0).all()
    assert sorted(t.export()[0].tolist()) == [1, 3, 4, 5]  # id 2, the least recently used not in use, went
    torch.testing.assert_close(t.lookup(torch.tensor([1])), trained)
