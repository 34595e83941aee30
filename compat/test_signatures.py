# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Signature pins: the drop-in promise, checked against the installed TorchRec.

A TorchRec upgrade that changes what we mirror fails here first.
"""

import inspect

import torch
from torchrec import EmbeddingBagCollection, KeyedTensor
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.optim.fused import FusedOptimizer, FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer

import recis_torchrec as rt


def _params(fn):
    return list(inspect.signature(fn).parameters.values())


def test_ebc_constructor_is_a_positional_prefix():
    ours, theirs = _params(rt.HashEmbeddingBagCollection.__init__), _params(EmbeddingBagCollection.__init__)
    # TorchRec's (self, tables, is_weighted, device) come first, in order, with the same defaults,
    # so every TorchRec call site works unchanged; ours adds fused_params and options after them.
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    for a, b in zip(ours, theirs):
        assert a.default == b.default, a.name
    assert [p.name for p in ours[len(theirs) :]] == ["fused_params", "options"]


def test_ebc_methods_match():
    for name in ("forward", "embedding_bag_configs", "is_weighted"):
        ours = inspect.signature(getattr(rt.HashEmbeddingBagCollection, name))
        theirs = inspect.signature(getattr(EmbeddingBagCollection, name))
        assert list(ours.parameters) == list(theirs.parameters), name
    assert inspect.signature(rt.HashEmbeddingBagCollection.forward).return_annotation is KeyedTensor
    assert isinstance(rt.HashEmbeddingBagCollection.device, property)


def test_interfaces():
    assert issubclass(rt.HashEmbeddingBagCollection, EmbeddingBagCollectionInterface)
    assert issubclass(rt.HashEmbeddingBagCollection, FusedOptimizerModule)
    assert issubclass(rt.HashEmbeddingBagCollection, torch.nn.Module)
    from recis_torchrec.optim import HashFusedOptimizer

    assert issubclass(HashFusedOptimizer, FusedOptimizer) and issubclass(HashFusedOptimizer, KeyedOptimizer)
