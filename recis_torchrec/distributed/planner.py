# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``plan``: put EBC tables on hash sharding, merged into any other plan."""

from typing import Iterable, Optional

from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recis_torchrec.distributed.embeddingbag import HASH_SHARDING


def plan(
    model: nn.Module,
    world_size: int,
    base: Optional[ShardingPlan] = None,
    tables: Optional[Iterable[str]] = None,
    device_type: str = "cpu",
) -> ShardingPlan:
    """A ``ShardingPlan`` that puts EBC tables on hash sharding.

    Args:
        model: the unsharded model (on the meta device or the CPU).
        world_size: ranks the tables are sharded over.
        base: a plan for everything else, for example from TorchRec's planner.
            Its entries for other modules are kept, and so are its entries for
            tables not chosen here.
        tables: only these tables (by name) go on hash sharding; None means
            every table of every ``EmbeddingBagCollection``. A table of a
            chosen EBC that neither list covers gets TorchRec's row-wise
            sharding with the fused kernel (FBGEMM TBE, the sharder's
            ``fused_params``).
        device_type: for the row-wise entries built here.

    Returns:
        The merged plan, for ``DistributedModelParallel(..., plan=...)``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    wanted = None if tables is None else set(tables)
    found = set()
    merged = dict(base.plan) if base is not None else {}
    for path, module in model.named_modules():
        if not isinstance(module, EmbeddingBagCollection):
            continue
        configs = module.embedding_bag_configs()
        names = [c.name for c in configs]
        chosen = [n for n in names if wanted is None or n in wanted]
        found.update(chosen)
        if not chosen:
            continue
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
    if wanted is not None and wanted - found:
        raise ValueError(
            f"plan: tables {sorted(wanted - found)} are not in any EmbeddingBagCollection of the model"
        )
    return ShardingPlan(merged)
