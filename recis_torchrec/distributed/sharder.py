# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The sharders that DistributedModelParallel picks for ``torchrec.EmbeddingBagCollection`` and
``torchrec.EmbeddingCollection``."""

import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ParameterSharding, ShardedModule, ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recis_torchrec.distributed.embedding import ShardedHashEmbeddingCollection
from recis_torchrec.distributed.embeddingbag import HASH_SHARDING, HASH_SHARED, ShardedHashEmbeddingBagCollection
from recis_torchrec.tables.options import OptionsArg
from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.optim.fused import HashFusedOptimizer


class SharedTables:
    """The hash-sharded bag modules one set of sharders has built, so that a
    sequence module can take a table of the same name from one of them."""

    def __init__(self) -> None:
        self._owners: List["weakref.ReferenceType[ShardedHashEmbeddingBagCollection]"] = []

    def register(self, module: ShardedHashEmbeddingBagCollection) -> None:
        self._owners.append(weakref.ref(module))

    def __call__(self, name: str) -> Optional[Tuple[HashTable, HashFusedOptimizer]]:
        holders = [m for m in (r() for r in self._owners) if m is not None and name in m.tables()]
        if len(holders) > 1:
            raise ValueError(
                f"table {name!r} is in {len(holders)} hash-sharded EmbeddingBagCollections built by these "
                "sharders; use one recis_torchrec.sharders(...) list per model"
            )
        if not holders:
            return None
        return holders[0].tables()[name], holders[0].hash_optimizer


def _split_plan(
    torchrec_sharder: type, sharder, module, tables: Dict[str, Any], params, env, device, module_fqn, where, make_sub
):
    """The hash tables' plan entries, and TorchRec's sharded module for the other tables (None if
    there are none), sharded by ``torchrec_sharder.shard`` from ``make_sub(names)``.
    Returns (None, TorchRec's sharded module) when no table is hash-sharded."""
    hash_params = _check_hash_params(where, tables, params, env, device)
    if not hash_params:
        return None, torchrec_sharder.shard(sharder, module, params, env, device, module_fqn)
    other = {n: p for n, p in params.items() if n not in hash_params}
    if not other:
        return hash_params, None
    sub = make_sub([n for n in tables if n in other])
    _copy_in_backward_optimizers(module, sub)
    return hash_params, torchrec_sharder.shard(sharder, sub, other, env, device, module_fqn)


_IN_BACKWARD_ATTRS = ("_optimizer_classes", "_optimizer_kwargs", "_in_backward_optimizers")


def _copy_in_backward_optimizers(module: torch.nn.Module, sub: torch.nn.Module) -> None:
    """``apply_optimizer_in_backward``'s tags of ``module``'s table weights onto the weights of
    ``sub`` (a module rebuilt from some of its tables), so that TorchRec's sharder honours them."""
    theirs = dict(module.named_parameters())
    for name, param in sub.named_parameters():
        src = theirs.get(name)
        for attr in _IN_BACKWARD_ATTRS:
            if src is not None and hasattr(src, attr):
                setattr(param, attr, getattr(src, attr))


def _check_hash_params(where: str, tables: Dict[str, Any], params: Dict[str, ParameterSharding], env, device) -> Dict:
    unknown = sorted(set(params) - set(tables))
    if unknown:
        raise ValueError(f"{where}: the sharding plan names tables {unknown} that are not in it ({sorted(tables)})")
    hash_params = {n: p for n, p in params.items() if p.sharding_type == HASH_SHARDING}
    if not hash_params:
        return hash_params
    if device is not None and torch.device(device).type not in ("cpu", "cuda"):
        raise NotImplementedError(f"{where}: hash sharding runs on CPU (gloo) or CUDA (NCCL), got device {device}")
    if device is not None and torch.device(device).type == "cuda":
        from recis_torchrec.ops.devices import require_cuda

        require_cuda(f"{where}: hash sharding on {device}")
    for name, p in hash_params.items():
        if p.ranks is not None and len(p.ranks) != env.world_size:
            raise ValueError(
                f"{where}: table {name!r} is planned over {len(p.ranks)} ranks but the world size is "
                f"{env.world_size}; rebuild the plan with recis_torchrec.plan(model, world_size={env.world_size})"
            )
    missing = sorted(set(tables) - set(params))
    if missing:
        raise ValueError(f"{where}: the sharding plan has no entry for tables {missing}")
    return hash_params


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
        qcomm_codecs_registry: Optional[Dict[str, Any]] = None,
        sharded_module_order_overwrite: Optional[List[str]] = None,
        options: OptionsArg = None,
        merge_tables: bool = True,
        shared_tables: Optional[SharedTables] = None,
    ) -> None:
        super().__init__(
            fused_params=fused_params,
            qcomm_codecs_registry=qcomm_codecs_registry,
            sharded_module_order_overwrite=sharded_module_order_overwrite,
        )
        self._hash_fused_params = fused_params
        self._options = options
        self._merge_tables = merge_tables
        self._shared_tables = shared_tables

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

        def make_sub(names: List[str]) -> EmbeddingBagCollection:
            return EmbeddingBagCollection(
                [tables[n] for n in names], is_weighted=module.is_weighted(), device=torch.device("meta")
            )

        hash_params, child = _split_plan(
            EmbeddingBagCollectionSharder, self, module, tables, params, env, device, module_fqn, where, make_sub
        )
        if hash_params is None:
            return child
        sharded = ShardedHashEmbeddingBagCollection(
            module,
            hash_params,
            env,
            fused_params=self._hash_fused_params,
            options=self._options,
            merge_tables=self._merge_tables,
            torchrec_child=child,
            module_fqn=module_fqn,
            device=device,
        )
        if self._shared_tables is not None:
            self._shared_tables.register(sharded)
        return sharded


class HashEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """TorchRec's ``EmbeddingCollectionSharder``, plus hash sharding (sequence
    all-to-all of deduplicated ids; see ``ShardedHashEmbeddingCollection``).

    Tables planned as :data:`HASH_SHARDING` become hash tables sharded by id;
    the others are sharded by TorchRec. Tables planned with the
    :data:`HASH_SHARED` kernel are the hash-sharded EBC tables of the same
    name that ``shared_tables`` knows of (built by the same sharders).
    """

    def __init__(
        self,
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, Any]] = None,
        use_index_dedup: bool = False,
        options: OptionsArg = None,
        shared_tables: Optional[SharedTables] = None,
    ) -> None:
        super().__init__(
            fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry, use_index_dedup=use_index_dedup
        )
        self._hash_fused_params = fused_params
        self._options = options
        self._shared_tables = shared_tables

    def shard(
        self,
        module: EmbeddingCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedModule:
        where = module_fqn or "EmbeddingCollection"
        tables = {c.name: c for c in module.embedding_configs()}

        def make_sub(names: List[str]) -> EmbeddingCollection:
            return EmbeddingCollection(
                [tables[n] for n in names], need_indices=module.need_indices(), device=torch.device("meta")
            )

        hash_params, child = _split_plan(
            EmbeddingCollectionSharder, self, module, tables, params, env, device, module_fqn, where, make_sub
        )
        if hash_params is None:
            return child
        shared_names = tuple(n for n, p in hash_params.items() if p.compute_kernel == HASH_SHARED)
        if shared_names and self._shared_tables is None:
            raise ValueError(
                f"{where}: the plan shares tables {list(shared_names)} with an EmbeddingBagCollection; give "
                "DistributedModelParallel the sharders from recis_torchrec.sharders(), which build them together"
            )
        return ShardedHashEmbeddingCollection(
            module,
            hash_params,
            env,
            fused_params=self._hash_fused_params,
            options=self._options,
            torchrec_child=child,
            module_fqn=module_fqn,
            shared=self._shared_tables,
            shared_names=shared_names,
            device=device,
        )


def sharders(
    fused_params: Optional[Dict[str, Any]] = None,
    options: OptionsArg = None,
    merge_tables: bool = True,
) -> List[ModuleSharder]:
    """The sharders to give ``DistributedModelParallel``: for
    ``EmbeddingBagCollection`` and ``EmbeddingCollection``.

    Args:
        fused_params: the sparse optimizer (TorchRec keys), for hash tables
            and for the tables TorchRec shards.
        options: ``HashTableOptions`` for every hash table, or a dict by table name over the whole model
            (each sharded module takes the entries of its own tables).
        merge_tables: communicate an EBC's same-dim tables together.

    Tables that ``plan(..., share_tables=True)`` marks as shared between an
    EC and an EBC are built once, by the EBC's sharder; use one
    ``sharders(...)`` list per model.

    Example::

        model = DistributedModelParallel(
            model, sharders=rt.sharders(fused_params), plan=rt.plan(model, world_size)
        )
    """
    shared = SharedTables()
    return [
        HashEmbeddingBagCollectionSharder(
            fused_params=fused_params, options=options, merge_tables=merge_tables, shared_tables=shared
        ),
        HashEmbeddingCollectionSharder(fused_params=fused_params, options=options, shared_tables=shared),
    ]
