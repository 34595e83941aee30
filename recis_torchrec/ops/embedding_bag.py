# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Wrappers and fake kernels of the pooled-lookup ops.

Layout conventions (shared with the C++ schema in ``csrc/ops/schema.cpp``):
the inputs follow a ``KeyedJaggedTensor``. Feature ``k`` owns the bags
``offsets[k * B:(k + 1) * B + 1]`` with ``B = (len(offsets) - 1) / F``.
``feature_table[k]`` indexes the table list (-1 skips the feature),
``feature_mode[k]`` is :data:`POOLING_SUM` or :data:`POOLING_MEAN`, and
``feature_col[k]`` is the feature's first column in the ``(B, out_dim)`` output.
"""

from typing import List, Optional, Sequence, Tuple

import torch

from recis_torchrec import _ext  # noqa: F401  (registers torch.ops.recis)
from recis_torchrec.ops.hashtable import TableRef, _handle
from recis_torchrec.ops.update_args import UpdateArgs

from recis_torchrec.ops.constants import POOLING_MEAN, POOLING_SUM  # noqa: F401  (the C++ codes)


def pooled_forward(
    tables: Sequence[TableRef],
    ids: torch.Tensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    feature_table: Sequence[int],
    feature_mode: Sequence[int],
    feature_col: Sequence[int],
    out_dim: int,
) -> torch.Tensor:
    """Pooled embeddings ``(B, out_dim)`` of the bags of every feature.

    A row of -1 (an id the table does not hold, as :func:`find` reports it)
    reads that id's deterministic initial value without inserting it.
    """
    return torch.ops.recis.pooled_forward(
        [_handle(t) for t in tables],
        ids,
        rows,
        offsets,
        per_sample_weights,
        list(feature_table),
        list(feature_mode),
        list(feature_col),
        out_dim,
    )


def lookup_pooled_forward(
    tables: Sequence[TableRef],
    ids: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    feature_table: Sequence[int],
    feature_mode: Sequence[int],
    feature_col: Sequence[int],
    out_dim: int,
    insert: bool,
    clock: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`find` (or :func:`find_or_insert` with ``insert``) fused with :func:`pooled_forward`.

    Returns ``(pooled (B, out_dim), rows (N,))``. Ids are looked up tile by
    tile as their bags are pooled, so each id is read once; absent ids pool
    their initial value and, with ``insert``, get their rows afterwards (as
    admission and the capacity cap allow). ``clock`` is the tables' update count.
    """
    return torch.ops.recis.lookup_pooled_forward(
        [_handle(t) for t in tables],
        ids,
        offsets,
        per_sample_weights,
        list(feature_table),
        list(feature_mode),
        list(feature_col),
        out_dim,
        insert,
        clock,
    )


def pooled_weight_grad(
    tables: Sequence[TableRef],
    grad_output: torch.Tensor,
    ids: torch.Tensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    feature_table: Sequence[int],
    feature_mode: Sequence[int],
    feature_col: Sequence[int],
) -> torch.Tensor:
    """Gradient of the pooled output w.r.t. the per-sample weights, ``(N,)``: each value's
    ``dot(grad_output[bag, cols], value)`` (over the bag length for mean pooling), the value being
    its row, or its initial value where ``rows`` is -1. Read before the rows are updated."""
    return torch.ops.recis.pooled_weight_grad(
        [_handle(t) for t in tables], grad_output, ids, rows, offsets,
        list(feature_table), list(feature_mode), list(feature_col),
    )


def pooled_backward(
    table_dims: Sequence[int],
    grad_output: torch.Tensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    feature_table: Sequence[int],
    feature_mode: Sequence[int],
    feature_col: Sequence[int],
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Gradient of :func:`pooled_forward` w.r.t. the table rows.

    Returns, per table, the unique rows touched (ascending) and their summed
    gradients ``(U, dim)``. Rows of -1 get no gradient.
    """
    return torch.ops.recis.pooled_backward(
        list(table_dims),
        grad_output,
        rows,
        offsets,
        per_sample_weights,
        list(feature_table),
        list(feature_mode),
        list(feature_col),
    )


def sparse_update(table: TableRef, rows: torch.Tensor, grads: torch.Tensor, update: UpdateArgs, index: int = 0) -> None:
    """One optimizer step on unique, ascending ``rows`` with gradients ``(n, dim)``, in place;
    ``update.steps[index]`` is the table's update count."""
    torch.ops.recis.sparse_update(_handle(table), rows, grads, *update.hyperparameters(), update.steps[index])


def pooled_backward_update(
    tables: Sequence[TableRef],
    grad_output: torch.Tensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    feature_table: Sequence[int],
    feature_mode: Sequence[int],
    feature_col: Sequence[int],
    update: UpdateArgs,
) -> None:
    """:func:`pooled_backward` then :func:`sparse_update` on every table, fused.

    ``update.steps[t]`` is table t's update count, counting this one (Adam's bias correction).
    """
    torch.ops.recis.pooled_backward_update(
        [_handle(t) for t in tables],
        grad_output,
        rows,
        offsets,
        per_sample_weights,
        list(feature_table),
        list(feature_mode),
        list(feature_col),
        *update.hyperparameters(),
        list(update.steps),
    )


def segment_sum_rows(grads: torch.Tensor, inverse: torch.Tensor, num_unique: int) -> torch.Tensor:
    """``out[u] = sum(grads[i] for i with inverse[i] == u)``, ``(num_unique, D)``: ``index_add_``
    into zeros, parallel over ranges of ``u`` (each range summed in input order)."""
    return torch.ops.recis.segment_sum_rows(grads, inverse, num_unique)


@torch.library.register_fake("recis::segment_sum_rows")
def _segment_sum_rows_fake(grads, inverse, num_unique):
    return grads.new_empty((num_unique, grads.shape[1]))


@torch.library.register_fake("recis::pooled_forward")
def _pooled_forward_fake(
    tables, ids, rows, offsets, per_sample_weights, feature_table, feature_mode, feature_col, out_dim
):
    num_features = len(feature_table)
    torch._check(num_features > 0, lambda: "recis::pooled_forward: at least one feature is required")
    batch = (offsets.shape[0] - 1) // num_features
    return rows.new_empty((batch, out_dim), dtype=torch.float32)


@torch.library.register_fake("recis::lookup_pooled_forward")
def _lookup_pooled_forward_fake(
    tables, ids, offsets, per_sample_weights, feature_table, feature_mode, feature_col, out_dim, insert, clock=0
):
    return _pooled_forward_fake(
        tables, ids, ids, offsets, per_sample_weights, feature_table, feature_mode, feature_col, out_dim
    ), torch.empty_like(ids)


@torch.library.register_fake("recis::pooled_backward")
def _pooled_backward_fake(
    table_dims, grad_output, rows, offsets, per_sample_weights, feature_table, feature_mode, feature_col
):
    ctx = torch.library.get_ctx()
    unique_rows, grads = [], []
    for dim in table_dims:
        n = ctx.new_dynamic_size()
        unique_rows.append(rows.new_empty((n,)))
        grads.append(grad_output.new_empty((n, dim)))
    return unique_rows, grads


@torch.library.register_fake("recis::sparse_update")
def _sparse_update_fake(*args):
    return None


@torch.library.register_fake("recis::pooled_weight_grad")
def _(tables, grad_output, ids, rows, offsets, feature_table, feature_mode, feature_col):
    return rows.new_empty(rows.shape, dtype=torch.float32)


@torch.library.register_fake("recis::pooled_backward_update")
def _pooled_backward_update_fake(*args):
    return None
