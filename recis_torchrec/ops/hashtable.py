# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Wrappers and fake kernels of the table ops: find, find_or_insert, export, import."""

from typing import Optional, Sequence, Tuple, Union

import torch

from recis_torchrec import _ext  # noqa: F401  (registers torch.ops.recis)

TableRef = Union[int, "HashTable"]  # noqa: F821  (recis_torchrec.tables.hash_table)


def _handle(table) -> int:
    return table if isinstance(table, int) else table.handle


def _segments(tables, ids: torch.Tensor, segment_offsets: Optional[torch.Tensor]):
    if isinstance(tables, (list, tuple)):
        handles = [-1 if t is None else _handle(t) for t in tables]
    else:
        handles = [_handle(tables)]
    if segment_offsets is None:
        if len(handles) != 1:
            raise ValueError("segment_offsets is required when more than one table is given")
        segment_offsets = torch.tensor([0, ids.numel()], dtype=torch.int64)
    return handles, segment_offsets


def find(
    tables: Union[TableRef, Sequence[Optional[TableRef]]],
    ids: torch.Tensor,
    segment_offsets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rows of ``ids`` in ``tables``; -1 where an id has no row. Inserts nothing.

    Args:
        tables: one table, or one table (or None to skip) per segment.
        ids: (N,) int64 ids.
        segment_offsets: (len(tables) + 1,) int64; segment s is
            ``ids[segment_offsets[s]:segment_offsets[s + 1]]``. Optional for one table.

    Returns:
        (N,) int64 rows.
    """
    handles, seg = _segments(tables, ids, segment_offsets)
    return torch.ops.recis.find(handles, ids, seg)


def find_or_insert(
    tables: Union[TableRef, Sequence[Optional[TableRef]]],
    ids: torch.Tensor,
    segment_offsets: Optional[torch.Tensor] = None,
    clock: int = 0,
) -> torch.Tensor:
    """Rows of ``ids``, inserting absent ids with their deterministic initial row.

    Same arguments as :func:`find`, plus ``clock``, the tables' update count,
    which the lookup marks rows with (for TTL/LRU/LFU eviction). Duplicate ids
    get the same row. Ids refused by admission or a full cap get -1.
    """
    handles, seg = _segments(tables, ids, segment_offsets)
    return torch.ops.recis.find_or_insert(handles, ids, seg, clock)


def table_export(
    table: TableRef, since: int = -1
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The live rows written after update ``since`` (-1: all):
    ``(ids (n,), weights (n, dim), state (n, state_dim), meta (n, 3))``, meta =
    (last_seen, last_update, freq)."""
    return torch.ops.recis.table_export(_handle(table), since)


def table_import(
    table: TableRef,
    ids: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    state: Optional[torch.Tensor] = None,
    meta: Optional[torch.Tensor] = None,
) -> None:
    """Writes rows for distinct ``ids``, inserting absent ones.

    ``weights`` (n, dim), ``state`` (n, state_dim) and ``meta`` (n, 3) are
    optional; whatever is None keeps its current value (the initial value for
    new rows).
    """
    torch.ops.recis.table_import(_handle(table), ids, weights, state, meta)


@torch.library.register_fake("recis::find")
def _find_fake(tables, ids, segment_offsets):
    return torch.empty_like(ids)


@torch.library.register_fake("recis::find_or_insert")
def _find_or_insert_fake(tables, ids, segment_offsets, clock=0):
    return torch.empty_like(ids)


# table_export and table_import move whole tables between host memory and the
# table; they are not traced, so they have no fake kernels.
