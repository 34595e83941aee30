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
    if ids.device.type != "cpu":
        return bucketize_dedup_torch(ids, offsets, world_size)
    return Buckets(*torch.ops.recis.bucketize_dedup(ids, offsets, world_size))


def _counts(index: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of 0..size-1 occurs in ``index`` (bincount without its host sync)."""
    out = torch.zeros(size, dtype=torch.int64, device=index.device)
    return out.scatter_add_(0, index, torch.ones_like(index))


def bucketize_dedup_torch(ids: torch.Tensor, offsets: torch.Tensor, world_size: int) -> Buckets:
    """:func:`bucketize_dedup` in torch ops, for ids on a GPU (the owner is the
    ``owner_of`` op's). The same buckets, except that each owner's unique ids
    come in ascending order rather than first-occurrence order (``inverse``
    follows them). Host syncs: the ones torch.unique makes (its output size);
    the counts use scatter_add_, which needs none."""
    device = ids.device
    n, num_bags = ids.numel(), offsets.numel() - 1
    owner = owner_of(ids, world_size)
    value_perm = torch.sort(owner, stable=True).indices
    value_counts = _counts(owner, world_size)
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    unique_owner = owner_of(unique, world_size)
    # Owner-major order of the unique ids (an id's owner is a function of the id).
    by_owner = torch.sort(unique_owner, stable=True).indices
    unique_counts = _counts(unique_owner, world_size)
    rank_of_unique = torch.empty_like(by_owner)
    rank_of_unique[by_owner] = torch.arange(unique.numel(), device=device)
    starts = torch.cumsum(unique_counts, 0) - unique_counts
    u = inverse[value_perm]  # the unique id of each value, owner-major
    inverse_in_owner = (rank_of_unique[u] - starts[unique_owner[u]]).to(torch.int32)
    lengths = offsets[1:] - offsets[:-1]
    bag = torch.repeat_interleave(torch.arange(num_bags, device=device), lengths, output_size=n)
    bag_lengths = _counts(owner * num_bags + bag, world_size * num_bags)
    return Buckets(
        unique_ids=unique[by_owner],
        unique_counts=unique_counts,
        inverse=inverse_in_owner,
        value_counts=value_counts,
        value_perm=value_perm,
        bag_lengths=bag_lengths.view(world_size, num_bags).to(torch.int32),
    )


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
