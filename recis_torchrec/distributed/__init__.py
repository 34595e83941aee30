# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Hash sharding for TorchRec's DistributedModelParallel."""

from recis_torchrec.distributed.embedding import ShardedHashEmbeddingCollection
from recis_torchrec.distributed.embeddingbag import HASH_SHARED, HASH_SHARDING, ShardedHashEmbeddingBagCollection
from recis_torchrec.distributed.planner import plan
from recis_torchrec.distributed.sharder import (
    HashEmbeddingBagCollectionSharder,
    HashEmbeddingCollectionSharder,
    sharders,
)

__all__ = [
    "HASH_SHARED",
    "HASH_SHARDING",
    "HashEmbeddingBagCollectionSharder",
    "HashEmbeddingCollectionSharder",
    "ShardedHashEmbeddingBagCollection",
    "ShardedHashEmbeddingCollection",
    "plan",
    "sharders",
]
