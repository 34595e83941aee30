# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The main job trains: held-out loss falls and AUC rises (the job checks it itself)."""

import numpy as np
import torch

from recis_torchrec.datasets import SyntheticClicks, SyntheticConfig
from recis_torchrec.examples import train_dlrm


def test_main_job_loss_falls(capsys):
    rc = train_dlrm.main(["--steps", "120", "--batch-size", "256", "--log-every", "40", "--eval-batches", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "examples/s" in out and "eval log loss" in out


def test_synthetic_data_is_deterministic_and_unbounded():
    cfg = SyntheticConfig(num_sparse=3, vocab_size=1000)
    a, b = SyntheticClicks(cfg, 64, 0).next_batch(), SyntheticClicks(cfg, 64, 0).next_batch()
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.labels, b.labels)
    ids = a.sparse_features.values()
    assert ids.dtype == torch.int64 and (ids < 0).any() and ids.abs().max() > 2**40
    assert a.sparse_features.keys() == ["cat_0", "cat_1", "cat_2"]
    other = SyntheticClicks(cfg, 64, 1).next_batch()
    assert not torch.equal(other.sparse_features.values(), ids)
    # Skewed: the most frequent id of a feature recurs much more than uniform would give.
    counts = np.unique(ids.numpy(), return_counts=True)[1]
    assert counts.max() >= 5


def test_main_job_through_the_loader_reports_data_wait(capsys):
    rc = train_dlrm.main(
        ["--via-loader", "--steps", "60", "--batch-size", "256", "--log-every", "30", "--eval-batches", "4"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "via Parquet and ColumnarDataset" in out and "data wait" in out


def test_main_job_trains_on_the_criteo_sample(capsys):
    import os

    import pytest

    from tests.conftest import SHARED_DATA

    train = os.path.join(SHARED_DATA, "criteo", "wide_resdnn", "train.csv")
    dev = os.path.join(SHARED_DATA, "criteo", "wide_resdnn", "dev.csv")
    if not os.path.exists(train):
        pytest.skip("../shared/data is absent")
    rc = train_dlrm.main(
        ["--data", train, "--eval-data", dev, "--steps", "40", "--batch-size", "128", "--log-every", "20",
         "--eval-batches", "3"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "DLRM on 26 hash tables" in out and "Criteo files" in out and "final      eval log loss" in out
