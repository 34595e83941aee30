# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""End to end on real data, 2 ranks under torchrun (skipped when the shared data is absent).

The thresholds are recorded in the README with the AUCs the runs reach.
"""

import os

import pytest

from tests.conftest import SHARED_DATA
from tests.distributed.test_main_job_torchrun import final_aucs, torchrun_train

CRITEO = os.path.join(SHARED_DATA, "criteo", "wide_resdnn")
MOVIELENS = os.path.join(SHARED_DATA, "ml-100k")

CRITEO_MIN_AUC = 0.65
MOVIELENS_MIN_AUC = 0.65


@pytest.mark.skipif(not os.path.exists(os.path.join(CRITEO, "train.csv")), reason="the Criteo sample is absent")
def test_criteo_sample_train_then_dev_and_test(tmp_path):
    out = torchrun_train(
        "criteo_dlrm.toml", tmp_path / "criteo",
        "--data", os.path.join(CRITEO, "train.csv"),
        "--eval-data", os.path.join(CRITEO, "dev.csv") + "," + os.path.join(CRITEO, "test.csv"),
    )
    assert "on files" in out and "sharded over 2 ranks" in out
    auc = final_aucs(out)["ctr"]
    print(f"Criteo sample: eval AUC {auc:.4f}")
    assert auc > CRITEO_MIN_AUC


@pytest.mark.skipif(not os.path.exists(os.path.join(MOVIELENS, "u.data")), reason="MovieLens-100k is absent")
def test_movielens_chronological_split(tmp_path):
    out = torchrun_train("movielens_dlrm.toml", tmp_path / "ml", "--set", f'data.path="{MOVIELENS}"')
    assert "MovieLens-100k" in out
    auc = final_aucs(out)["ctr"]
    print(f"MovieLens-100k: eval AUC {auc:.4f}")
    assert auc > MOVIELENS_MIN_AUC


@pytest.mark.skipif(not os.path.exists(os.path.join(MOVIELENS, "u.data")), reason="MovieLens-100k is absent")
def test_movielens_with_a_feature_spec(tmp_path):
    out = torchrun_train("movielens_features.toml", tmp_path / "mlf", "--set", f'data.path="{MOVIELENS}"')
    auc = final_aucs(out)["ctr"]
    print(f"MovieLens-100k with features: eval AUC {auc:.4f}")
    assert auc > MOVIELENS_MIN_AUC


@pytest.mark.skipif(not os.path.exists(os.path.join(MOVIELENS, "u.data")), reason="MovieLens-100k is absent")
def test_movielens_prepare_is_chronological(tmp_path):
    import pyarrow.parquet as pq

    from recis_torchrec.datasets.movielens import prepare

    train, held = prepare(MOVIELENS, str(tmp_path), eval_fraction=0.2)
    t, h = pq.read_table(train), pq.read_table(held)
    assert t.num_rows + h.num_rows == 100_000 and h.num_rows == 20_000
    assert max(t.column("timestamp").to_pylist()) <= min(h.column("timestamp").to_pylist())
    labels = t.column("label").to_pylist()
    assert 0.4 < sum(labels) / len(labels) < 0.7  # ratings >= 4 are a bit more than half
