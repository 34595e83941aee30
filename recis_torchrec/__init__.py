# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""recis_torchrec: a TorchRec-compatible backend with dynamic hashtable embeddings.

Unsharded use is one line::

    import recis_torchrec as rt
    model = rt.convert(model)  # every EmbeddingBagCollection becomes hash-backed

and sharded, with TorchRec's DistributedModelParallel::

    model = DistributedModelParallel(model, sharders=rt.sharders(), plan=rt.plan(model, world_size))
"""

from recis_torchrec import _exit  # noqa: F401  (clean exits: background threads joined, gloo quiesced)
from recis_torchrec import ops  # noqa: F401  (torch.ops.recis registered, as before the names below load lazily)

__version__ = "0.1.0"

__all__ = [
    "HashEmbeddingBagCollection",
    "HashEmbeddingCollection",
    "HashTable",
    "HashTableOptions",
    "PrefetchTrainPipeline",
    "TablePrefetcher",
    "convert",
    "plan",
    "sharders",
    "__version__",
]

# The public names and the subpackages load on first use (PEP 562): importing one layer (``ops``,
# ``tables``) does not import the layers above it through this package, and ``rt.checkpoint``
# does not bring pyarrow, safetensors or torchmetrics with the package.
_NAMES = {
    "HashEmbeddingBagCollection": "recis_torchrec.modules",
    "HashEmbeddingCollection": "recis_torchrec.modules",
    "convert": "recis_torchrec.modules",
    "PrefetchTrainPipeline": "recis_torchrec.modules",
    "TablePrefetcher": "recis_torchrec.modules",
    "HashTable": "recis_torchrec.tables",
    "HashTableOptions": "recis_torchrec.tables",
    "plan": "recis_torchrec.distributed",
    "sharders": "recis_torchrec.distributed",
}
_SUBPACKAGES = ("checkpoint", "datasets", "distributed", "features", "inference", "io", "models", "modules", "ops",
                "optim", "tables", "testing", "train")


def __getattr__(name: str):
    import importlib

    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value  # once
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"recis_torchrec.{name}")
    raise AttributeError(f"module 'recis_torchrec' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | set(_SUBPACKAGES))
