# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""ColumnIO: columnar files (Parquet, ORC, CSV/TSV) -> TorchRec batches with KJTs."""

from recis_torchrec.io.arrow import ColumnError, to_batch
from recis_torchrec.ops import hash_string
from recis_torchrec.io.dataset import ColumnarDataset, dense_stats, rank_batch_sizes
from recis_torchrec.io.schema import Schema, criteo_schema
from recis_torchrec.io.sources import SourceError

__all__ = [
    "ColumnError",
    "ColumnarDataset",
    "Schema",
    "SourceError",
    "criteo_schema",
    "dense_stats",
    "hash_string",
    "rank_batch_sizes",
    "to_batch",
]
