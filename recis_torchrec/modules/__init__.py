# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
from recis_torchrec.modules.convert import convert
from recis_torchrec.modules.hash_embedding_bag import HashEmbeddingBagCollection
from recis_torchrec.modules.hash_embedding_collection import HashEmbeddingCollection
from recis_torchrec.modules.prefetch import PrefetchTrainPipeline, TablePrefetcher
from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.tables.options import HashTableOptions

__all__ = ["HashEmbeddingBagCollection", "HashEmbeddingCollection", "HashTable", "HashTableOptions",
           "PrefetchTrainPipeline", "TablePrefetcher", "convert"]
