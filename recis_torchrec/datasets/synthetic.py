# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""A synthetic click dataset with unbounded, skewed ids and a learnable label.

Every sparse feature draws Zipf-distributed ranks that are scrambled into the
whole int64 range, so ids look like hashed user/item ids (no
``num_embeddings`` bound holds). The label follows a hidden logistic model:

    logit = sum_f mean_{id in bag f} theta_f(id) + dense . w + bias

with ``theta_f(id)`` a fixed pseudo-random value per (feature, id). A model
that learns per-id embeddings can recover it, so the loss falls well below
the label entropy.
"""

from dataclasses import dataclass
from typing import Iterator, List

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)


def _mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's fmix64 over a uint64 array (a bijection)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= _M1
        x ^= x >> np.uint64(33)
        x *= _M2
        x ^= x >> np.uint64(33)
    return x


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic data.

    Attributes:
        num_sparse: sparse features, named ``cat_0 ... cat_{n-1}``.
        num_dense: dense float features.
        vocab_size: distinct ids per feature (the Zipf support).
        zipf_alpha: skew of the id distribution; 0 is uniform.
        max_bag: bags hold 1..max_bag ids.
        signal: scale of the hidden per-id effects.
        seed: the data's seed (the hidden model and the samples).
    """

    num_sparse: int = 8
    num_dense: int = 13
    vocab_size: int = 20_000
    zipf_alpha: float = 1.1
    max_bag: int = 3
    signal: float = 1.5
    seed: int = 0

    def feature_names(self) -> List[str]:
        return [f"cat_{i}" for i in range(self.num_sparse)]


class SyntheticClicks:
    """An endless, deterministic stream of ``torchrec.datasets.utils.Batch``.

    Args:
        config: the data's shape.
        batch_size: samples per batch.
        stream_seed: picks the sample stream; the hidden model depends only on
            ``config.seed``, so two streams (train, eval) share one task.
    """

    def __init__(self, config: SyntheticConfig, batch_size: int, stream_seed: int = 0, num_tasks: int = 1) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if num_tasks not in (1, 2):
            raise ValueError(f"num_tasks must be 1 or 2, got {num_tasks}")
        self.config = config
        self.batch_size = batch_size
        self.stream_seed = stream_seed
        self.num_tasks = num_tasks
        self.position = 0  # batches handed out; batch k depends on k only, so the stream can seek
        hidden = np.random.default_rng([config.seed, 7])
        self._dense_w = hidden.normal(0, 0.3, config.num_dense).astype(np.float32)
        self._bias = np.float32(-0.5)
        ranks = np.arange(1, config.vocab_size + 1, dtype=np.float64)
        p = ranks ** -config.zipf_alpha if config.zipf_alpha > 0 else np.ones_like(ranks)
        self._cdf = np.cumsum(p / p.sum())

    def raw_id(self, feature: int, rank: np.ndarray) -> np.ndarray:
        """The int64 id of a rank of a feature: scrambled over the whole int64 range."""
        salt = np.uint64((self.config.seed * 0x9E3779B97F4A7C15 + feature * 0xBF58476D1CE4E5B9) % 2**64)
        return _mix64(rank.astype(np.uint64) ^ salt).view(np.int64)

    def effect(self, feature: int, ids: np.ndarray) -> np.ndarray:
        """theta_f(id): the hidden per-id contribution to the logit."""
        h = _mix64(ids.view(np.uint64) ^ np.uint64(0xD6E8FEB86659FD93 + feature))
        u = (h >> np.uint64(11)).astype(np.float64) / float(2**53)
        return (self.config.signal * (2.0 * u - 1.0)).astype(np.float32)

    def next_batch(self) -> Batch:
        batch = self.batch(self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def batch(self, k: int) -> Batch:
        """Batch k of the stream (deterministic in (config.seed, stream_seed, k))."""
        c, b = self.config, self.batch_size
        rng = np.random.default_rng([c.seed, self.stream_seed, 1, k])
        dense = rng.normal(0, 1, (b, c.num_dense)).astype(np.float32)
        logit = dense @ self._dense_w + self._bias
        lengths = rng.integers(1, c.max_bag + 1, (c.num_sparse, b))
        values = []
        for f in range(c.num_sparse):
            n = int(lengths[f].sum())
            rank = np.searchsorted(self._cdf, rng.random(n), side="right").clip(max=c.vocab_size - 1)
            ids = self.raw_id(f, rank)
            eff = self.effect(f, ids)
            bag = np.repeat(np.arange(b), lengths[f])
            logit += np.bincount(bag, weights=eff, minlength=b).astype(np.float32) / lengths[f]
            values.append(ids)
        labels = (rng.random(b) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        if self.num_tasks == 2:
            # A second, conversion-like task: rarer, and only after a click,
            # driven by the same hidden effects plus the first dense feature.
            cvr = (rng.random(b) < 1.0 / (1.0 + np.exp(-(0.8 * logit + dense[:, 0] - 1.0)))).astype(np.float32)
            labels = np.stack([labels, labels * cvr], 1)
        kjt = KeyedJaggedTensor(
            keys=c.feature_names(),
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(lengths.reshape(-1).astype(np.int64)),
        )
        return Batch(dense_features=torch.from_numpy(dense), sparse_features=kjt, labels=torch.from_numpy(labels))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()


def write_parquet(stream: SyntheticClicks, path: str, num_batches: int, row_group_size: int = 65536) -> int:
    """Writes `num_batches` of a stream to Parquet: ``dense_{i}`` floats, ``cat_{i}``
    ``list<int64>`` bags and ``label``, the layout :func:`synthetic_schema` reads.
    Returns the number of rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    rows = 0
    try:
        for _ in range(num_batches):
            b = stream.next_batch()
            cols = {f"dense_{j}": pa.array(b.dense_features[:, j].numpy()) for j in range(b.dense_features.shape[1])}
            for key, jt in b.sparse_features.to_dict().items():
                offsets = pa.array(jt.offsets().to(torch.int32).numpy())
                cols[key] = pa.ListArray.from_arrays(offsets, pa.array(jt.values().numpy()))
            cols["label"] = pa.array(b.labels.numpy())
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=row_group_size)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def synthetic_schema(config: SyntheticConfig):
    """The ``recis_torchrec.io.Schema`` of files written by :func:`write_parquet`."""
    from recis_torchrec.io import Schema

    return Schema(
        dense=[f"dense_{j}" for j in range(config.num_dense)],
        sparse={f: f for f in config.feature_names()},
        labels=["label"],
    )
