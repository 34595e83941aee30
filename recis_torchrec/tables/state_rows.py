# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Hash-table rows in state dicts, including as shards of one global tensor for
``torch.distributed.checkpoint`` (DCP).

A hash table has no fixed row space, so each of its state-dict entries (``weight``, ``ids``,
``meta``; an optimizer slot's ``ids`` and ``values``; admission's pending ``ids`` and ``counts``)
is a *row group*: tensors of one row per id, under one key prefix ``P``. Unsharded, the members
are plain tensors. Sharded over ``W`` ranks, rank ``r`` holds its ``n_r`` rows and each member is
a local tensor carrying DCP's ``CheckpointableTensor`` fields: rows ``[o_r, o_r + n_r)`` of a
global tensor of ``N = sum(n)`` rows, ``o_r = n_0 + ... + n_{r-1}``. ``dcp.save`` then writes
every rank's rows (a plain tensor would be taken as replicated and written once). A marker
member ``P.shards``, an int8 tensor of ``N + W`` elements in which rank ``r`` holds
``n_r + 1``, is never empty on any rank, so the checkpoint's metadata alone tells a loader the
world size and every rank's rows (see ``recis_torchrec.checkpoint.dcp.DCPLoadPlanner``).

Every member tensor also carries ``_recis_rows``: the owner of its rows (``(world_size, rank)``,
or None when unsharded), which the load planner reads.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

SHARDS = "shards"
ROWS_ATTR = "_recis_rows"
# Set on tensors the DCP load planner built: they hold every row this rank may own.
LOADED_ATTR = "_recis_rows_loaded"


@dataclass(frozen=True)
class Owner:
    """The rank whose ids a row group holds."""

    world_size: int
    rank: int


@dataclass(frozen=True)
class RowShards:
    """How one row group is split over the ranks: ``counts[r]`` rows on rank ``r``."""

    owner: Owner
    counts: Tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def offset(self) -> int:
        return sum(self.counts[: self.owner.rank])


def gather_counts(pg: Optional[dist.ProcessGroup], counts: Sequence[int], device: torch.device) -> List[List[int]]:
    """Every rank's ``counts`` (one entry per row group, the same groups on every rank):
    ``out[g][r]`` is group g's row count on rank r. Collective."""
    local = torch.tensor(list(counts), dtype=torch.int64, device=device)
    world = dist.get_world_size(pg)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=pg)
    per_rank = [g.cpu().tolist() for g in gathered]
    return [[per_rank[r][g] for r in range(world)] for g in range(len(counts))]


def _as_global_rows(t: torch.Tensor, shards: RowShards) -> torch.Tensor:
    rest = tuple(t.shape[1:])
    zeros = (0,) * len(rest)
    t.global_shape = (shards.total,) + rest
    t.global_offsets = ((shards.offset,) + zeros,)
    t.local_offsets = ((0,) + zeros,)
    t.local_sizes = (tuple(t.shape),)
    return t


def put_rows(
    destination: Dict[str, object],
    prefix: Optional[str],
    members: Mapping[str, torch.Tensor],
    shards: Optional[RowShards],
) -> None:
    """Writes one row group's members as ``{prefix}.{name}`` (``{name}`` with no prefix): plain
    tensors, or this rank's shard of each (plus the ``shards`` marker) when ``shards`` is given."""
    owner = shards.owner if shards is not None else None

    def key(name: str) -> str:
        return name if prefix is None else f"{prefix}.{name}"

    for name, t in members.items():
        if shards is not None:
            if t.shape[0] != shards.counts[shards.owner.rank]:
                raise ValueError(f"{prefix}.{name}: {t.shape[0]} rows, but the group has {shards.counts}")
            t = _as_global_rows(t, shards)
        setattr(t, ROWS_ATTR, owner)
        destination[key(name)] = t
    if shards is not None:
        marker = torch.zeros(shards.counts[shards.owner.rank] + 1, dtype=torch.int8)
        marker.global_shape = (shards.total + shards.owner.world_size,)
        marker.global_offsets = ((shards.offset + shards.owner.rank,),)
        marker.local_offsets = ((0,),)
        marker.local_sizes = (tuple(marker.shape),)
        setattr(marker, ROWS_ATTR, owner)
        destination[key(SHARDS)] = marker


def is_partial(t: torch.Tensor) -> bool:
    """Whether ``t`` is one rank's shard of a row group (as a state dict gives it), and not rows a
    DCP load planner gathered for this rank."""
    if getattr(t, LOADED_ATTR, False):
        return False
    shape = getattr(t, "global_shape", None)
    return shape is not None and tuple(shape)[:1] != tuple(t.shape)[:1]


__all__ = ["LOADED_ATTR", "Owner", "ROWS_ATTR", "RowShards", "SHARDS", "gather_counts", "is_partial", "put_rows"]
