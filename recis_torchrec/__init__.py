# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""recis_torchrec: a TorchRec-compatible backend with dynamic hashtable embeddings.

Unsharded use is one line::

    import recis_torchrec as rt
    model = rt.convert(model)  # every EmbeddingBagCollection becomes hash-backed

and sharded, with TorchRec's DistributedModelParallel::

    model = DistributedModelParallel(model, sharders=rt.sharders(), plan=rt.plan(model, world_size))
"""

from recis_torchrec import _exit  # noqa: F401  (clean exits: background threads joined, gloo quiesced)
from recis_torchrec.distributed import plan, sharders
from recis_torchrec.modules import (
    HashEmbeddingBagCollection,
    HashEmbeddingCollection,
    HashTable,
    HashTableOptions,
    convert,
)

__version__ = "0.1.0"

__all__ = [
    "HashEmbeddingBagCollection",
    "HashEmbeddingCollection",
    "HashTable",
    "HashTableOptions",
    "convert",
    "plan",
    "sharders",
    "__version__",
]

# The subpackages, as attributes on first use (``rt.checkpoint.DCPLoadPlanner``), without importing
# them (and pyarrow, safetensors, torchmetrics) with the package.
_SUBPACKAGES = ("checkpoint", "datasets", "features", "io", "models", "ops", "optim", "testing", "train")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"recis_torchrec.{name}")
    raise AttributeError(f"module 'recis_torchrec' has no attribute {name!r}")
