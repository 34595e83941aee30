# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Hash sharding for TorchRec's DistributedModelParallel."""

from recis_torchrec.distributed.embeddingbag import HASH_SHARDING, ShardedHashEmbeddingBagCollection
from recis_torchrec.distributed.planner import plan
from recis_torchrec.distributed.sharder import HashEmbeddingBagCollectionSharder, sharders

__all__ = [
    "HASH_SHARDING",
    "HashEmbeddingBagCollectionSharder",
    "ShardedHashEmbeddingBagCollection",
    "plan",
    "sharders",
]
