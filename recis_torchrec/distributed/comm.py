# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The hash-sharded data path's communication.

Input dist, per lookup group and step, on every rank:

1. ``bucketize_dedup``: each id goes to its owner rank (a salted mixing hash),
   deduplicated per owner.
2. Splits all-to-all (async): per destination, the id count, the metadata
   count (bag lengths + per-value inverse indices), the batch size and whether
   the ids are deduplicated. A destination gets its distinct ids plus a
   4-byte inverse index per value only when that is smaller than its raw
   8-byte ids (fewer than half of them distinct); otherwise the raw ids.
3. Tensors all-to-all (async, launched on the first ``wait``): ids (int64),
   metadata (int32) and, for weighted features, per-value weights.
4. On the owner (second ``wait``): the requesters' bags are rebuilt as one KJT
   whose batch is every source's batch in rank order.

Output dist: each owner pools its part of every bag it received and sends the
partial pools back (``B_source x sum(dims)`` floats per source); the requester
sums the partials of all owners. Backward runs the same all-to-all in
reverse, divided by the world size when ``get_gradient_division()`` is on.

Sequence (``EmbeddingCollection``) tables exchange rows instead, since
nothing is pooled: each rank sends every owner its distinct ids of a table
(``UniqueIdsAwaitable``; 8 bytes per distinct id, no lengths), the owner
returns one row per id it received (``D x 4`` bytes), and the requester
expands the rows to its values through the inverse index it kept. Backward
sums the gradients of repeated ids on the requester (the gather's backward)
before sending one gradient row per distinct id. TorchRec's row-wise
sequence sharding sends 8 bytes per value plus lengths, and one row per value
each way; with repeated ids (Zipf-distributed histories) this sends fewer.

Why partial pools and not rows: returning rows costs ``U x D x 4`` bytes per
rank (U = unique ids sent), partial pools ``B x D x 4`` per feature and
owner. With bags of L ids, U is up to ``B x L`` per feature, so pools are
smaller whenever bags hold more than about one distinct remote id, which is
the common case (and the benchmark's L = 20). The input side sends at most
the 8 bytes per value that TorchRec's row-wise sharding sends, and less when
ids repeat.
"""

from typing import List

import torch
import torch.distributed as dist
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.types import Awaitable
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recis_torchrec import ops
from recis_torchrec.modules.kjt import kjt_offsets


class GroupDistContext:
    """Per group and step: what the owner learned about the sources."""

    def __init__(self) -> None:
        self.batch_size_per_rank: List[int] = []
        self.bytes_sent: int = 0


class _IdsTensorsAwaitable(Awaitable[KeyedJaggedTensor]):
    def __init__(self, works, out_ids, out_meta, out_weights, recv, keys, ctx: GroupDistContext) -> None:
        super().__init__()
        self._works = works
        self._out_ids = out_ids
        self._out_meta = out_meta
        self._out_weights = out_weights
        self._recv = recv  # per source: [ids sent, meta ints, batch size, deduplicated?]
        self._keys = keys
        self._ctx = ctx

    def _wait_impl(self) -> KeyedJaggedTensor:
        for w in self._works:
            w.wait()
        num_features = len(self._keys)
        ids = self._out_ids.split([r[0] for r in self._recv])
        meta = self._out_meta.split([r[1] for r in self._recv])
        batch = [r[2] for r in self._recv]
        deduped = [bool(r[3]) for r in self._recv]
        weights = (
            self._out_weights.split(
                [r[1] - num_features * r[2] if r[3] else r[0] for r in self._recv]
            )
            if self._out_weights is not None
            else None
        )
        lengths_by_source, values_by_source, weights_by_source = [], [], []
        for s, b in enumerate(batch):
            bag_lengths = meta[s][: num_features * b].view(num_features, b)
            per_feature = bag_lengths.sum(1).tolist()
            values = ids[s][meta[s][num_features * b :].to(torch.int64)] if deduped[s] else ids[s]
            lengths_by_source.append(bag_lengths)
            values_by_source.append(values.split(per_feature))
            if weights is not None:
                weights_by_source.append(weights[s].split(per_feature))
        sources = range(len(batch))
        lengths = torch.cat([lengths_by_source[s][f] for f in range(num_features) for s in sources]).to(torch.int64)
        values = torch.cat([values_by_source[s][f] for f in range(num_features) for s in sources])
        kjt_weights = (
            torch.cat([weights_by_source[s][f] for f in range(num_features) for s in sources])
            if weights is not None
            else None
        )
        self._ctx.batch_size_per_rank = batch
        return KeyedJaggedTensor(
            keys=self._keys, values=values, lengths=lengths, weights=kjt_weights, stride=sum(batch)
        )


class IdsSplitsAwaitable(Awaitable[Awaitable[KeyedJaggedTensor]]):
    """Input dist of one lookup group: an awaitable of an awaitable of the
    owner-side KJT, as TorchRec's ``KJTListSplitsAwaitable`` expects.

    Construction buckets and deduplicates the ids and starts the splits
    all-to-all; the first ``wait`` starts the tensors all-to-all; the second
    returns the KJT of every source's bags that this rank owns ids of.
    """

    def __init__(self, kjt: KeyedJaggedTensor, pg: dist.ProcessGroup, ctx: GroupDistContext) -> None:
        super().__init__()
        self._pg = pg
        self._ctx = ctx
        self._keys = kjt.keys()
        world_size = dist.get_world_size(pg)
        batch, num_features = kjt.stride(), len(self._keys)
        b = ops.bucketize_dedup(kjt.values(), kjt_offsets(kjt), world_size)
        unique_counts = b.unique_counts.tolist()
        value_counts = b.value_counts.tolist()
        inverse = b.inverse.split(value_counts)
        uniques = b.unique_ids.split(unique_counts)
        # Per destination, deduplicate only when it pays: 8 bytes per unique
        # id + 4 per value (the inverse index) against 8 per value raw.
        dedup = [2 * u < n for u, n in zip(unique_counts, value_counts)]
        raw = kjt.values()[b.value_perm].split(value_counts) if not all(dedup) else None
        self._ids = torch.cat([uniques[o] if dedup[o] else raw[o] for o in range(world_size)])
        self._ids_splits = [unique_counts[o] if dedup[o] else value_counts[o] for o in range(world_size)]
        parts = []
        for o in range(world_size):
            parts.append(b.bag_lengths[o])
            if dedup[o]:
                parts.append(inverse[o])
        self._meta = torch.cat(parts)
        self._meta_splits = [num_features * batch + (value_counts[o] if dedup[o] else 0) for o in range(world_size)]
        weights = kjt.weights_or_none()
        self._weights = weights[b.value_perm] if weights is not None else None
        self._weights_splits = value_counts
        send = torch.tensor(
            [[self._ids_splits[o], self._meta_splits[o], batch, int(dedup[o])] for o in range(world_size)],
            dtype=torch.int64,
            device=kjt.values().device,  # NCCL exchanges device tensors only
        )
        rank = dist.get_rank(pg)
        self._ctx.bytes_sent = sum(
            self._ids_splits[o] * 8 + self._meta_splits[o] * 4 + (value_counts[o] * 4 if weights is not None else 0)
            for o in range(world_size)
            if o != rank
        )
        self._recv = torch.empty_like(send)
        self._work = dist.all_to_all_single(self._recv, send, group=pg, async_op=True)

    def _wait_impl(self) -> Awaitable[KeyedJaggedTensor]:
        self._work.wait()
        recv = self._recv.tolist()
        out_ids = self._ids.new_empty((sum(r[0] for r in recv),))
        out_meta = self._meta.new_empty((sum(r[1] for r in recv),))
        works = [
            dist.all_to_all_single(
                out_ids, self._ids, [r[0] for r in recv], self._ids_splits, group=self._pg, async_op=True
            ),
            dist.all_to_all_single(
                out_meta, self._meta, [r[1] for r in recv], self._meta_splits, group=self._pg, async_op=True
            ),
        ]
        out_weights = None
        if self._weights is not None:
            num_features = len(self._keys)
            recv_values = [r[0] if not r[3] else r[1] - num_features * r[2] for r in recv]
            out_weights = self._weights.new_empty((sum(recv_values),))
            works.append(
                dist.all_to_all_single(
                    out_weights, self._weights, recv_values, self._weights_splits, group=self._pg, async_op=True
                )
            )
        return _IdsTensorsAwaitable(works, out_ids, out_meta, out_weights, recv, self._keys, self._ctx)


class _AllToAllRows(torch.autograd.Function):
    """all_to_all_single over the rows of a 2-D tensor, differentiable.

    Backward sends the gradient rows back the way they came, divided by the
    world size when TorchRec's gradient division is on (as its own pooled
    all-to-all does, to match DDP's averaging of dense gradients).
    """

    @staticmethod
    def forward(ctx, x, pg, send_rows, recv_rows):  # type: ignore[override]
        out = x.new_empty((sum(recv_rows), x.shape[1]))
        dist.all_to_all_single(out, x.contiguous(), recv_rows, send_rows, group=pg)
        ctx.pg, ctx.send_rows, ctx.recv_rows = pg, send_rows, recv_rows
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad_in = grad.new_empty((sum(ctx.send_rows), grad.shape[1]))
        dist.all_to_all_single(grad_in, grad.contiguous(), ctx.send_rows, ctx.recv_rows, group=ctx.pg)
        if get_gradient_division():
            grad_in.div_(dist.get_world_size(ctx.pg))
        return grad_in, None, None, None


def pooled_output_dist(
    pooled: torch.Tensor, pg: dist.ProcessGroup, ctx: GroupDistContext, local_batch: int
) -> torch.Tensor:
    """Sends each source its rows of the owner's partial pools ``(sum(B_s), D)``
    and sums what every owner sent back: ``(local_batch, D)``."""
    world_size = dist.get_world_size(pg)
    received = _AllToAllRows.apply(pooled, pg, ctx.batch_size_per_rank, [local_batch] * world_size)
    return received.view(world_size, local_batch, pooled.shape[1]).sum(0)


class SeqDistContext:
    """Per sequence table and step: how this rank's values map onto the rows it gets back."""

    def __init__(self) -> None:
        self.unique_counts: List[int] = []  # per owner: distinct ids this rank sent it
        self.recv_counts: List[int] = []  # per source: ids this rank received (and returns rows for)
        self.gather = torch.empty(0, dtype=torch.int64)  # (N,) value -> row of the returned (U, D)
        self.bytes_sent: int = 0


class _UniqueIdsTensorAwaitable(Awaitable[KeyedJaggedTensor]):
    def __init__(self, work, out_ids: torch.Tensor, recv: List[int], key: str) -> None:
        super().__init__()
        self._work = work
        self._out_ids = out_ids
        self._recv = recv
        self._key = key

    def _wait_impl(self) -> KeyedJaggedTensor:
        self._work.wait()
        return KeyedJaggedTensor(
            keys=[self._key],
            values=self._out_ids,
            lengths=torch.tensor(self._recv, dtype=torch.int64, device=self._out_ids.device),
            stride=len(self._recv),
        )


class UniqueIdsAwaitable(Awaitable[Awaitable[KeyedJaggedTensor]]):
    """Input dist of one sequence table: every owner gets this rank's distinct ids it owns.

    Construction buckets and deduplicates ``ids`` (all the values of the
    table's features, concatenated), records in ``ctx.gather`` where each
    value's row will be in what comes back, and starts the counts
    all-to-all; the first ``wait`` starts the ids all-to-all; the second
    returns the owner's KJT: key ``key``, one "bag" per source rank holding
    the ids it sent.
    """

    def __init__(self, ids: torch.Tensor, key: str, pg: dist.ProcessGroup, ctx: SeqDistContext) -> None:
        super().__init__()
        self._pg = pg
        self._key = key
        world_size = dist.get_world_size(pg)
        n = ids.numel()
        device = ids.device
        b = ops.bucketize_dedup(ids, torch.tensor([0, n], dtype=torch.int64, device=device), world_size)
        counts = b.unique_counts
        ctx.unique_counts = counts.tolist()
        starts = torch.cumsum(counts, 0) - counts
        owner = torch.repeat_interleave(torch.arange(world_size, device=device), b.value_counts, output_size=n)
        gather = torch.empty(n, dtype=torch.int64, device=device)
        gather[b.value_perm] = starts[owner] + b.inverse.to(torch.int64)
        ctx.gather = gather
        rank = dist.get_rank(pg)
        ctx.bytes_sent = 8 * (sum(ctx.unique_counts) - ctx.unique_counts[rank])
        self._ctx = ctx
        self._ids = b.unique_ids
        self._recv = torch.empty_like(counts)
        self._work = dist.all_to_all_single(self._recv, counts, group=pg, async_op=True)

    def _wait_impl(self) -> Awaitable[KeyedJaggedTensor]:
        self._work.wait()
        recv = self._recv.tolist()
        self._ctx.recv_counts = recv
        out_ids = self._ids.new_empty((sum(recv),))
        work = dist.all_to_all_single(
            out_ids, self._ids, recv, self._ctx.unique_counts, group=self._pg, async_op=True
        )
        return _UniqueIdsTensorAwaitable(work, out_ids, recv, self._key)


def sequence_output_dist(rows: torch.Tensor, pg: dist.ProcessGroup, ctx: SeqDistContext) -> torch.Tensor:
    """Returns each source the rows of the ids it sent, and expands the rows this
    rank gets back to one per value: ``(N, D)``, differentiable (the gradients of
    repeated ids are summed before they travel back)."""
    received = _AllToAllRows.apply(rows, pg, ctx.recv_counts, ctx.unique_counts)
    return received.index_select(0, ctx.gather)


__all__ = [
    "GroupDistContext",
    "IdsSplitsAwaitable",
    "SeqDistContext",
    "UniqueIdsAwaitable",
    "pooled_output_dist",
    "sequence_output_dist",
]
