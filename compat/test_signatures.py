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
    assert [p.name for p in ours[len(theirs) :]] == ["fused_params", "options", "table_fused_params"]


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
    assert [p.name for p in ours[len(theirs) :]] == ["fused_params", "options", "share_tables_with", "table_fused_params"]


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


def test_sharders_are_torchrecs_with_the_same_shard_signature():
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ModuleSharder
    from torchrec import EmbeddingCollection

    ebc_sharder, ec_sharder = rt.sharders()
    assert isinstance(ebc_sharder, EmbeddingBagCollectionSharder) and isinstance(ebc_sharder, ModuleSharder)
    assert isinstance(ec_sharder, EmbeddingCollectionSharder)
    assert ebc_sharder.module_type is EmbeddingBagCollection
    assert ec_sharder.module_type is EmbeddingCollection
    for ours, theirs in ((type(ebc_sharder), EmbeddingBagCollectionSharder), (type(ec_sharder), EmbeddingCollectionSharder)):
        assert list(inspect.signature(ours.shard).parameters) == list(inspect.signature(theirs.shard).parameters)
        # TorchRec's constructor arguments come first, in order.
        theirs_init = [p.name for p in _params(theirs.__init__)]
        assert [p.name for p in _params(ours.__init__)][: len(theirs_init)] == theirs_init


def test_sharded_modules_implement_torchrecs_sharded_module():
    from torchrec.distributed.embedding import ShardedEmbeddingCollection
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
    from torchrec.distributed.types import ShardedModule

    from recis_torchrec.distributed import ShardedHashEmbeddingBagCollection, ShardedHashEmbeddingCollection

    pairs = (
        (ShardedHashEmbeddingBagCollection, ShardedEmbeddingBagCollection),
        (ShardedHashEmbeddingCollection, ShardedEmbeddingCollection),
    )
    for cls, torchrec_cls in pairs:
        assert issubclass(cls, ShardedModule) and issubclass(cls, FusedOptimizerModule)
        for name in ("input_dist", "compute", "output_dist", "create_context"):
            ours = list(inspect.signature(getattr(cls, name)).parameters)
            theirs = list(inspect.signature(getattr(torchrec_cls, name)).parameters)
            assert ours == theirs, (cls.__name__, name)


def test_plan_returns_a_torchrec_sharding_plan_of_parameter_shardings():
    from torchrec import EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
    from torchrec.distributed.types import ParameterSharding, ShardingPlan

    model = torch.nn.Module()
    model.ebc = EmbeddingBagCollection(
        [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])],
        device=torch.device("meta"),
    )
    model.ec = EmbeddingCollection(
        [EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["g"])],
        device=torch.device("meta"),
    )
    plan = rt.plan(model, world_size=2, share_tables=True)
    assert isinstance(plan, ShardingPlan)
    assert isinstance(plan.plan["ebc"]["t"], ParameterSharding)
    assert plan.plan["ebc"]["t"].sharding_type == rt.distributed.HASH_SHARDING
    assert plan.plan["ec"]["t"].compute_kernel == rt.distributed.HASH_SHARED
