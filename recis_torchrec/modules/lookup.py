# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The differentiable pooled lookup over a group of hash tables.

Shared by the unsharded module and the owner side of the sharded one: the
forward finds (or inserts) ids and pools their rows in one op; the backward
applies the fused optimizer to the rows it touched, in one op.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch

from recis_torchrec import ops
from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.optim.fused import HashFusedOptimizer


@dataclass(frozen=True)
class BagLayout:
    """How KJT keys map onto a table list: per key, the table index (-1 to
    skip), the pooling mode and the first output column; and the output width."""

    feature_table: List[int]
    feature_mode: List[int]
    feature_col: List[int]
    out_dim: int


class _PooledLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, group, ids, offsets, weights, layout, insert):  # type: ignore[override]
        out, rows = ops.lookup_pooled_forward(
            group.tables,
            ids,
            offsets,
            weights,
            layout.feature_table,
            layout.feature_mode,
            layout.feature_col,
            layout.out_dim,
            insert,
            group.clock(),
        )
        ctx.group = group
        ctx.layout = layout
        ctx.save_for_backward(rows, offsets, weights, ids)
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        rows, offsets, weights, ids = ctx.saved_tensors
        group, layout = ctx.group, ctx.layout
        grad_output = grad_output.to(torch.float32).contiguous()
        grad_weights = None
        if weights is not None and ctx.needs_input_grad[4]:
            # Per-sample weights' gradient, from the rows as the forward read them: before the update.
            grad_weights = ops.pooled_weight_grad(
                group.tables, grad_output, ids, rows, offsets, layout.feature_table, layout.feature_mode,
                layout.feature_col,
            )
        ops.pooled_backward_update(
            group.tables,
            grad_output,
            rows,
            offsets,
            weights,
            layout.feature_table,
            layout.feature_mode,
            layout.feature_col,
            update=group.optimizer.next_update_args(group.table_names),
        )
        return None, None, None, None, grad_weights, None, None


class LookupGroup:
    """Tables looked up and updated together, with the optimizer that updates them."""

    def __init__(self, tables: List[HashTable], optimizer: HashFusedOptimizer) -> None:
        self.tables = tables
        self.table_names = [t.name for t in tables]
        self.optimizer = optimizer
        # Gives the pooled output a grad_fn even when nothing else requires
        # grad, so that backward reaches the fused update. Not a parameter.
        self._anchor = torch.zeros(0, device="cpu", requires_grad=True)

    def clock(self) -> int:
        """The group's update count: lookups mark rows with it, and the update
        that follows marks them with clock + 1."""
        steps = self.optimizer.steps()
        return max((steps[n] for n in self.table_names), default=0)

    def __call__(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        weights: Optional[torch.Tensor],
        layout: BagLayout,
        insert: bool,
    ) -> torch.Tensor:
        """Pooled embeddings ``(B, layout.out_dim)``; backward updates the rows."""
        self.prefetch(ids, offsets, layout, insert)
        return _PooledLookup.apply(self._anchor, self, ids, offsets, weights, layout, insert)

    def prefetch(self, ids: torch.Tensor, offsets: torch.Tensor, layout: BagLayout, train: bool) -> None:
        """Tables with rows on disk (``storage="ssd"``) bring this batch's rows into their caches
        (already there after a prefetch stage, so then nothing is read). The clock declares the step:
        rows it uses stay in the cache until the next step."""
        disk = [t for t, table in enumerate(self.tables) if table is not None and table.on_disk]
        if not disk:
            return
        clock = self.clock()
        if len(self.tables) == 1:
            self.tables[0].prefetch(ids, clock, lookup=True, train=train)
            return
        features = len(layout.feature_table)
        batch = (offsets.numel() - 1) // max(features, 1)
        bounds = offsets[::batch].tolist() if batch else [0] * (features + 1)  # where each feature's ids start
        for t in disk:
            mine = [ids[bounds[f] : bounds[f + 1]] for f in range(features) if layout.feature_table[f] == t]
            self.tables[t].prefetch(torch.cat(mine) if mine else ids[:0], clock, lookup=True, train=train)


class _SequenceLookup(torch.autograd.Function):
    """Rows of `ids` (one table), unpooled; backward sums each row's gradients and updates it once.

    The forward is the bag module's fused lookup with every id as a bag of
    one. The backward groups the gradients by row with ``torch.unique`` and
    ``segment_sum_rows`` (a parallel scatter into the unique rows, which stay
    cache-resident) and applies the fused optimizer with ``sparse_update``:
    for long sequences this is several times faster than reducing bags of one.
    """

    @staticmethod
    def forward(ctx, anchor, group, ids, layout, insert):  # type: ignore[override]
        n = ids.numel()
        out, rows = ops.lookup_pooled_forward(
            group.tables, ids, torch.arange(n + 1, dtype=torch.int64, device=ids.device), None, layout.feature_table,
            layout.feature_mode, layout.feature_col, layout.out_dim, insert, group.clock(),
        )
        ctx.group = group
        ctx.layout = layout
        ctx.save_for_backward(rows)
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        group = ctx.group
        args = group.optimizer.next_update_args(group.table_names)
        if rows.is_cuda:
            # The CUDA backward sorts and reduces the rows itself (segment_sum_rows and sparse_update are
            # CPU kernels): the bags-of-one gradient goes to it directly.
            layout = ctx.layout
            offsets = torch.arange(rows.numel() + 1, dtype=torch.int64, device=rows.device)
            ops.pooled_backward_update(
                group.tables, grad_output.to(torch.float32).contiguous(), rows, offsets, None, layout.feature_table,
                layout.feature_mode, layout.feature_col, update=args,
            )
            return (None,) * 5
        keep = rows >= 0  # ids not admitted (or eval lookups) get no update
        grad = grad_output.to(torch.float32)
        if not bool(keep.all()):
            rows, grad = rows[keep], grad[keep]
        if rows.numel():
            unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
            summed = ops.segment_sum_rows(grad.contiguous(), inverse, unique.numel())
            ops.sparse_update(group.tables[0], unique, summed, update=args)
        return (None,) * 5


def sequence_lookup(group: "LookupGroup", ids: torch.Tensor, insert: bool) -> torch.Tensor:
    """The rows of ``ids`` in the group's single table, ``(N, dim)``, unpooled; backward
    sums each row's gradients and applies the fused optimizer to it once.

    With no ids the output is ``(0, dim)`` and backward still counts an update,
    so every rank of a sharded table keeps the same step count."""
    layout = BagLayout([0], [ops.POOLING_SUM], [0], group.tables[0].dim)
    if group.tables[0].on_disk:
        group.tables[0].prefetch(ids, group.clock(), lookup=True, train=insert)
    return _SequenceLookup.apply(group._anchor, group, ids, layout, insert)
