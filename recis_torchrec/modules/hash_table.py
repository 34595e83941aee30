# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``HashTable``: the Python owner of one C++ dynamic table."""

import hashlib
from typing import Dict, Optional, Tuple

import torch

from recis_torchrec import ops
from recis_torchrec.ops import constants
from recis_torchrec._ext import C
from recis_torchrec.modules.options import HashTableOptions


# The most rows reserved up front from a config's num_embeddings hint.
HINT_CAPACITY_CAP = 1 << 20

# Row element dtypes and their C++ RowType codes (csrc/hashtable/row_types.h).
ROW_TYPES = {getattr(torch, name): code for name, code in constants.ROW_TYPES.items()}


def stable_name_hash(name: str) -> int:
    """A 64-bit hash of a table name that is the same in every process."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def table_parameters(
    name: str, options: HashTableOptions, num_embeddings: int, init_range: Tuple[float, float]
) -> Tuple[int, float, float, int, int]:
    """``(init kind, a, b, seed, initial capacity)`` of a table, the same on every device."""
    if options.initializer == "uniform":
        a = init_range[0] if options.init_min is None else options.init_min
        b = init_range[1] if options.init_max is None else options.init_max
        if a > b:
            raise ValueError(f"HashTable {name!r}: uniform initializer bounds [{a}, {b}] are reversed")
    elif options.initializer in ("normal", "truncated_normal"):
        a, b = options.init_mean, options.init_std
    else:
        a, b = options.init_value, 0.0
    if options.initial_capacity is not None:
        capacity = options.initial_capacity
    else:
        # num_embeddings is only a hint, and TorchRec configs often hold a
        # hash-space size (2**40, say): never reserve more than the cap for it.
        capacity = min(max(num_embeddings, 0), HINT_CAPACITY_CAP)
    seed = (stable_name_hash(name) ^ (options.seed * 0x9E3779B97F4A7C15)) % 2**64
    if options.max_capacity is not None:
        capacity = min(capacity, options.max_capacity)
    return options.init_kind(), float(a), float(b), seed, int(capacity)


class HashTable:
    """One dynamic table: an IdMap from int64 ids to rows, plus row blocks.

    Each row holds ``dim`` embedding floats and ``state_dim`` optimizer-state
    floats. The table is released when this object is garbage collected.
    Copying (``copy.deepcopy``) and pickling copy the rows.

    Args:
        name: the table's name; it seeds the per-id initialiser.
        dim: embedding dimension.
        state_dim: optimizer-state floats per row.
        options: sizing and initialisation.
        num_embeddings: the config's capacity hint, used when
            ``options.initial_capacity`` is None.
        init_range: default uniform bounds when the options leave them None.
        dtype: how the embedding elements are stored: ``torch.float32``, ``torch.float16`` or
            ``torch.bfloat16`` (optimizer state is float32 either way; arithmetic is float32, and
            16-bit rows are rounded to nearest even when written).
    """

    def __init__(
        self,
        name: str,
        dim: int,
        state_dim: int = 0,
        options: Optional[HashTableOptions] = None,
        num_embeddings: int = 0,
        init_range: Tuple[float, float] = (-0.01, 0.01),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype not in ROW_TYPES:
            raise ValueError(f"HashTable {name!r}: dtype {dtype} is not supported; use one of {list(ROW_TYPES)}")
        if dim <= 0:
            raise ValueError(f"HashTable {name!r}: dim must be > 0, got {dim}")
        options = options or HashTableOptions()
        if options.host_rows or (options.device is not None and torch.device(options.device).type != "cpu"):
            raise ValueError(
                f"HashTable {name!r}: options ask for a CUDA table (device={options.device!r}, "
                f"host_rows={options.host_rows}); CUDA tables are CudaHashTable (a module with device='cuda')"
            )
        self.name = name
        self.dim = dim
        self.state_dim = state_dim
        self.options = options
        self.num_embeddings = num_embeddings
        self.init_range = init_range
        self.dtype = dtype
        kind, a, b, seed, capacity = table_parameters(name, options, num_embeddings, init_range)
        self.handle: int = C.create_table(
            dim,
            state_dim,
            int(capacity),
            options.block_rows,
            kind,
            float(a),
            float(b),
            seed,
            admit_threshold=options.admit_threshold,
            ttl_steps=options.ttl_steps or 0,
            max_capacity=options.max_capacity or 0,
            policy=options.policy_code(),
            row_type=ROW_TYPES[dtype],
        )

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None and C is not None:
            C.release_table(handle)
            self.handle = None

    # -- introspection -------------------------------------------------------

    def __len__(self) -> int:
        return C.table_info(self.handle)["rows"]

    def info(self) -> Dict[str, int]:
        """rows, capacity, memory_bytes, dim, state_dim, row_bytes (bytes from one row to the next), num_blocks, block_rows,
        and the hygiene counters: admitted, evicted, rejected (lookups refused a row),
        pending (ids counted toward admission)."""
        return C.table_info(self.handle)

    def memory_bytes(self) -> int:
        """Bytes held by the IdMap and the row blocks."""
        return C.table_info(self.handle)["memory_bytes"]

    def __repr__(self) -> str:
        info = self.info()
        return (
            f"HashTable(name={self.name!r}, dim={self.dim}, state_dim={self.state_dim}, rows={info['rows']}, "
            f"memory={info['memory_bytes'] / 2**20:.1f} MiB)"
        )

    # -- data ------------------------------------------------------------------

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.find(self, ids)

    def find_or_insert(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.find_or_insert(self, ids)

    def export(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids (n,), weights (n, dim) of the table's dtype, state (n, state_dim))`` of the live rows, in row
        order."""
        ids, weights, state, _ = ops.table_export(self)
        return ids, weights, state

    def export_rows(self, since: int = -1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, weights, state, meta (n, 3) = (last_seen, last_update, freq))`` of the
        live rows written after update ``since`` (-1: all)."""
        return ops.table_export(self, since)

    def export_chunk(
        self, start: int, since: int, ids: torch.Tensor, weights: torch.Tensor, state: torch.Tensor,
        meta: torch.Tensor,
    ) -> Tuple[int, int]:
        """Copies up to ``ids.numel()`` live rows written after update ``since``, from row index
        ``start`` on, into the buffers; returns ``(rows copied, the start of the next chunk)``. A saver
        streams a table through fixed buffers with it."""
        return C.export_chunk(self.handle, start, since, ids, weights, state, meta)

    def import_(
        self,
        ids: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        state: Optional[torch.Tensor] = None,
        meta: Optional[torch.Tensor] = None,
    ) -> None:
        """Writes rows for distinct ids (bypassing admission and the cap); a None part keeps its value.
        Weights of another float dtype are converted to the table's (rounded to nearest even)."""
        if weights is not None and weights.dtype != self.dtype:
            weights = weights.to(self.dtype)
        ops.table_import(self, ids, weights, state, meta)

    def clear(self) -> None:
        """Drops every row, the admission counters and the eviction log (rows' memory is kept)."""
        C.clear(self.handle)

    def evict_stale(self, clock: int) -> int:
        """Evicts now every row not looked up since update ``clock - ttl_steps``; returns how many."""
        return C.evict_stale(self.handle, clock)

    def erase(self, ids: torch.Tensor, clock: int = 0) -> int:
        """Frees the rows of ``ids`` (recorded as evicted at ``clock``); returns how many had one."""
        return C.erase(self.handle, ids.to(torch.int64), clock)

    def evicted_since(self, since: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids, steps)`` evicted after update ``since``."""
        return C.evicted_since(self.handle, since)

    def restart_eviction_log(self, clock: int) -> None:
        """Declares the table restored as it was at update ``clock``: ``evicted_since`` answers for
        the evictions after it and refuses earlier ones. After ``clear()`` and before this (or the
        next training lookup, which does the same at its clock), it refuses every ``since``."""
        C.restart_eviction_log(self.handle, clock)

    def export_pending(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids, counts)``: sightings of ids still waiting for admission."""
        return C.export_pending(self.handle)

    def import_pending(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        C.import_pending(self.handle, ids.to(torch.int64), counts.to(torch.int64))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings ``(n, dim)`` of ids, as the model sees them, inserting nothing.

        Ids without a row read their initial value.
        """
        ids = ids.reshape(-1).to(torch.int64)
        rows = self.find(ids)
        offsets = torch.arange(ids.numel() + 1, dtype=torch.int64)
        return ops.pooled_forward([self], ids, rows, offsets, None, [0], [ops.POOLING_SUM], [0], self.dim)

    # -- copying -------------------------------------------------------------

    def _spec(self):
        return (self.name, self.dim, self.state_dim, self.options, self.num_embeddings, self.init_range, self.dtype)

    def __getstate__(self):
        ids, weights, state, meta = self.export_rows()
        pending = self.export_pending()
        return {"spec": self._spec(), "ids": ids, "weights": weights, "state": state, "meta": meta, "pending": pending}

    def __setstate__(self, d) -> None:
        self.__init__(*d["spec"])
        if d["ids"].numel():
            self.import_(d["ids"], d["weights"], d["state"] if self.state_dim else None, d.get("meta"))
        if "pending" in d and d["pending"][0].numel():
            self.import_pending(*d["pending"])

    def __deepcopy__(self, memo) -> "HashTable":
        new = HashTable.__new__(HashTable)
        new.__setstate__(self.__getstate__())
        memo[id(self)] = new
        return new
