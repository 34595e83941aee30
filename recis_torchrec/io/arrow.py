# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Arrow columns -> ``Batch(dense_features, sparse_features=KJT, labels)``, CSR-native.

No Python loop runs over rows: list offsets become KJT lengths through
Arrow's compute kernels, values are taken from Arrow's buffers (zero copy
where the types allow), and string ids are hashed in C++ straight from
Arrow's offset and data buffers.
"""

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recis_torchrec import ops
from recis_torchrec.io.schema import WEIGHTS_SUFFIX, Schema


class ColumnError(ValueError):
    """A column that is missing, or of a type the schema cannot use; names the file and the column."""


def _seed(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed


def _numpy(arr: pa.Array, dtype) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


# The loader wraps Arrow's immutable buffers in tensors without copying; they
# only feed ops that read them (torch.cat, the conversion ops), so torch's
# warning about non-writable arrays does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over a (possibly read-only, Arrow-owned) numpy array, without a copy."""
    return torch.from_numpy(a)


def _hash_string_array(arr: pa.Array, seed: int) -> torch.Tensor:
    """XXH64 of every (non-null) string of a string/binary array, from its buffers."""
    if len(arr) == 0:
        return torch.empty(0, dtype=torch.int64)
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    if not (large or pa.types.is_string(arr.type) or pa.types.is_binary(arr.type)):
        arr = arr.cast(pa.string())
    _, offsets_buf, data_buf = arr.buffers()
    off_dtype = np.int64 if large else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=off_dtype, count=len(arr) + 1, offset=arr.offset * off_dtype().itemsize)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    return ops.hash_strings(_tensor(data), _tensor(offsets), _seed(seed))


def _is_id_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)


def _ids_of(flat: pa.Array, seed: int) -> torch.Tensor:
    """int64 ids of a flat array without nulls: integers as they are, strings hashed."""
    if pa.types.is_integer(flat.type):
        return _tensor(_numpy(flat, np.int64))
    return _hash_string_array(flat, seed)


@dataclass
class SparseColumn:
    """One sparse column as CSR: per-row ``lengths`` and the flat ``values``.

    ``raw_lengths`` are the list lengths before null ids were dropped,
    ``kept`` (or None) marks the flat list entries kept, and ``insert_at``
    (or None) the value positions where a null row's default id was put, so
    that a weight column can be aligned the same way.
    """

    lengths: torch.Tensor
    values: torch.Tensor
    raw_lengths: torch.Tensor
    kept: Optional[torch.Tensor] = None
    insert_at: Optional[torch.Tensor] = None


def _list_array(offsets: np.ndarray, values: pa.Array, nulls: Optional[np.ndarray]) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values,
                                    mask=pa.array(nulls) if nulls is not None and nulls.any() else None)


def _string_buffers(arr: pa.Array) -> Tuple[torch.Tensor, torch.Tensor]:
    """(data uint8, offsets (n + 1,)) of a string array, zero-copy."""
    large = pa.types.is_large_string(arr.type)
    _, offsets_buf, data_buf = arr.buffers()
    off_dtype = np.int64 if large else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=off_dtype, count=len(arr) + 1, offset=arr.offset * off_dtype().itemsize)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    return _tensor(data), _tensor(offsets)


# Delimiters lists are commonly written with in one CSV field, and the columns already checked for them.
LIST_DELIMITERS = ("^", "|", ";", ",")
_delimiter_checked: set = set()


def warn_undeclared_list(col: pa.Array, column: str, where: str, schema: Schema) -> None:
    """Warns once per column (of a schema) when most of a scalar string column's values contain a list delimiter:
    without ``list_delimiter`` each field is hashed as one id, and the column trains as one id per row."""
    key = (id(schema), column)
    if key in _delimiter_checked:
        return
    _delimiter_checked.add(key)
    sample = col.slice(0, 4096).drop_null()
    if len(sample) == 0:
        return
    for d in LIST_DELIMITERS:
        share = pc.sum(pc.match_substring(sample, d)).as_py() / len(sample)
        if share > 0.5:
            warnings.warn(
                f"{where}: {share:.0%} of column {column!r}'s values contain {d!r}, yet it is read as one id per "
                f"row (no list delimiter declared); if it holds lists, declare Schema(list_delimiter={{{column!r}: "
                f"{d!r}}}) ([data.schema].list_delimiter in a config)", UserWarning, stacklevel=2)
            return


def normalize_csv(table: pa.Table, schema: Schema, where: str) -> pa.Table:
    """A CSV/TSV table's id columns as int64 (or ``list<int64>`` for delimited lists, with a
    ``list<float>`` weights column beside it for ``id:weight`` items), in one C++ pass over each
    column's bytes (``ops.parse_id_lists``): a canonical decimal integer is that integer, any other
    text hashed; empty fields and empty list items are dropped (null), so a null field is an empty bag."""
    for c in schema.sparse_columns():
        if c not in table.column_names:
            continue
        col = table.column(c).combine_chunks()
        if pa.types.is_null(col.type):
            col = pa.nulls(len(col), pa.string())
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            continue
        delim = schema.delimiter_of(c)
        if delim is None:
            warn_undeclared_list(col, c, where, schema)
        wdelim = schema.weight_delimiter if delim is not None and schema.weight_delimiter else ""
        nulls = torch.from_numpy(_numpy(col.is_null(), np.bool_)) if col.null_count else None
        data, offsets = _string_buffers(col)
        try:
            lengths, ids, weights = ops.parse_id_lists(data, offsets, nulls, delim or "", wdelim,
                                                       _seed(schema.hash_seed), c)
        except RuntimeError as e:
            raise ColumnError(f"{where}: {str(e).splitlines()[0]}") from None
        i = table.column_names.index(c)
        empty = (lengths == 0).numpy()
        if delim is None:  # a scalar column: one id, or null where the field is empty
            full = np.zeros(len(col), dtype=np.int64)
            full[~empty] = ids.numpy()
            table = table.set_column(i, c, pa.array(full, mask=empty if empty.any() else None))
            continue
        offs = np.concatenate([[0], np.cumsum(lengths.numpy())])
        table = table.set_column(i, c, _list_array(offs, pa.array(ids.numpy()), empty if col.null_count else None))
        if weights is not None:
            table = table.append_column(c + WEIGHTS_SUFFIX, _list_array(offs, pa.array(weights.numpy()), None))
    return table


def sparse_column(col: pa.Array, column: str, where: str, schema: Schema) -> SparseColumn:
    """One sparse column as int64 lengths (B,) and values."""
    t = col.type
    if pa.types.is_null(t):  # an all-null column: every bag empty
        zeros = torch.zeros(len(col), dtype=torch.int64)
        return SparseColumn(zeros, torch.empty(0, dtype=torch.int64), zeros)
    default = schema.defaults.get(column)
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    value_type = t.value_type if is_list else t
    if not _is_id_type(value_type):
        raise ColumnError(
            f"{where}: column {column!r} holds {t}, but sparse ids must be integers or strings "
            "(or lists of them)"
        )
    if default is not None:
        default_id = default if isinstance(default, int) else ops.hash_string(str(default), schema.hash_seed)
    if not is_list:
        if col.null_count == 0:
            ones = torch.ones(len(col), dtype=torch.int64)
            return SparseColumn(ones, _ids_of(col, schema.hash_seed), ones)
        if default is not None:
            ids = _ids_of(col.fill_null(0) if pa.types.is_integer(t) else col.fill_null(""), schema.hash_seed).clone()
            ids[torch.from_numpy(_numpy(col.is_null(), np.bool_))] = default_id
            ones = torch.ones(len(col), dtype=torch.int64)
            return SparseColumn(ones, ids, ones)
        lengths = torch.from_numpy(_numpy(col.is_valid(), np.int64))
        return SparseColumn(lengths, _ids_of(col.drop_null(), schema.hash_seed), lengths)
    # Lists: null lists are empty (or the default), null ids inside lists are dropped.
    raw = _numpy(pc.list_value_length(col).fill_null(0), np.int64)
    lengths = raw
    flat = pc.list_flatten(col)
    kept = None
    if flat.null_count:
        valid = _numpy(flat.is_valid(), np.bool_)
        starts = np.concatenate([[0], np.cumsum(raw)[:-1]]) if len(raw) else raw
        counts = np.add.reduceat(valid.astype(np.int64), starts) if len(valid) else np.zeros_like(raw)
        lengths = np.where(raw > 0, counts, 0).astype(np.int64)
        flat = flat.drop_null()
        kept = torch.from_numpy(valid.copy())
    values = _ids_of(flat, schema.hash_seed)
    lengths_t = torch.from_numpy(lengths)
    insert_at = None
    if default is not None and col.null_count:
        nulls = torch.from_numpy(_numpy(col.is_null(), np.bool_))
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths_t.cumsum(0)])
        insert_at = offsets[:-1][nulls]
        values = _insert(values, insert_at, default_id)
        lengths_t = lengths_t.clone()
        lengths_t[nulls] = 1
    return SparseColumn(lengths_t, values, torch.from_numpy(raw), kept, insert_at)


def _insert(values: torch.Tensor, positions: torch.Tensor, value) -> torch.Tensor:
    """values with `value` inserted before each of the (sorted) positions."""
    n = values.numel() + positions.numel()
    out = torch.empty(n, dtype=values.dtype)
    slots = positions + torch.arange(positions.numel())
    mask = torch.ones(n, dtype=torch.bool)
    mask[slots] = False
    out[mask] = values
    out[slots] = value
    return out


def weight_column(col: pa.Array, column: str, key: str, ids: SparseColumn, where: str) -> torch.Tensor:
    """The per-id weights of a ``list<float>`` column, aligned with its key's ids."""
    t = col.type
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if not is_list or not pa.types.is_floating(t.value_type) and not pa.types.is_integer(t.value_type):
        raise ColumnError(f"{where}: weight column {column!r} of KJT key {key!r} must be list<float>, got {t}")
    w_lengths = torch.from_numpy(_numpy(pc.list_value_length(col).fill_null(0), np.int64))
    if not torch.equal(w_lengths, ids.raw_lengths):
        bad = int(torch.nonzero(w_lengths != ids.raw_lengths)[0, 0])
        raise ColumnError(
            f"{where}: weight column {column!r} has {int(w_lengths[bad])} weights at row {bad} but KJT key "
            f"{key!r} has {int(ids.raw_lengths[bad])} ids there"
        )
    w = _tensor(_numpy(pc.list_flatten(col).fill_null(1.0), np.float32))
    if ids.kept is not None:
        w = w[ids.kept]
    if ids.insert_at is not None:
        w = _insert(w, ids.insert_at, 1.0)
    return w


_FAST_DENSE = {pa.float32(): np.float32, pa.float64(): np.float64, pa.int64(): np.int64, pa.int32(): np.int32,
               pa.int8(): np.int8}
_FAST_IDS = {pa.int64(): np.int64, pa.int32(): np.int32}
_EMPTY_BITMAP = torch.empty(0, dtype=torch.uint8)


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _buffers(arr: pa.Array, np_type) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Zero-copy (values from the array's first row, validity bitmap or empty, bitmap bit offset)."""
    validity, data = arr.buffers()[:2]
    itemsize = np.dtype(np_type).itemsize
    values = _tensor(np.frombuffer(data, dtype=np_type, count=len(arr), offset=arr.offset * itemsize))
    if arr.null_count == 0 or validity is None:
        return values, _EMPTY_BITMAP, 0
    return values, _tensor(np.frombuffer(validity, dtype=np.uint8)), arr.offset


def dense_matrix(table: pa.Table, columns: Tuple[str, ...], schema: Schema, where: str, role: str) -> torch.Tensor:
    """(B, len(columns)) float32 of numeric columns, nulls replaced by their defaults; a NaN or
    infinite value (``inf`` in a CSV, an overflow to float32) is refused, naming the column."""
    out = _dense_matrix(table, columns, schema, where, role)
    if out.numel() and not bool(torch.isfinite(out).all()):
        bad = ~torch.isfinite(out)
        row, j = (int(x) for x in torch.nonzero(bad)[0])
        raise ColumnError(f"{where}: {role} column {columns[j]!r} holds {int(bad[:, j].sum())} NaN or infinite "
                          f"values (the first at row {row}: {float(out[row, j])}); the model would train on them")
    return out


def _dense_matrix(table: pa.Table, columns: Tuple[str, ...], schema: Schema, where: str, role: str) -> torch.Tensor:
    if not columns:
        return torch.empty(table.num_rows, 0)
    arrays = [_column(table, c) for c in columns]
    all_null = any(pa.types.is_null(a.type) or (len(a) and a.null_count == len(a)) for a in arrays)
    if all_null:  # a column of nulls only (Arrow's null type): every value is the column's default
        arrays = [pa.nulls(len(a), pa.float64()) if pa.types.is_null(a.type) else a for a in arrays]
        table = pa.table(dict(zip(columns, arrays)))
    elif all(a.type in _FAST_DENSE for a in arrays):  # one C++ pass over Arrow's buffers
        parts = [_buffers(a, _FAST_DENSE[a.type]) for a in arrays]
        defaults = [float(schema.defaults.get(c, schema.dense_default)) for c in columns]
        return ops.arrow_dense(
            [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], defaults, table.num_rows
        )
    out = np.empty((table.num_rows, len(columns)), dtype=np.float32)
    for j, c in enumerate(columns):
        col = table.column(c)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
            raise ColumnError(f"{where}: {role} column {c!r} must be numeric, got {col.type}")
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if col.null_count:
            col = col.cast(pa.float64()).fill_null(float(schema.defaults.get(c, schema.dense_default)))
        out[:, j] = col.to_numpy(zero_copy_only=False)
    return torch.from_numpy(out)


def check_columns(names: List[str], schema: Schema, where: str) -> None:
    """Raises ColumnError naming the first schema column the file lacks."""
    have = set(names)
    for c in schema.columns():
        if c not in have:
            hint = ""
            if not schema.column_names:
                hint = ("; if the file has no header line (its first row is data), name its columns with "
                        "Schema.column_names ([data.schema].column_names in a config)")
            raise ColumnError(f"{where}: column {c!r} is missing (the file has {sorted(have)}){hint}")


def transform_dense(dense: torch.Tensor, schema: Schema) -> torch.Tensor:
    """``schema.dense_transform`` applied to raw ``dense_features`` (columns ``schema.dense``)."""
    if isinstance(schema.dense_transform, str) and schema.dense_transform == "none":
        return dense
    out = dense.clone()
    for j, c in enumerate(schema.dense):
        t = schema.transform_of(c)
        if t == "log1p":
            out[:, j] = torch.log1p(out[:, j].clamp(min=0))
        elif t == "standardize":
            if c not in schema.dense_stats:
                raise ColumnError(f"dense column {c!r}: dense_transform 'standardize' needs Schema.dense_stats[{c!r}]")
            mean, std = schema.dense_stats[c]
            out[:, j] = (out[:, j] - float(mean)) / max(float(std), 1e-12)
    return out


def _gathered(table: pa.Table, key: str, columns: Sequence[str], masks: Optional[Sequence[str]], where: str,
              schema: Schema) -> Tuple[SparseColumn, Optional[torch.Tensor]]:
    """One KJT key from several columns: each row's ids of the columns in order (a column whose
    mask is 0 at a row, or null, gives none); and their weights, if any column has some."""
    b = table.num_rows
    pieces = []
    for j, c in enumerate(columns):
        col = _column(table, c)
        if masks is not None:
            m = _column(table, masks[j])
            if not (pa.types.is_integer(m.type) or pa.types.is_boolean(m.type) or pa.types.is_floating(m.type)
                    or pa.types.is_null(m.type)):
                raise ColumnError(f"{where}: mask column {masks[j]!r} of KJT key {key!r} must be numeric, got {m.type}")
            off = pc.fill_null(pc.equal(pc.cast(m, pa.float64()), 0.0), True) if not pa.types.is_null(m.type) \
                else pa.array(np.ones(len(m), dtype=np.bool_))
            col = pc.if_else(off, pa.scalar(None, type=col.type), col)
        sc = sparse_column(col, c, where, schema)
        w = None
        if c + WEIGHTS_SUFFIX in table.column_names:
            w = weight_column(_column(table, c + WEIGHTS_SUFFIX), c, key, sc, where)
        pieces.append((sc, w))
    lengths = torch.stack([sc.lengths for sc, _ in pieces]).sum(0) if pieces else torch.zeros(b, dtype=torch.int64)
    rows = torch.cat([torch.repeat_interleave(torch.arange(b), sc.lengths) for sc, _ in pieces])
    order = torch.sort(rows, stable=True).indices
    values = torch.cat([sc.values for sc, _ in pieces])[order]
    weights = None
    if any(w is not None for _, w in pieces):
        weights = torch.cat([w if w is not None else torch.ones(sc.values.numel()) for sc, w in pieces])[order]
    return SparseColumn(lengths, values, lengths), weights


def to_batch(table: pa.Table, schema: Schema, where: str, transform: bool = True) -> Batch:
    """A TorchRec ``Batch`` from an Arrow table holding the schema's columns (with ``transform``
    False, ``dense_features`` are the raw values, before ``schema.dense_transform``)."""
    check_columns(table.column_names, schema, where)
    dense = dense_matrix(table, schema.dense, schema, where, "dense")
    if transform:
        dense = transform_dense(dense, schema)
    labels = dense_matrix(table, schema.labels, schema, where, "label")
    if labels.shape[1] == 1:
        labels = labels[:, 0]
    keys = list(schema.sparse)
    names = set(table.column_names)
    delimited_weights = {k for k, c in schema.sparse.items()
                         if any(x + WEIGHTS_SUFFIX in names for x in ([c] if isinstance(c, str) else c))}
    # Integer scalar id columns without defaults (the common, pre-hashed
    # case) take one C++ pass over Arrow's buffers.
    fast = [
        k
        for k, c in schema.sparse.items()
        if isinstance(c, str) and k not in schema.masks and table.schema.field(c).type in _FAST_IDS
        and c not in schema.defaults and k not in schema.weights
    ]
    lengths: List[torch.Tensor] = []
    values: List[torch.Tensor] = []
    weights: Optional[List[torch.Tensor]] = [] if schema.weights or delimited_weights else None
    fast_out = {}
    if fast:
        arrays = [_column(table, schema.sparse[k]) for k in fast]
        parts = [_buffers(a, _FAST_IDS[a.type]) for a in arrays]
        v, l = ops.arrow_scalar_ids([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], table.num_rows)
        if len(fast) == len(keys) and weights is None:
            kjt = KeyedJaggedTensor(keys=keys, values=v, lengths=l, stride=table.num_rows)
            return Batch(dense_features=dense, sparse_features=kjt, labels=labels)
        per_key = l.view(len(fast), table.num_rows)
        for k, lk, vk in zip(fast, per_key, v.split(per_key.sum(1).tolist())):
            fast_out[k] = SparseColumn(lk, vk, lk)
    for key, column in schema.sparse.items():
        gathered_w = None
        if key in fast_out:
            sc = fast_out[key]
        elif isinstance(column, str) and key not in schema.masks and key not in delimited_weights:
            sc = sparse_column(_column(table, column), column, where, schema)
        else:
            cols = [column] if isinstance(column, str) else list(column)
            mask = schema.masks.get(key)
            sc, gathered_w = _gathered(table, key, cols, None if mask is None else (
                [mask] if isinstance(mask, str) else list(mask)), where, schema)
        lengths.append(sc.lengths)
        values.append(sc.values)
        if weights is not None:
            wcol = schema.weights.get(key)
            if gathered_w is not None:
                weights.append(gathered_w)
            elif wcol is None:
                weights.append(torch.ones(sc.values.numel()))
            else:
                weights.append(weight_column(_column(table, wcol), wcol, key, sc, where))
    kjt = KeyedJaggedTensor(
        keys=list(schema.sparse),
        values=torch.cat(values) if values else torch.empty(0, dtype=torch.int64),
        lengths=torch.cat(lengths) if lengths else torch.empty(0, dtype=torch.int64),
        weights=torch.cat(weights) if weights else None,
        stride=table.num_rows,
    )
    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)
