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


def test_ec_constructor_is_a_positional_prefix():
    from torchrec import EmbeddingCollection

    ours, theirs = _params(rt.HashEmbeddingCollection.__init__), _params(EmbeddingCollection.__init__)
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    for a, b in zip(ours, theirs):
        assert a.default == b.default, a.name
    assert [p.name for p in ours[len(theirs) :]] == ["fused_params", "options"]


def test_ec_methods_and_interfaces_match():
    from typing import Dict

    from torchrec import EmbeddingCollection, JaggedTensor
    from torchrec.modules.embedding_modules import EmbeddingCollectionInterface

    for name in ("forward", "embedding_configs", "need_indices", "embedding_dim", "embedding_names_by_table"):
        ours = inspect.signature(getattr(rt.HashEmbeddingCollection, name))
        theirs = inspect.signature(getattr(EmbeddingCollection, name))
        assert list(ours.parameters) == list(theirs.parameters), name
    assert inspect.signature(rt.HashEmbeddingCollection.forward).return_annotation == Dict[str, JaggedTensor]
    assert issubclass(rt.HashEmbeddingCollection, EmbeddingCollectionInterface)
    assert issubclass(rt.HashEmbeddingCollection, FusedOptimizerModule)
