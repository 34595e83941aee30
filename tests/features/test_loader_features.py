# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The loader applies a FeatureEngine while reading: batches equal the engine applied afterwards."""

import dataclasses

import pytest
import torch

from recis_torchrec.features import Cross, Feature, FeatureEngine, FeatureSpecError
from recis_torchrec.io import ColumnarDataset, criteo_schema
from recis_torchrec.io.criteo import convert
from tests.train.test_trainer import _tiny_criteo_tsv


def _specs():
    return [
        Feature("cat_0").hash(salt=True).mod(1000),
        Feature("I1").bucketize([0.5, 1.0, 2.0, 3.0]),  # the loader's dense columns are log1p'd
        Cross("cat_1", "cat_2").mod(2**20),
        Feature("cat_3"),
    ]


def test_loader_applies_the_engine_while_reading(tmp_path):
    _tiny_criteo_tsv(str(tmp_path / "day.tsv"), rows=300)
    path = str(tmp_path / "day.parquet")
    convert(str(tmp_path / "day.tsv"), path, progress=False)
    schema = criteo_schema()
    engine = FeatureEngine(_specs())
    plain = list(ColumnarDataset(path, schema, 64))
    raw = list(ColumnarDataset(path, dataclasses.replace(schema, dense_transform="none"), 64))
    featured = list(ColumnarDataset(path, schema, 64, features=engine))
    assert len(plain) == len(featured) == 5
    for a, r, b in zip(plain, raw, featured):
        # bucketize reads the raw counts; the model gets them after log1p.
        want = engine(r.sparse_features, dense=r.dense_features, dense_keys=list(schema.dense))
        assert b.sparse_features.keys() == ["cat_0", "I1", "cat_1_x_cat_2", "cat_3"]
        assert torch.equal(b.sparse_features.values(), want.values())
        assert torch.equal(b.sparse_features.lengths(), want.lengths())
        assert torch.equal(b.dense_features, a.dense_features) and torch.equal(b.labels, a.labels)


def test_loader_rejects_features_the_schema_lacks(tmp_path):
    _tiny_criteo_tsv(str(tmp_path / "day.tsv"), rows=10)
    path = str(tmp_path / "day.parquet")
    convert(str(tmp_path / "day.tsv"), path, progress=False)
    with pytest.raises(FeatureSpecError, match="input key 'user' is not a sparse key of the schema"):
        ColumnarDataset(path, criteo_schema(), 4, features=FeatureEngine([Feature("user").hash()]))
    with pytest.raises(FeatureSpecError, match="dense column 'price' is not a dense column"):
        ColumnarDataset(path, criteo_schema(), 4, features=FeatureEngine([Feature("price").bucketize([1.0])]))
