# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The sharder that DistributedModelParallel picks for ``torchrec.EmbeddingBagCollection``."""

from typing import Any, Dict, List, Optional

import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ParameterSharding, ShardedModule, ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recis_torchrec.distributed.embeddingbag import HASH_SHARDING, ShardedHashEmbeddingBagCollection
from recis_torchrec.modules.hash_embedding_bag import OptionsArg


class HashEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """TorchRec's ``EmbeddingBagCollectionSharder``, plus hash sharding.

    Tables whose plan entry has ``sharding_type == HASH_SHARDING`` become
    dynamic hash tables sharded by id; every other table is sharded by
    TorchRec itself, exactly as ``EmbeddingBagCollectionSharder`` would. Both
    kinds can sit in one EBC.

    ``fused_params`` serve both kinds (TorchRec's TBE takes the same keys).
    The hash type is not advertised in ``sharding_types()``, so TorchRec's
    planner, which cannot plan it, keeps working with this sharder; use
    :func:`recis_torchrec.plan` to put tables on it.
    """

    def __init__(
        self,
        fused_params: Optional[Dict[str, Any]] = None,
        options: OptionsArg = None,
        merge_tables: bool = True,
        qcomm_codecs_registry: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._hash_fused_params = fused_params
        self._options = options
        self._merge_tables = merge_tables

    def shard(
        self,
        module: EmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedModule:
        where = module_fqn or "EmbeddingBagCollection"
        tables = {c.name: c for c in module.embedding_bag_configs()}
        unknown = sorted(set(params) - set(tables))
        if unknown:
            raise ValueError(f"{where}: the sharding plan names tables {unknown} that are not in it ({sorted(tables)})")
        hash_params = {n: p for n, p in params.items() if p.sharding_type == HASH_SHARDING}
        if not hash_params:
            return super().shard(module, params, env, device, module_fqn)
        if device is not None and torch.device(device).type != "cpu":
            raise NotImplementedError(f"{where}: hash sharding runs on CPU for now, got device {device}")
        for name, p in hash_params.items():
            if p.ranks is not None and len(p.ranks) != env.world_size:
                raise ValueError(
                    f"{where}: table {name!r} is planned over {len(p.ranks)} ranks but the world size is "
                    f"{env.world_size}; rebuild the plan with recis_torchrec.plan(model, world_size={env.world_size})"
                )
        missing = sorted(set(tables) - set(params))
        if missing:
            raise ValueError(f"{where}: the sharding plan has no entry for tables {missing}")
        child = None
        other = {n: p for n, p in params.items() if n not in hash_params}
        if other:
            sub = EmbeddingBagCollection(
                [tables[n] for n in tables if n in other], is_weighted=module.is_weighted(), device=torch.device("meta")
            )
            child = super().shard(sub, other, env, device, module_fqn)
        return ShardedHashEmbeddingBagCollection(
            module,
            hash_params,
            env,
            fused_params=self._hash_fused_params,
            options=self._options,
            merge_tables=self._merge_tables,
            torchrec_child=child,
            module_fqn=module_fqn,
        )


def sharders(
    fused_params: Optional[Dict[str, Any]] = None,
    options: OptionsArg = None,
    merge_tables: bool = True,
) -> List[ModuleSharder]:
    """The sharders to give ``DistributedModelParallel``.

    Example::

        model = DistributedModelParallel(
            model, sharders=rt.sharders(fused_params), plan=rt.plan(model, world_size)
        )
    """
    return [HashEmbeddingBagCollectionSharder(fused_params=fused_params, options=options, merge_tables=merge_tables)]
