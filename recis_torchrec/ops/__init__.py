# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Typed wrappers around the ``torch.ops.recis`` ops, with their fake kernels.

Users call these, never ``torch.ops.recis`` directly.
"""

from recis_torchrec.ops.embedding_bag import (
    POOLING_MEAN,
    POOLING_SUM,
    lookup_pooled_forward,
    pooled_backward,
    pooled_backward_update,
    pooled_weight_grad,
    pooled_forward,
    segment_sum_rows,
    sparse_update,
)
from recis_torchrec.ops.features import (
    feature_bucketize,
    feature_concat,
    feature_cross,
    feature_hash,
    feature_mod,
    feature_multi_hash,
    feature_program,
    feature_truncate,
)
from recis_torchrec.ops.files import write_file
from recis_torchrec.ops.hashtable import find, find_or_insert, table_export, table_import
from recis_torchrec.ops.sharding import Buckets, bucketize_dedup, owner_of
from recis_torchrec.ops.strings import arrow_dense, arrow_scalar_ids, hash_string, hash_strings, parse_id_lists

__all__ = [
    "arrow_dense",
    "arrow_scalar_ids",
    "Buckets",
    "bucketize_dedup",
    "owner_of",
    "POOLING_MEAN",
    "POOLING_SUM",
    "feature_bucketize",
    "feature_concat",
    "feature_cross",
    "feature_hash",
    "feature_mod",
    "feature_multi_hash",
    "feature_program",
    "feature_truncate",
    "find",
    "find_or_insert",
    "hash_string",
    "hash_strings",
    "parse_id_lists",
    "lookup_pooled_forward",
    "pooled_backward",
    "pooled_backward_update",
    "pooled_weight_grad",
    "pooled_forward",
    "segment_sum_rows",
    "sparse_update",
    "table_export",
    "table_import",
    "write_file",
]
