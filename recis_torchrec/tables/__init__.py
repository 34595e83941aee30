# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The tables layer: a hash table and its rows (``HashTable``), its options, the table factory,
row ownership across ranks and the tables' state dicts. No ``nn.Module`` and no optimizer here:
the TorchRec modules (``recis_torchrec.modules``) and the fused optimizers (``recis_torchrec.optim``)
are built on it."""

from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.tables.options import HashTableOptions

__all__ = ["HashTable", "HashTableOptions"]
