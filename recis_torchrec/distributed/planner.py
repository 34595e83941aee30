# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``plan``: put EBC and EC tables on hash sharding, merged into any other plan."""

from typing import Any, Iterable, List, Optional

from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recis_torchrec.distributed.embeddingbag import HASH_SHARED, HASH_SHARDING


def _table_configs(module: nn.Module) -> Optional[List[Any]]:
    if isinstance(module, EmbeddingBagCollection):
        return module.embedding_bag_configs()
    if isinstance(module, EmbeddingCollection):
        return module.embedding_configs()
    return None


def plan(
    model: nn.Module,
    world_size: int,
    base: Optional[ShardingPlan] = None,
    tables: Optional[Iterable[str]] = None,
    device_type: str = "cpu",
    share_tables: bool = False,
) -> ShardingPlan:
    """A ``ShardingPlan`` that puts EBC and EC tables on hash sharding.

    Args:
        model: the unsharded model (on the meta device or the CPU).
        world_size: ranks the tables are sharded over.
        base: a plan for everything else, for example from TorchRec's planner.
            Its entries for other modules are kept, and so are its entries for
            tables not chosen here.
        tables: only these tables (by name) go on hash sharding; None means
            every table of every ``EmbeddingBagCollection`` and
            ``EmbeddingCollection``. A table of a chosen module that neither
            list covers gets TorchRec's row-wise sharding with the fused
            kernel (FBGEMM TBE, the sharder's ``fused_params``).
        device_type: for the row-wise entries built here.
        share_tables: an EC table with the name of a hash-sharded EBC table is
            that table (one id space, one set of rows, owned by the EBC); its
            entry gets the :data:`HASH_SHARED` kernel.

    Returns:
        The merged plan, for ``DistributedModelParallel(..., plan=...)``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    wanted = None if tables is None else set(tables)
    found = set()
    merged = dict(base.plan) if base is not None else {}
    bag_tables = set()
    for path, module in model.named_modules():
        configs = _table_configs(module)
        if configs is None:
            continue
        names = [c.name for c in configs]
        chosen = [n for n in names if wanted is None or n in wanted]
        found.update(chosen)
        if not chosen:
            continue
        is_bag = isinstance(module, EmbeddingBagCollection)
        if is_bag:
            bag_tables.update(chosen)
        base_entry = merged.get(path) or {}
        rest = [n for n in names if n not in chosen and n not in base_entry]
        # TorchRec's helper plans every table of a module or none.
        row_wise_entry = (
            construct_module_sharding_plan(
                module,
                {n: row_wise(compute_kernel=EmbeddingComputeKernel.FUSED.value) for n in names},
                local_size=world_size,
                world_size=world_size,
                device_type=device_type,
            )
            if rest
            else {}
        )
        entry = EmbeddingModuleShardingPlan()
        for n in names:
            if n in chosen:
                entry[n] = ParameterSharding(
                    sharding_type=HASH_SHARDING, compute_kernel=HASH_SHARDING, ranks=list(range(world_size))
                )
            elif n in base_entry:
                entry[n] = base_entry[n]
            else:
                entry[n] = row_wise_entry[n]
        merged[path] = entry
    if share_tables:
        for path, module in model.named_modules():
            if isinstance(module, EmbeddingCollection) and path in merged:
                for n, p in merged[path].items():
                    if p.sharding_type == HASH_SHARDING and n in bag_tables:
                        p.compute_kernel = HASH_SHARED
    if wanted is not None and wanted - found:
        raise ValueError(
            f"plan: tables {sorted(wanted - found)} are not in any EmbeddingBagCollection or EmbeddingCollection "
            "of the model"
        )
    return ShardingPlan(merged)
