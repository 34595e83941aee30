# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Wrappers and fake kernels of the sharding ops: owner_of and bucketize_dedup."""

from typing import NamedTuple

import torch

from recis_torchrec import _ext  # noqa: F401  (registers torch.ops.recis)


def owner_of(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """The rank owning each id among ``world_size`` ranks (a salted mixing hash
    reduced by multiply-shift, so sequential ids spread evenly)."""
    return torch.ops.recis.owner_of(ids, world_size)


class Buckets(NamedTuple):
    """What :func:`bucketize_dedup` returns; see its docstring."""

    unique_ids: torch.Tensor
    unique_counts: torch.Tensor
    inverse: torch.Tensor
    value_counts: torch.Tensor
    value_perm: torch.Tensor
    bag_lengths: torch.Tensor


def bucketize_dedup(ids: torch.Tensor, offsets: torch.Tensor, world_size: int) -> Buckets:
    """Splits a KJT's ids by owner rank and deduplicates them per owner.

    Args:
        ids: (N,) int64 values of a KJT.
        offsets: (num_bags + 1,) its bag offsets.
        world_size: ranks.

    Returns:
        Buckets with ``unique_ids`` (U,) (per owner, first-occurrence order),
        ``unique_counts`` (world_size,), ``inverse`` (N,) int32 (for the values
        in owner-major order, the index among their owner's unique ids),
        ``value_counts`` (world_size,), ``value_perm`` (N,) (owner-major
        position -> value index) and ``bag_lengths`` (world_size, num_bags) int32.
    """
    return Buckets(*torch.ops.recis.bucketize_dedup(ids, offsets, world_size))


@torch.library.register_fake("recis::owner_of")
def _owner_of_fake(ids, world_size):
    return torch.empty_like(ids)


@torch.library.register_fake("recis::bucketize_dedup")
def _bucketize_dedup_fake(ids, offsets, world_size):
    ctx = torch.library.get_ctx()
    n, num_bags = ids.shape[0], offsets.shape[0] - 1
    return (
        ids.new_empty((ctx.new_dynamic_size(),)),
        ids.new_empty((world_size,)),
        ids.new_empty((n,), dtype=torch.int32),
        ids.new_empty((world_size,)),
        ids.new_empty((n,)),
        ids.new_empty((world_size, num_bags), dtype=torch.int32),
    )
