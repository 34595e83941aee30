# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The main job's embedded dataset: deterministic, unbounded, skewed ids; index-addressable batches."""

import numpy as np
import torch

from recis_torchrec.datasets import SyntheticClicks, SyntheticConfig


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


def test_synthetic_batches_are_addressable_and_two_task():
    cfg = SyntheticConfig(num_sparse=2, vocab_size=500)
    stream = SyntheticClicks(cfg, 32, stream_seed=3, num_tasks=2)
    first = [stream.next_batch() for _ in range(3)]
    again = SyntheticClicks(cfg, 32, stream_seed=3, num_tasks=2).batch(2)
    assert torch.equal(first[2].sparse_features.values(), again.sparse_features.values())
    assert first[0].labels.shape == (32, 2)
    conversions, clicks = first[0].labels[:, 1], first[0].labels[:, 0]
    assert bool((conversions <= clicks).all())  # a conversion follows a click
