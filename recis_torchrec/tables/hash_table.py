# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``HashTable``: the Python owner of one C++ dynamic table."""

import hashlib
import os
import threading
from typing import Any, Dict, Optional, Tuple

import torch

from recis_torchrec import ops
from recis_torchrec.ops import constants
from recis_torchrec._ext import C
from recis_torchrec.tables.options import HashTableOptions
from recis_torchrec.ops.devices import require_cuda


# The most rows reserved up front from a config's num_embeddings hint.
HINT_CAPACITY_CAP = 1 << 20

# storage="ssd": export_chunk's start values from here on index the disk's slots (below: cache rows).
DISK_START = 1 << 62
# A clock no row has been seen at: before any step, a spill may take any row not kept.
NONE_IN_USE = 1 << 32
# IdMap bytes per cached row, counted against cache_bytes.
CACHE_ROW_OVERHEAD = 32

# Row element dtypes and their C++ RowType codes (csrc/hashtable/row_types.h).
ROW_TYPES = {getattr(torch, name): code for name, code in constants.ROW_TYPES.items()}


def stable_name_hash(name: str) -> int:
    """A 64-bit hash of a table name that is the same in every process."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def table_parameters(
    name: str, options: HashTableOptions, num_embeddings: int, init_range: Tuple[float, float], dim: int = 0,
    state_dim: int = 0,
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
    if options.storage == "ssd":  # the table is the cache: reserve no more than its budget
        capacity = min(capacity, options.cache_bytes // (4 * dim + 4 * state_dim + CACHE_ROW_OVERHEAD))
    return options.init_kind(), float(a), float(b), seed, int(capacity)


class HashTable:
    """One dynamic table: an IdMap from int64 ids to rows, plus row blocks, on the CPU or a GPU.

    Each row holds ``dim`` embedding values and ``state_dim`` optimizer-state
    floats. The table is released when this object is garbage collected.
    Copying (``copy.deepcopy``) and pickling copy the rows into a new table.
    The ``recis`` ops run on whichever device the table and the ids are on.

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
            16-bit rows are rounded to nearest even when written). CUDA tables: float32.
        device: ``"cpu"`` (None) or a CUDA device (a ``RECIS_CUDA=1`` build); ``options.device``
            and ``options.host_rows`` choose it too. CUDA tables have no admission, TTL or cap
            (they raise) and dims up to 1024.

    With ``options.storage="ssd"`` the C++ table is a cache of at most ``cache_rows`` hot rows and the
    others live in a file under ``options.storage_path`` (``csrc/hashtable/disk_rows.h``). Every call
    here sees the whole table: ``len``, ``export*``, ``lookup`` and checkpoints cover the rows on disk;
    ``find`` and ``find_or_insert`` first bring the ids' rows into the cache (the row numbers they
    return are the cache's). ``prefetch`` does that ahead of a step.
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
        device: Optional[Any] = None,
    ) -> None:
        if dtype not in ROW_TYPES:
            raise ValueError(f"HashTable {name!r}: dtype {dtype} is not supported; use one of {list(ROW_TYPES)}")
        if dim <= 0:
            raise ValueError(f"HashTable {name!r}: dim must be > 0, got {dim}")
        options = options or HashTableOptions()
        self.device = _table_device(name, device, options)
        self.name = name
        self.dim = dim
        self.state_dim = state_dim
        self.options = options
        self.num_embeddings = num_embeddings
        self.init_range = init_range
        # The training run the rows belong to (a random id given at the first save or export, kept by
        # checkpoints): deltas and packages carry it, so a delta of another run is refused.
        self.lineage: Optional[str] = None
        self.dtype = dtype
        self.handle: Optional[int] = None
        self._export_index: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # a CUDA export pass's (ids, rows)
        if self.device.type == "cuda":
            _check_cuda_table(name, dim, dtype, options)
        _check_reservable(name, dim, state_dim, dtype, options)
        self.handle = self._create()
        self.cache_rows = 0  # storage="ssd": the cache's budget in rows
        self._in_use_clock = NONE_IN_USE  # storage="ssd": rows seen at this clock or later stay in the cache
        self.rows_read_at_lookup = 0  # storage="ssd": rows lookups had to read themselves (no prefetch ahead)
        self._ahead = torch.zeros(0, dtype=torch.int64)  # storage="ssd": the ids the last prefetch brought in
        self._last_disk_scan = 0  # storage="ssd": the clock of the last TTL scan of the rows on disk
        self._mover = threading.Lock()  # storage="ssd": held by a prefetch; a lookup that finds it held skips its spill
        if options.storage == "ssd":
            self._attach_disk()

    def _attach_disk(self) -> None:
        o = self.options
        if not os.path.isdir(o.storage_path):
            raise FileNotFoundError(f"HashTable {self.name!r}: storage_path {o.storage_path!r} is not a directory")
        C.disk_attach(self.handle, o.storage_path, o.io_threads)
        self.cache_rows = max(1, o.cache_bytes // (C.table_info(self.handle)["row_bytes"] + CACHE_ROW_OVERHEAD))

    @property
    def on_disk(self) -> bool:
        """The table keeps rows on disk behind a cache (``storage="ssd"``)."""
        return self.options.storage == "ssd"

    def prefetch(self, ids: torch.Tensor, clock: Optional[int] = None, keep: Optional[torch.Tensor] = None,
                 lookup: bool = False, train: bool = False) -> int:
        """``storage="ssd"``: brings the rows of ``ids`` from disk into the cache, then moves the least
        recently used rows past the cache's budget to disk, down to 90% of it. Rows of ``ids`` and
        ``keep`` stay, and so do rows seen at the clock of the step that runs or later: ``clock``
        (the lookup's update count) declares that step; without it the last one declared holds.
        ``lookup``: called by a lookup, which must not wait for a prefetch stage's spill in flight
        (it skips its own spill then, and keeps the rows that prefetch brought in; it still reads any of
        its own rows still on disk). ``train``: a training lookup at ``clock``, which under ``ttl_steps``
        scans the rows on disk when the cache's own TTL scan runs (every ttl_steps / 4 updates, before
        the lookup). Returns the rows read; a table in memory has nothing to do (0)."""
        if not self.on_disk:
            return 0
        if clock is not None:
            self._in_use_clock = clock
        ids = self._ids(ids)
        keep = ids if keep is None else torch.cat([ids, self._ids(keep)])
        if not lookup:
            with self._mover:
                self._ahead = ids
                got = C.disk_fill(self.handle, ids)
                self._spill(keep)
            return got
        got = C.disk_fill(self.handle, ids) if C.disk_has_any(self.handle, ids) else 0
        self.rows_read_at_lookup += got
        ttl = self.options.ttl_steps
        if train and ttl and clock is not None and clock - self._last_disk_scan >= max(1, ttl // 4):
            self._evict_stale_on_disk(clock)
        if self._mover.acquire(blocking=False):  # else a prefetch is under way, and it spills
            try:
                self._spill(torch.cat([keep, self._ahead]))  # what a prefetch brought in for the next step stays
            finally:
                self._mover.release()
        return got

    def _check_copy_fits(self, rows: int) -> None:
        """A copy of a table on disk in memory (export_rows, and what uses it: deepcopy, pickling,
        state dicts, inference packages) is refused, naming the table, when it would take more than half
        the memory available; checkpoint.save streams such a table instead."""
        need = rows * (8 + self.dtype.itemsize * self.dim + 4 * self.state_dim + 24)
        avail = mem_available_bytes()
        if avail is not None and need > avail // 2:
            raise MemoryError(
                f"HashTable {self.name!r}: copying its {rows:,} rows ({need / 2**30:.1f} GiB) into memory would take "
                f"more than half of the {avail / 2**30:.1f} GiB available; the table keeps its rows on disk "
                "because they do not fit: checkpoint.save (blocking) streams them instead")

    def _spill(self, keep: torch.Tensor) -> None:
        over = C.table_info(self.handle)["rows"] - self.cache_rows
        if over > 0:
            # Down to 90%: choosing the coldest rows scans the cache, so it runs once per tenth of it filled.
            C.disk_spill(self.handle, over + self.cache_rows // 10, self._in_use_clock, keep)

    def _create(self) -> int:
        kind, a, b, seed, capacity = table_parameters(self.name, self.options, self.num_embeddings, self.init_range,
                                                      self.dim, self.state_dim)
        o = self.options
        if self.device.type == "cuda":  # CUDA tables live in the CUDA library's registry
            return torch.ops.recis.gpu_table_create(
                self.dim, self.state_dim, capacity, o.block_rows, kind, a, b, _signed64(seed), o.host_rows,
                self.device.index,
            )
        return C.create_table(
            self.dim, self.state_dim, int(capacity), o.block_rows, kind, float(a), float(b), seed,
            admit_threshold=o.admit_threshold, ttl_steps=o.ttl_steps or 0, max_capacity=o.max_capacity or 0,
            admit_capacity=o.admit_capacity or 0,
            policy=o.policy_code(), row_type=ROW_TYPES[self.dtype],
        )

    def _release(self, handle: int) -> None:
        if self.device.type == "cuda":
            torch.ops.recis.gpu_table_release(handle)
        else:
            C.release_table(handle)

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None and C is not None:
            try:
                self._release(handle)
            except Exception:  # noqa: BLE001 - interpreter shutdown may have torn the ops down
                pass
            self.handle = None

    # -- introspection -------------------------------------------------------

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def __len__(self) -> int:
        return self.info()["rows"]

    def info(self) -> Dict[str, int]:
        """rows, capacity, memory_bytes (reserved: the IdMap's slots and every allocated row block; a new table
        reserves its initial capacity), used_bytes (of those, the live rows' and their IdMap slots'), dim,
        state_dim, row_bytes (bytes from one row to the next), num_blocks,
        block_rows, and the hygiene counters: admitted, evicted, rejected (lookups refused a row),
        pending (ids counted toward admission)."""
        if self.is_cuda:  # the CUDA table reports its row count only
            rows = int(torch.ops.recis.gpu_table_size(self.handle))
            row_bytes = 4 * (self.dim + self.state_dim)
            return {"rows": rows, "capacity": rows, "memory_bytes": rows * row_bytes, "used_bytes": rows * row_bytes,
                    "dim": self.dim,
                    "state_dim": self.state_dim, "row_bytes": row_bytes, "num_blocks": 0, "block_rows": 0,
                    "admitted": rows, "evicted": 0, "rejected": 0, "pending": 0}
        info = C.table_info(self.handle)
        if self.on_disk:
            # rows: all of them; memory adds the disk's index (its IdMap, ids and metadata in memory).
            disk = C.disk_info(self.handle)
            info["cache_rows"], info["cache_budget_rows"], info["disk_rows"] = info["rows"], self.cache_rows, disk["rows"]
            info["rows"] += disk["rows"]
            info["memory_bytes"] += disk["memory_bytes"]
            info["used_bytes"] += disk["memory_bytes"]
            info["disk_index_bytes"], info["disk_file_bytes"] = disk["memory_bytes"], disk["file_bytes"]
            info["disk_bytes_read"], info["disk_bytes_written"] = disk["bytes_read"], disk["bytes_written"]
        return info

    def memory_bytes(self) -> int:
        """Bytes reserved by the IdMap and the row blocks (see ``info()``; ``used_bytes()``: in use)."""
        return self.info()["memory_bytes"]

    def used_bytes(self) -> int:
        """Bytes of the live rows and the IdMap slots they fill."""
        return self.info()["used_bytes"]

    def __repr__(self) -> str:
        info = self.info()
        return (
            f"HashTable(name={self.name!r}, dim={self.dim}, state_dim={self.state_dim}, device={self.device}, "
            f"rows={info['rows']}, memory={info['used_bytes'] / 2**20:.1f} MiB used of "
            f"{info['memory_bytes'] / 2**20:.1f} MiB reserved)"
        )

    # -- data ------------------------------------------------------------------

    def _ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.reshape(-1).to(device=self.device, dtype=torch.int64)

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._ids(ids)
        self.prefetch(ids)
        return ops.find(self, ids)

    def find_or_insert(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._ids(ids)
        self.prefetch(ids)
        return ops.find_or_insert(self, ids)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings ``(n, dim)`` of ids, as the model sees them, inserting nothing.

        Ids without a row read their initial value.
        """
        ids = self._ids(ids)
        rows = ops.find(self, ids)
        offsets = torch.arange(ids.numel() + 1, dtype=torch.int64, device=self.device)
        out = ops.pooled_forward([self], ids, rows, offsets, None, [0], [ops.POOLING_SUM], [0], self.dim)
        if self.on_disk:  # rows on disk (and not cached) are read where they are; the cache does not change
            found, weights, _ = C.disk_read(self.handle, ids)
            use = found & (rows < 0)
            out[use] = weights[use].to(out.dtype)
        return out

    def export(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids (n,), weights (n, dim) of the table's dtype, state (n, state_dim))`` of the live rows, on the
        CPU (in row order; a CUDA table's ordered by id)."""
        ids, weights, state, _ = self.export_rows()
        return ids, weights, state

    def export_rows(self, since: int = -1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, weights, state, meta (n, 3) = (last_seen, last_update, freq))`` of the
        live rows written after update ``since`` (-1: all), on the CPU."""
        if self.is_cuda or self.on_disk:
            # A CUDA table keeps no row metadata; its rows come out ordered by id, gathered chunk by
            # chunk into CPU memory (no second copy of the table on the GPU). A table on disk: its
            # cache's rows, then the disk's.
            n = len(self)
            if self.on_disk:
                self._check_copy_fits(n)
            ids, weights = torch.empty(n, dtype=torch.int64), torch.empty(n, self.dim, dtype=self.dtype)
            state, meta = torch.empty(n, self.state_dim), torch.zeros(n, 3, dtype=torch.int64)
            start = 0
            while start < n:
                copied, start = self.export_chunk(start, since, ids[start:], weights[start:], state[start:],
                                                  meta[start:])
                if copied == 0:
                    break
            return ids[:start], weights[:start], state[:start], meta[:start]
        return ops.table_export(self, since)

    def export_chunk(
        self, start: int, since: int, ids: torch.Tensor, weights: torch.Tensor, state: torch.Tensor,
        meta: torch.Tensor,
    ) -> Tuple[int, int]:
        """Copies up to ``ids.numel()`` live rows written after update ``since``, from row index
        ``start`` on, into the buffers; returns ``(rows copied, the start of the next chunk)``. A saver
        streams a table through fixed buffers with it. (A CUDA table: ``start`` indexes its rows ordered
        by id, and each call exports the table once. A table on disk: the cache's rows, then from
        ``DISK_START`` on the disk's slots; a chunk runs on from one into the other.)"""
        if self.on_disk:
            cap, copied = ids.numel(), 0
            if start < DISK_START:
                copied, start = C.export_chunk(self.handle, start, since, ids, weights, state, meta)
                if copied < cap:  # the cache is done
                    start = DISK_START
            if copied < cap:
                n, slot = C.disk_export_chunk(self.handle, start - DISK_START, since, ids[copied:], weights[copied:],
                                              state[copied:], meta[copied:])
                copied, start = copied + n, DISK_START + slot
            return copied, start
        if self.is_cuda:
            if since != -1:
                raise NotImplementedError(
                    f"HashTable {self.name!r}: delta exports (rows written since an update) are not supported on "
                    "CUDA tables yet"
                )
            # The (id, row) index, ordered by id, is read once per pass (at start 0) and reused by the
            # pass's later chunks; each chunk gathers only its own rows on the GPU.
            if start == 0 or self._export_index is None:
                self._export_index = torch.ops.recis.gpu_table_export_ids(self.handle, self.device.index)
            all_ids, all_rows = self._export_index
            n = max(0, min(ids.numel(), all_ids.numel() - start))
            data = torch.ops.recis.gpu_table_gather(self.handle, all_rows[start : start + n]).cpu()
            ids[:n] = all_ids[start : start + n].cpu()
            weights[:n] = data[:, : self.dim]
            if self.state_dim:
                state[:n] = data[:, self.dim :]
            meta[:n] = 0
            if start + n >= all_ids.numel():
                self._export_index = None
            return n, start + n
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
        if self.on_disk:
            # The ids' rows come into the cache (a part left None keeps its value), are written, and the
            # coldest rows go back to disk.
            ids = self._ids(ids)
            with self._mover:
                C.disk_fill(self.handle, ids)
                ops.table_import(self, ids, weights, state, meta)
                self._spill(ids[:0])
            return
        if not self.is_cuda:
            ops.table_import(self, ids, weights, state, meta)
            return
        # The CUDA table writes whole rows (embedding and state): absent parts are filled in here.
        ids = ids.reshape(-1).to(torch.int64).cpu()
        n = ids.numel()
        if n == 0:
            return
        if weights is not None and tuple(weights.shape) != (n, self.dim):
            raise ValueError(f"HashTable {self.name!r}: weights must be ({n}, {self.dim}), got {tuple(weights.shape)}")
        if state is not None and tuple(state.shape) != (n, self.state_dim):
            raise ValueError(
                f"HashTable {self.name!r}: state must be ({n}, {self.state_dim}), got {tuple(state.shape)}"
            )
        if weights is None:
            weights = self.lookup(ids).cpu()
        if state is None:
            state = torch.zeros(n, self.state_dim)
            if self.state_dim:
                cur_ids, _, cur_state = self.export()
                if cur_ids.numel():
                    pos = torch.searchsorted(cur_ids, ids).clamp(max=cur_ids.numel() - 1)
                    hit = cur_ids[pos] == ids
                    state[hit] = cur_state[pos[hit]]
        data = torch.cat([weights.to(torch.float32), state.to(torch.float32)], 1).to(self.device)
        torch.ops.recis.gpu_table_import(self.handle, ids.to(self.device), data.contiguous())

    def clear(self) -> None:
        """Drops every row, the admission counters and the eviction log (a CPU table keeps the rows' memory;
        a CUDA table is replaced by an empty one)."""
        if self.is_cuda:
            old, self.handle = self.handle, self._create()
            self._release(old)
        else:
            C.clear(self.handle)
            if self.on_disk:
                C.disk_clear(self.handle)
                self._last_disk_scan = 0

    # Admission and eviction (CPU tables: CUDA tables have neither, so these are trivial there).

    def evict_stale(self, clock: int) -> int:
        """Evicts now every row not looked up since update ``clock - ttl_steps``; returns how many."""
        if self.is_cuda:
            return 0
        evicted = C.evict_stale(self.handle, clock)
        if self.on_disk and self.options.ttl_steps:
            evicted += self._evict_stale_on_disk(clock)
        return evicted

    def _evict_stale_on_disk(self, clock: int) -> int:
        """The TTL scan of the rows on disk (the cache's rows are the C++ table's to scan)."""
        self._last_disk_scan = clock
        return int(C.disk_evict_stale(self.handle, clock, self.options.ttl_steps).numel())

    def erase(self, ids: torch.Tensor, clock: int = 0) -> int:
        """Frees the rows of ``ids`` (recorded as evicted at ``clock``); returns how many had one."""
        if self.is_cuda:
            raise NotImplementedError(f"HashTable {self.name!r}: erase is not supported on CUDA tables yet")
        ids = ids.reshape(-1).to(torch.int64)
        if self.on_disk:
            C.disk_fill(self.handle, ids)  # erased from the cache, so that the eviction log records them
        return C.erase(self.handle, ids, clock)

    def evicted_since(self, since: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids, steps)`` evicted after update ``since``."""
        if self.is_cuda:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return C.evicted_since(self.handle, since)

    def restart_eviction_log(self, clock: int) -> None:
        """Declares the table restored as it was at update ``clock``: ``evicted_since`` answers for
        the evictions after it and refuses earlier ones. After ``clear()`` and before this (or the
        next training lookup, which does the same at its clock), it refuses every ``since``."""
        if not self.is_cuda:
            C.restart_eviction_log(self.handle, clock)

    def export_pending(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids, counts)``: sightings of ids still waiting for admission."""
        if self.is_cuda:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return C.export_pending(self.handle)

    def import_pending(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        if self.is_cuda:
            if ids.numel():
                raise ValueError(f"HashTable {self.name!r}: admission counts given to a CUDA table (no admission)")
            return
        C.import_pending(self.handle, ids.to(torch.int64), counts.to(torch.int64))

    # -- copying -------------------------------------------------------------

    def _spec(self):
        return (self.name, self.dim, self.state_dim, self.options, self.num_embeddings, self.init_range, self.dtype,
                self.device)

    def __getstate__(self):
        ids, weights, state, meta = self.export_rows()
        pending = self.export_pending()
        return {"spec": self._spec(), "ids": ids, "weights": weights, "state": state, "meta": meta, "pending": pending,
                "lineage": self.lineage}

    def __setstate__(self, d) -> None:
        self.__init__(*d["spec"])
        if d["ids"].numel():
            self.import_(d["ids"], d["weights"], d["state"] if self.state_dim else None, d.get("meta"))
        if "pending" in d and d["pending"][0].numel():
            self.import_pending(*d["pending"])
        self.lineage = d.get("lineage")

    def __deepcopy__(self, memo) -> "HashTable":
        new = HashTable.__new__(HashTable)
        new.__setstate__(self.__getstate__())
        memo[id(self)] = new
        return new


def _check_reservable(name: str, dim: int, state_dim: int, dtype: torch.dtype, options: HashTableOptions) -> None:
    """An initial capacity whose rows could not fit in this machine's memory is refused up front,
    with the size named, instead of failing inside the allocator."""
    row = dtype.itemsize * dim + 4 * state_dim + 48  # + id, metadata and IdMap slots
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if options.block_rows * row > total:  # the first block alone (a huge dim, say)
        raise MemoryError(
            f"HashTable {name!r}: one block of block_rows={options.block_rows:,} rows of dim {dim:,} ({row:,} bytes "
            f"a row) needs {options.block_rows * row / 2**30:.1f} GiB, more than this machine's "
            f"{total / 2**30:.1f} GiB of memory")
    if not options.initial_capacity:
        return
    need = options.initial_capacity * row
    if need > total:
        raise MemoryError(
            f"HashTable {name!r}: initial_capacity={options.initial_capacity:,} rows of {row} bytes need "
            f"{need / 2**30:.1f} GiB, more than this machine's {total / 2**30:.1f} GiB of memory"
        )


def mem_available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _signed64(x: int) -> int:
    return x - 2**64 if x >= 2**63 else x


def _table_device(name: str, device: Optional[Any], options: HashTableOptions) -> torch.device:
    """A table's device: ``device``, else ``options.device`` (CUDA with ``host_rows``), else the CPU."""
    chosen = device if device is not None else options.device
    if chosen is None and options.host_rows:
        chosen = "cuda"
    chosen = torch.device(chosen if chosen is not None else "cpu")
    if options.device is not None and torch.device(options.device).type != chosen.type:
        raise ValueError(f"HashTable {name!r}: HashTableOptions.device={options.device!r} but the table is on {chosen}")
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"HashTable {name!r}: device must be the CPU or a CUDA device, got {chosen}")
    if options.host_rows and chosen.type != "cuda":
        raise ValueError(f"HashTable {name!r}: host_rows applies to CUDA tables, but the table is on {chosen}")
    if chosen.type == "cuda":
        require_cuda(f"HashTable {name!r}")
        if chosen.index is None:
            chosen = torch.device("cuda", torch.cuda.current_device())
    return chosen


def _check_cuda_table(name: str, dim: int, dtype: torch.dtype, options: HashTableOptions) -> None:
    if dim > 1024:
        raise ValueError(f"HashTable {name!r}: dim must be <= 1024 on CUDA, got {dim}")
    if dtype != torch.float32:
        raise NotImplementedError(f"HashTable {name!r}: CUDA tables store float32 rows only, got {dtype}")
    if options.storage != "memory":
        raise ValueError(f"HashTable {name!r}: storage={options.storage!r} applies to CPU tables, not CUDA ones")
    unsupported = [
        f for f, on in (
            ("admit_threshold", options.admit_threshold > 1),
            ("ttl_steps", options.ttl_steps is not None),
            ("max_capacity", options.max_capacity is not None),
        ) if on
    ]
    if unsupported:
        raise NotImplementedError(
            f"HashTable {name!r}: {', '.join(unsupported)} (admission and eviction) are not supported on CUDA "
            "tables yet; use a CPU table or leave them unset"
        )
