# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""FeatureEngine: fused output equals the per-feature reference; specs round-trip; bad specs fail clearly."""

import json
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchrec import KeyedJaggedTensor, KeyedTensor

from recis_torchrec.features import Cross, Feature, FeatureEngine, FeatureSpecError
from recis_torchrec.testing.feature_reference import reference_engine
from recis_torchrec.features import engine as engine_mod

KEYS = ["user", "item", "clicks", "city"]
DENSE = ["price", "age"]


def mixed_specs():
    return [
        Feature("user").hash(salt=True).mod(2**40),
        Feature("item").hash(),
        Feature("price").bucketize([0.0, 1.0, 1.0, 5.0]),
        Cross("user", "item").mod(1000),
        Feature("clicks").truncate(3, side="last").hash(salt=7),
        Feature("clicks", name="clicks_head").truncate(2).mod(97),
        Feature("city").multi_hash(2, salt=True).mod(2**16),
        Feature("age").bucketize([18, 30, 50]).hash(salt=3),
        Cross("clicks", "city", name="clicks_city", salt=11).truncate(4),
        Feature("item", name="item_raw"),
    ]


@st.composite
def raw_kjt(draw, weighted=None):
    B = draw(st.integers(0, 5))
    lengths = [draw(st.integers(0, 6 if k == "clicks" else 2)) for k in KEYS for _ in range(B)]
    n = sum(lengths)
    values = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n))
    w = draw(st.booleans()) if weighted is None else weighted
    kjt = KeyedJaggedTensor(KEYS, torch.tensor(values, dtype=torch.int64), torch.rand(n) if w else None,
                            lengths=torch.tensor(lengths, dtype=torch.int64), stride=B)
    dense = torch.tensor([[draw(st.one_of(st.floats(-10, 60, width=32), st.just(float("nan")))) for _ in DENSE]
                          for _ in range(B)],
                         dtype=torch.float32).reshape(B, len(DENSE))
    return kjt, dense


def assert_kjt_equal(a: KeyedJaggedTensor, b: KeyedJaggedTensor):
    assert a.keys() == b.keys()
    assert torch.equal(a.values(), b.values()), (a.values(), b.values())
    assert torch.equal(a.lengths().long(), b.lengths().long())
    assert a.stride() == b.stride()
    assert (a.weights_or_none() is None) == (b.weights_or_none() is None)
    if a.weights_or_none() is not None:
        torch.testing.assert_close(a.weights(), b.weights(), rtol=0, atol=0)


def chain_specs():
    """Chains that exercise every part of a program: truncations in a row, a cross cut from its end
    (its first pair not the bag's first), a modulus that is not a power of two, steps after a
    multi_hash, a bucketized column hashed and cut, passthrough."""
    return [
        Feature("clicks", name="c_mid").truncate(4).truncate(2, side="last").mod(1000003),
        Cross("clicks", "user", name="cu_tail", salt=5).truncate(3, side="last").hash(salt=2).mod(2**20),
        Cross("user", "clicks", name="uc", salt=6).mod(7).hash(),
        Feature("city", name="city_mh").multi_hash(3, salt=9).mod(1000).hash(salt=1).mod(2**12),
        Feature("price", name="price_h").bucketize([-1.0, 0.0, 10.0]).truncate(1).hash(salt=4).mod(13),
        Feature("item", name="item_mod").mod(2**62 + 1),
    ]


def run_both_paths(specs, kjt, dense, passthrough=False):
    """The engine's output on its one-op CPU program and on its stage-by-stage path (CUDA's), checked equal."""
    engine = FeatureEngine(specs, dense_keys=DENSE, passthrough=passthrough)
    program = engine(kjt, dense=dense)
    with mock.patch.object(engine_mod, "_use_program", lambda values: False):
        staged = engine(kjt, dense=dense)
    assert_kjt_equal(program, staged)
    return program


@given(raw_kjt())
def test_engine_equals_the_unfused_reference(inp):
    kjt, dense = inp
    columns = {k: dense[:, i] for i, k in enumerate(DENSE)}
    for specs in (mixed_specs(), chain_specs()):
        got = run_both_paths(specs, kjt, dense)
        assert_kjt_equal(got, reference_engine(specs, kjt, columns))
        assert got.keys() == FeatureEngine(specs).output_keys()


def test_passthrough_keys_follow_in_input_order():
    g = torch.Generator().manual_seed(0)
    B = 6
    lengths = torch.randint(0, 4, (len(KEYS) * B,), generator=g)
    kjt = KeyedJaggedTensor(KEYS, torch.randint(0, 2**40, (int(lengths.sum()),), generator=g),
                            torch.rand(int(lengths.sum()), generator=g), lengths=lengths, stride=B)
    got = run_both_paths([Feature("user").hash(), Cross("user", "clicks")], kjt, torch.zeros(B, 2), passthrough=True)
    assert got.keys() == ["user", "user_x_clicks", "item", "city"]
    for k in ("item", "city"):
        assert torch.equal(got[k].values(), kjt[k].values()) and torch.equal(got[k].weights(), kjt[k].weights())
        assert torch.equal(got[k].lengths(), kjt[k].lengths())


def test_output_keys_and_declared_order():
    engine = FeatureEngine(mixed_specs(), dense_keys=DENSE)
    assert engine.output_keys() == ["user", "item", "price", "user_x_item", "clicks", "clicks_head", "city_0",
                                    "city_1", "age", "clicks_city", "item_raw"]
    assert engine.input_keys() == ["user", "item", "clicks", "city"]


def test_salted_hash_separates_equal_raw_values_across_features():
    kjt = KeyedJaggedTensor(["a", "b"], torch.tensor([42, 42]), lengths=torch.tensor([1, 1]))
    plain = FeatureEngine([Feature("a").hash(), Feature("b").hash()])(kjt).values()
    salted = FeatureEngine([Feature("a").hash(salt=True), Feature("b").hash(salt=True)])(kjt).values()
    assert plain[0] == plain[1] and salted[0] != salted[1]


@pytest.mark.parametrize("path", ["program", "staged"])
def test_ops_are_fused_across_features(monkeypatch, path):
    """A Criteo-style spec costs one op call on the CPU, and one call per op kind stage by stage
    (CUDA's path), however many features."""
    if path == "staged":
        monkeypatch.setattr(engine_mod, "_use_program", lambda values: False)
    calls = {}
    for name in ("feature_hash", "feature_mod", "feature_cross", "feature_bucketize", "feature_truncate",
                 "feature_multi_hash", "feature_concat", "feature_program"):
        real = getattr(engine_mod.fops, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(engine_mod.fops, name, counted)
    cats = [f"cat_{i}" for i in range(26)]
    specs = ([Feature(c).hash(salt=True).mod(2**20) for c in cats]
             + [Feature(f"int_{i}").bucketize([0, 1, 10, 100]) for i in range(13)]
             + [Cross("cat_0", "cat_1").mod(2**20), Cross("cat_2", "cat_3").mod(2**20), Cross("cat_4", "cat_5")])
    B = 16
    kjt = KeyedJaggedTensor(cats, torch.arange(26 * B), lengths=torch.ones(26 * B, dtype=torch.int64))
    out = FeatureEngine(specs, dense_keys=[f"int_{i}" for i in range(13)])(kjt, dense=torch.rand(B, 13) * 50)
    if path == "program":
        assert calls == {"feature_program": 1}
    else:
        assert calls == {"feature_hash": 1, "feature_cross": 1, "feature_bucketize": 1, "feature_concat": 1}
    assert len(out.keys()) == 42 and out.lengths().numel() == 42 * B


def test_dense_as_tensor_keyed_tensor_or_dict():
    kjt = KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    dense = torch.tensor([[0.5, 7.0], [3.0, -1.0]])
    engine = FeatureEngine([Feature("b").bucketize([1.0, 2.0]), Feature("a")])
    want = engine(kjt, dense=dense, dense_keys=["a_dense", "b"])
    kt = KeyedTensor(["a_dense", "b"], [1, 1], dense)
    assert_kjt_equal(engine(kjt, dense=kt), want)
    assert_kjt_equal(engine(kjt, dense={"b": dense[:, 1]}), want)
    assert want.to_dict()["b"].values().tolist() == [2, 0]


def test_spec_round_trips_through_dict_and_json():
    engine = FeatureEngine(mixed_specs(), dense_keys=DENSE)
    d = json.loads(json.dumps(engine.to_dict()))
    again = FeatureEngine.from_dict(d)
    assert again.specs == engine.specs and again.dense_keys == DENSE
    assert again.to_dict() == engine.to_dict()


def test_bad_specs_raise_clear_errors():
    with pytest.raises(FeatureSpecError, match="sorted.*0.5 follows 2.0"):
        Feature("price").bucketize([1.0, 2.0, 0.5])
    with pytest.raises(FeatureSpecError, match="truncate length must be an integer > 0, got 0"):
        Feature("clicks").truncate(0)
    with pytest.raises(FeatureSpecError, match="truncate side"):
        Feature("clicks").truncate(3, side="middle")
    with pytest.raises(FeatureSpecError, match="mod modulus"):
        Feature("a").mod(0)
    with pytest.raises(FeatureSpecError, match="bucketize .* must come first"):
        Feature("a").hash().bucketize([1.0])
    with pytest.raises(FeatureSpecError, match="finite"):
        Feature("a").bucketize([1.0, float("nan")])
    with pytest.raises(FeatureSpecError, match=r"output keys \['a'\] are produced more than once"):
        FeatureEngine([Feature("a"), Feature("b", name="a")])
    kjt = KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    with pytest.raises(FeatureSpecError, match="feature 'user': input key 'user' is not in the KJT"):
        FeatureEngine([Feature("user").hash()])(kjt)
    with pytest.raises(FeatureSpecError, match="cross 'a_x_zip': input key 'zip' is not in the KJT"):
        FeatureEngine([Cross("a", "zip")])(kjt)
    with pytest.raises(FeatureSpecError, match="'price'.*no dense input"):
        FeatureEngine([Feature("price").bucketize([1.0])])(kjt)
    with pytest.raises(FeatureSpecError, match="dense column 'price' is not among the dense keys"):
        FeatureEngine([Feature("price").bucketize([1.0])])(kjt, dense=torch.zeros(1, 1), dense_keys=["age"])
    with pytest.raises(FeatureSpecError, match="dense has 3 rows but the KJT's batch size is 1"):
        FeatureEngine([Feature("price").bucketize([1.0])])(kjt, dense=torch.zeros(3, 1), dense_keys=["price"])
    with pytest.raises(FeatureSpecError, match="unknown op"):
        FeatureEngine.from_dict({"version": 1, "features": [{"type": "feature", "source": "a",
                                                               "ops": [{"op": "sqrt"}]}]})
    with pytest.raises(TypeError, match="int64 or int32 ids"):
        FeatureEngine([Feature("a")])(KeyedJaggedTensor(["a"], torch.tensor([1.5]), lengths=torch.tensor([1])))
