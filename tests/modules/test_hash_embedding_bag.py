# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""HashEmbeddingBagCollection against torchrec.EmbeddingBagCollection."""

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import PoolingType

import recis_torchrec as rt
from recis_torchrec.testing import random_kjt

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def configs(pooling=PoolingType.SUM, shared=False):
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=50, feature_names=["f0", "f1"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=30, feature_names=["f2"], pooling=pooling),
        EmbeddingBagConfig(
            name="t2", embedding_dim=16, num_embeddings=20, feature_names=["f1" if shared else "f3"], pooling=pooling
        ),
    ]


def features_of(tables):
    return sorted({f for t in tables for f in t.feature_names})


# nn.EmbeddingBag, and so TorchRec's EBC, takes per-sample weights with sum
# pooling only; weighted mean is checked against a direct computation below.
@pytest.mark.parametrize("pooling, weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)])
@pytest.mark.parametrize("shared", [False, True])
def test_forward_parity_after_convert(pooling, weighted, shared):
    tables = configs(pooling, shared)
    ebc = EmbeddingBagCollection(tables, is_weighted=weighted)
    hebc = rt.convert(ebc)
    assert isinstance(hebc, rt.HashEmbeddingBagCollection)
    keys = features_of(tables)[::-1] + ["extra"]  # other key order, plus a key no table reads
    kjt = random_kjt(keys, batch_size=6, max_len=4, num_ids=20, weighted=weighted, seed=1)
    expected, got = ebc(kjt), hebc(kjt)
    assert isinstance(got, KeyedTensor)
    assert got.keys() == expected.keys()
    assert got.length_per_key() == expected.length_per_key()
    torch.testing.assert_close(got.values(), expected.values(), atol=1e-6, rtol=1e-6)
    # Forward inserted no row outside the imported ones (ids < 20 <= num_embeddings).
    for c in tables:
        assert len(hebc.tables()[c.name]) == c.num_embeddings


def test_weighted_mean_divides_by_bag_length():
    tables = configs(PoolingType.MEAN)
    hebc = rt.HashEmbeddingBagCollection(tables, is_weighted=True)
    kjt = random_kjt(["f0", "f1", "f2", "f3"], 4, 3, num_ids=10, weighted=True, seed=2)
    out = hebc(kjt)
    f0 = kjt["f0"]
    emb = hebc.tables()["t0"].lookup(f0.values())
    w = f0.weights()
    start = 0
    for b, length in enumerate(f0.lengths().tolist()):
        expected = (emb[start : start + length] * w[start : start + length, None]).sum(0) / max(length, 1)
        torch.testing.assert_close(out["f0"][b], expected, atol=1e-6, rtol=1e-6)
        start += length


def test_unbounded_ids_empty_bags_duplicates_and_empty_batch():
    hebc = rt.HashEmbeddingBagCollection(configs())
    values = torch.tensor([INT64_MIN, INT64_MAX, INT64_MAX, -1, 0, 2**40, INT64_MAX], dtype=torch.int64)
    # f0: [MIN, MAX, MAX] []   f1: [] [-1]   f2: [0] [2**40]   f3: [] [MAX]
    lengths = torch.tensor([3, 0, 0, 1, 1, 1, 0, 1])
    kjt = KeyedJaggedTensor(keys=["f0", "f1", "f2", "f3"], values=values, lengths=lengths)
    out = hebc(kjt)
    t0 = hebc.tables()["t0"]
    e = t0.lookup(torch.tensor([INT64_MIN, INT64_MAX]))
    torch.testing.assert_close(out["f0"][0], e[0] + 2 * e[1])
    assert (out["f0"][1] == 0).all() and (out["f1"][0] == 0).all()
    assert len(t0) == 3 and len(hebc.tables()["t1"]) == 2 and len(hebc.tables()["t2"]) == 1

    empty = KeyedJaggedTensor(
        keys=["f0", "f1", "f2", "f3"], values=torch.empty(0, dtype=torch.int64), lengths=torch.empty(0, dtype=torch.int64)
    )
    out = hebc(empty)
    assert out.values().shape == (0, 8 + 8 + 4 + 16)
    out.values().sum().backward()  # an empty step is a no-op, not an error


def test_eval_mode_inserts_nothing_and_reads_initial_values():
    hebc = rt.HashEmbeddingBagCollection(configs())
    kjt = random_kjt(["f0", "f1", "f2", "f3"], 4, 3, num_ids=1000, seed=3)
    hebc.eval()
    with torch.no_grad():
        out_eval = hebc(kjt).values()
    assert all(len(t) == 0 for t in hebc.tables().values())
    hebc.train()
    with torch.no_grad():
        out_train = hebc(kjt).values()
    assert len(hebc.tables()["t0"]) > 0
    torch.testing.assert_close(out_eval, out_train)


def test_input_errors_name_the_feature():
    hebc = rt.HashEmbeddingBagCollection(configs(), is_weighted=True)
    good = random_kjt(["f0", "f1", "f2", "f3"], 2, 2, weighted=True, seed=4)
    with pytest.raises(KeyError, match="feature 'f3' .*missing"):
        hebc(random_kjt(["f0", "f1", "f2"], 2, 2, weighted=True))
    lengths = good.lengths().clone()
    with pytest.raises(ValueError, match="lengths sum to .* per feature: .*'f0'"):
        hebc(KeyedJaggedTensor(keys=good.keys(), values=good.values()[:-1], lengths=lengths, weights=good.weights()[:-1]))
    bad = lengths.clone()
    bad[2], bad[3] = -1, bad[3] + 1 + bad[2]
    with pytest.raises(ValueError, match="feature 'f1' has a negative length"):
        hebc(KeyedJaggedTensor(keys=good.keys(), values=good.values(), lengths=bad, weights=good.weights()))
    with pytest.raises(TypeError, match="must be int64 or int32, got torch.float32"):
        hebc(KeyedJaggedTensor(keys=good.keys(), values=good.values().float(), lengths=lengths, weights=good.weights()))
    with pytest.raises(TypeError, match="weights of features .*'f0'.* must be float32, got torch.float64"):
        hebc(KeyedJaggedTensor(keys=good.keys(), values=good.values(), lengths=lengths, weights=good.weights().double()))
    with pytest.raises(ValueError, match="has no weights"):
        hebc(KeyedJaggedTensor(keys=good.keys(), values=good.values(), lengths=lengths))
    with pytest.raises(ValueError, match="unsupported; supported"):
        rt.HashEmbeddingBagCollection(configs(), fused_params={"optimizer": EmbOptimType.MADGRAD})
    with pytest.raises(ValueError, match="is not an EmbOptimType"):
        rt.HashEmbeddingBagCollection(configs(), fused_params={"optimizer": "rmsprop"})
    with pytest.raises(ValueError, match="unsupported keys \\['lr'\\]"):
        rt.HashEmbeddingBagCollection(configs(), fused_params={"lr": 0.1})
    with pytest.raises(ValueError, match="options names tables \\['nope'\\]"):
        rt.HashEmbeddingBagCollection(configs(), options={"nope": rt.HashTableOptions()})


def test_int32_ids_are_accepted():
    hebc = rt.HashEmbeddingBagCollection(configs())
    kjt = random_kjt(["f0", "f1", "f2", "f3"], 3, 3, seed=5)
    kjt32 = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().int(), lengths=kjt.lengths())
    torch.testing.assert_close(hebc(kjt).values(), hebc(kjt32).values())


def test_embedding_bag_configs_and_interface():
    tables = configs()
    hebc = rt.HashEmbeddingBagCollection(tables, is_weighted=True)
    assert hebc.embedding_bag_configs() is tables
    assert hebc.is_weighted() and hebc.device == torch.device("cpu")
    assert list(hebc.parameters()) == []
    stats = hebc.table_stats()
    assert set(stats) == {"t0", "t1", "t2"} and stats["t0"]["rows"] == 0


def test_state_dict_round_trip_and_torchrec_migration():
    tables = configs()
    hebc = rt.HashEmbeddingBagCollection(tables)
    kjt = random_kjt(["f0", "f1", "f2", "f3"], 4, 3, full_range=True, seed=6)
    hebc(kjt)
    sd = hebc.state_dict()
    assert set(sd) == {f"embedding_bags.t{i}.{k}" for i in range(3) for k in ("weight", "ids")}
    fresh = rt.HashEmbeddingBagCollection(configs())
    fresh.load_state_dict(sd)
    hebc.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(kjt).values(), hebc(kjt).values())

    # A TorchRec EBC state dict (weights only) loads as ids 0..n-1.
    ebc = EmbeddingBagCollection(configs())
    migrated = rt.HashEmbeddingBagCollection(configs())
    migrated.load_state_dict(ebc.state_dict())
    bounded = random_kjt(["f0", "f1", "f2", "f3"], 4, 3, num_ids=20, seed=7)
    migrated.eval()
    torch.testing.assert_close(migrated(bounded).values(), ebc(bounded).values(), atol=1e-6, rtol=1e-6)

    with pytest.raises(RuntimeError, match="Missing key"):
        rt.HashEmbeddingBagCollection(configs()).load_state_dict({})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        rt.HashEmbeddingBagCollection(configs()).load_state_dict({**sd, "bogus": torch.zeros(1)})
    bad = dict(sd)
    bad["embedding_bags.t1.weight"] = torch.zeros(sd["embedding_bags.t1.ids"].numel(), 5)
    with pytest.raises(RuntimeError, match="table 't1': expected weight"):
        rt.HashEmbeddingBagCollection(configs()).load_state_dict(bad)


def test_deepcopy_copies_tables():
    hebc = rt.HashEmbeddingBagCollection(configs(), fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD})
    kjt = random_kjt(["f0", "f1", "f2", "f3"], 4, 3, seed=8)
    hebc(kjt).values().sum().backward()
    clone = copy.deepcopy(hebc)
    assert clone.tables()["t0"].handle != hebc.tables()["t0"].handle
    clone.eval()
    hebc.eval()
    torch.testing.assert_close(clone(kjt).values(), hebc(kjt).values())
    # The clone's optimizer updates the clone's tables.
    clone.train()
    clone(kjt).values().sum().backward()
    assert not torch.equal(clone.eval()(kjt).values(), hebc(kjt).values())


def test_convert_replaces_nested_ebcs():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.ModuleDict({"ebc": EmbeddingBagCollection(configs())})
            self.linear = torch.nn.Linear(2, 2)

    m = rt.convert(Model(), fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 1e-3})
    assert isinstance(m.inner["ebc"], rt.HashEmbeddingBagCollection)
    assert m.inner["ebc"].fused_optimizer.param_groups[0]["lr"] == 1e-3


def test_huge_num_embeddings_is_only_a_hint():
    # A hash-space size in num_embeddings must not reserve memory for it.
    tables = [EmbeddingBagConfig(name="big", embedding_dim=32, num_embeddings=2**40, feature_names=["f"])]
    hebc = rt.HashEmbeddingBagCollection(tables, fused_params={"optimizer": EmbOptimType.ADAM})
    info = hebc.tables()["big"].info()
    assert info["capacity"] <= 2**20 + info["block_rows"]
    assert info["memory_bytes"] < 2**31
    out = hebc(KeyedJaggedTensor(keys=["f"], values=torch.tensor([2**39, 5]), lengths=torch.tensor([1, 1])))
    assert out.values().shape == (2, 32)


def test_eval_forward_from_four_threads_equals_one_thread():
    import threading

    hebc = rt.HashEmbeddingBagCollection(configs(), fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD})
    for s in range(3):
        hebc(random_kjt(["f0", "f1", "f2", "f3"], 8, 4, num_ids=200, seed=s)).values().sum().backward()
    hebc.eval()
    kjts = [random_kjt(["f0", "f1", "f2", "f3"], 16, 6, num_ids=400, seed=100 + i) for i in range(40)]
    with torch.no_grad():
        want = [hebc(k).values() for k in kjts]
    got, errors = {}, []

    def worker(t):
        try:
            with torch.no_grad():
                for i in range(t, len(kjts), 4):
                    got[i] = hebc(kjts[i]).values()
        except BaseException as e:  # noqa: B902
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i, w in enumerate(want):
        assert torch.equal(got[i], w), i


def test_training_and_eval_on_one_module_from_two_threads_do_not_corrupt_it():
    """The table ops take the table's lock (shared for lookups, exclusive for inserts and updates),
    so a training thread and an eval thread interleave whole ops; the table stays consistent."""
    import copy
    import threading

    hebc = rt.HashEmbeddingBagCollection(
        configs(), fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1},
        options=rt.HashTableOptions(max_capacity=300, eviction_policy="lru", block_rows=64))
    evaluator = copy.copy(hebc)  # the same tables; its own training flag
    evaluator.eval()
    errors = []

    def train():
        try:
            for s in range(60):
                hebc(random_kjt(["f0", "f1", "f2", "f3"], 16, 6, num_ids=5000, seed=s)).values().sum().backward()
        except BaseException as e:  # noqa: B902
            errors.append(e)

    def evaluate():
        try:
            with torch.no_grad():
                for s in range(60):
                    out = evaluator(random_kjt(["f0", "f1", "f2", "f3"], 16, 6, num_ids=5000, seed=1000 + s)).values()
                    assert torch.isfinite(out).all()
        except BaseException as e:  # noqa: B902
            errors.append(e)

    threads = [threading.Thread(target=train), threading.Thread(target=evaluate)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in hebc.tables().values():
        ids, w, _ = t.export()
        assert len(t) <= 300 and ids.unique().numel() == ids.numel() and torch.isfinite(w).all()
        assert torch.equal(t.find(ids) >= 0, torch.ones_like(ids, dtype=torch.bool))


def test_state_dict_and_deepcopy_while_another_thread_trains():
    """Each table is exported under its lock: a state dict or a copy taken during training is one
    consistent state of every table (ids and rows agree), never a torn one."""
    import threading

    hebc = rt.HashEmbeddingBagCollection(configs(), fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD})
    errors, done = [], threading.Event()

    def train():
        try:
            for s in range(80):
                hebc(random_kjt(["f0", "f1", "f2", "f3"], 16, 6, num_ids=3000, seed=s)).values().sum().backward()
        except BaseException as e:  # noqa: B902
            errors.append(e)
        finally:
            done.set()

    th = threading.Thread(target=train)
    th.start()
    snapshots = 0
    while not done.is_set() or snapshots < 3:
        sd = hebc.state_dict()
        for name in ("t0", "t1", "t2"):
            ids, w = sd[f"embedding_bags.{name}.ids"], sd[f"embedding_bags.{name}.weight"]
            assert ids.shape[0] == w.shape[0] and ids.unique().numel() == ids.numel()
        clone = copy.deepcopy(hebc)
        assert all(len(t) >= 0 for t in clone.tables().values())
        snapshots += 1
    th.join()
    assert not errors, errors


def test_forward_leaves_the_callers_kjt_as_it_came_so_an_exported_program_takes_any_kjt():
    # A forward that cached offsets on the caller's KJT made a program exported after it take them
    # as an input: a later KJT built from lengths alone failed ('NoneType' object has no attribute
    # 'size'). TorchRec's EBC passes the same check.
    def model(ebc):
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ebc = ebc

            def forward(self, kjt):
                return self.ebc(kjt).values()

        return M().eval()

    def fresh():
        return KeyedJaggedTensor.from_lengths_sync(keys=["b", "a"], values=torch.tensor([1, 2, 3, 4, 5, 6]),
                                                   lengths=torch.tensor([1, 2, 0, 2, 1, 0]))

    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["a"]),
               EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["b"])]
    for ebc in (EmbeddingBagCollection(configs), rt.convert(EmbeddingBagCollection(configs))):
        m = model(ebc)
        kjt = fresh()
        want = m(kjt)
        assert kjt.offsets_or_none() is None  # as it came
        program = torch.export.export(m, (kjt,), strict=False)
        assert torch.equal(program.module()(fresh()), want), type(ebc).__name__
