# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Random KeyedJaggedTensors for tests and benchmarks."""

from typing import List, Optional

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def zipf_ids(n: int, num_ids: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` ids in ``[0, num_ids)`` with P(rank k) ~ 1 / k**alpha (alpha 0: uniform).

    Ranks are scattered over the id range by a fixed permutation, so frequent
    ids are not the small ones.
    """
    if alpha <= 0:
        return rng.integers(0, num_ids, size=n, dtype=np.int64)
    ranks = np.arange(1, num_ids + 1, dtype=np.float64)
    p = ranks**-alpha
    p /= p.sum()
    cdf = np.cumsum(p)
    r = np.searchsorted(cdf, rng.random(n), side="right").clip(max=num_ids - 1)
    perm = np.random.default_rng(12345).permutation(num_ids)
    return perm[r].astype(np.int64)


def random_kjt(
    keys: List[str],
    batch_size: int,
    max_len: int,
    num_ids: Optional[int] = None,
    weighted: bool = False,
    seed: int = 0,
    full_range: bool = False,
    min_len: int = 0,
) -> KeyedJaggedTensor:
    """A KJT with random bag lengths in [min_len, max_len].

    Ids are uniform in [0, num_ids), or over the whole int64 range with
    ``full_range`` (including 0, -1, INT64_MIN and INT64_MAX).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (len(keys) * batch_size,), generator=g)
    n = int(lengths.sum())
    if full_range:
        values = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)
        special = torch.tensor([0, -1, -(2**63), 2**63 - 1], dtype=torch.int64)
        k = min(n, special.numel())
        values[:k] = special[:k]
    else:
        values = torch.randint(0, num_ids or 100, (n,), generator=g, dtype=torch.int64)
    weights = torch.rand(n, generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)
