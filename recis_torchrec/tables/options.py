# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``HashTableOptions``: how one dynamic table is sized and initialised."""

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from recis_torchrec._serial import DictConfig
from recis_torchrec.ops.constants import EVICTION_POLICIES as POLICY_CODES
from recis_torchrec.ops.constants import INIT_KINDS

# Names as the options take them; their codes are C++'s (ops.constants).
INITIALIZERS = tuple(INIT_KINDS)
EVICTION_POLICIES = tuple(POLICY_CODES)
STORAGES = ("memory", "ssd")


@dataclass(frozen=True)
class HashTableOptions(DictConfig):
    """Options of one hash-backed embedding table.

    ``EmbeddingBagConfig.num_embeddings`` stays a capacity hint: ids are
    unbounded 64-bit integers and the table grows by blocks as ids arrive.

    Attributes:
        initial_capacity: rows to reserve up front. ``None`` uses the table's
            ``num_embeddings``, capped at 2**20 rows (configs often carry a
            hash-space size there). Growth past it never copies rows.
        block_rows: rows per storage block, a power of two. Growth appends
            one block at a time.
        initializer: how a new id's row is filled: ``"uniform"`` (in
            ``[init_min, init_max]``), ``"normal"`` / ``"truncated_normal"``
            (``init_mean``, ``init_std``; truncated at 2 std), or
            ``"constant"`` (``init_value``). The value is a pure function of
            (seed, table name, id), so it does not depend on arrival order,
            batch or world size.
        init_min, init_max: uniform bounds. ``None`` takes TorchRec's
            defaults from the config (``weight_init_min``/``weight_init_max``,
            which default to -/+ sqrt(1 / num_embeddings)).
        init_mean, init_std: normal parameters.
        init_value: constant value.
        seed: mixed with the table name to seed the per-id initialiser.
        admit_threshold: admission by frequency: an id gets a row at its
            ``admit_threshold``-th sighting in training lookups. Until then it
            reads its initial value and is not trained. 0 or 1: at once.
        admit_capacity: the most ids counted toward admission at once (the
            counter's memory, reported in ``memory_bytes``, is bounded by it);
            past it, the candidates seen least recently are forgotten and start
            counting again. None: ``2 * max_capacity`` (at least 4096) under a
            cap, else 2**20.
        ttl_steps: evict rows not looked up for this many training steps
            (updates of the table); scanned every ``ttl_steps // 4`` steps.
            None: never.
        max_capacity: at most this many rows; when full, rows are evicted by
            ``eviction_policy`` (rows in use in the current step never are).
            None: unbounded.
        eviction_policy: ``"lru"`` (least recently seen) or ``"lfu"`` (least
            often seen) under ``max_capacity``; ``"none"`` without a cap.
        device: where the table lives: ``None`` (the module's device), ``"cpu"``
            or ``"cuda"`` / ``"cuda:N"``; it must agree with the module's device.
        host_rows: CUDA tables only: keep the rows in pinned host memory (the
            IdMap stays on the GPU), for tables larger than GPU memory.
        storage: where the rows live: ``"memory"`` (all of them, in DRAM) or
            ``"ssd"``: the table holds only a cache of hot rows (``cache_bytes``)
            and keeps the others in fixed-size slots of a file on local disk
            (under ``storage_path``), with its IdMap and row metadata in memory.
            Lookups bring a batch's rows from disk into the cache first (a
            prefetch stage can do it a batch ahead); the least recently used
            rows not in use go back to disk. Admission and ``ttl_steps`` work as in
            memory; ``max_capacity`` is not supported with it yet (raises). CPU tables only.
        storage_path: ``storage="ssd"``: an existing directory on local disk for
            the rows file (created there, unlinked at once: it disappears with
            the table and after a crash; checkpoints hold the rows).
        cache_bytes: ``storage="ssd"``: the cache's budget, counted as the
            cached rows' bytes (``row_bytes`` plus 32 bytes of IdMap each). The
            cache also always holds the rows of the step that runs and of the
            batch being brought in, even past the budget.
        io_threads: ``storage="ssd"``: worker threads for a batch's disk reads
            and writes.
        version: schema version of this record, for ``to_dict``/``from_dict``.
    """

    initial_capacity: Optional[int] = None
    block_rows: int = 8192
    initializer: str = "uniform"
    init_min: Optional[float] = None
    init_max: Optional[float] = None
    init_mean: float = 0.0
    init_std: float = 0.01
    init_value: float = 0.0
    seed: int = 0
    admit_threshold: int = 0
    admit_capacity: Optional[int] = None
    ttl_steps: Optional[int] = None
    max_capacity: Optional[int] = None
    eviction_policy: str = "none"
    device: Optional[str] = None
    host_rows: bool = False
    storage: str = "memory"
    storage_path: Optional[str] = None
    cache_bytes: Optional[int] = None
    io_threads: int = 4
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("init_min", "init_max", "init_mean", "init_std", "init_value"):
            value = getattr(self, name)
            if value is None and name in ("init_min", "init_max"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"HashTableOptions.{name} must be a finite number, got {value!r}")
        for name in ("initial_capacity", "block_rows", "seed", "admit_threshold", "admit_capacity", "ttl_steps",
                     "max_capacity", "cache_bytes", "io_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"HashTableOptions.{name} must be an int, got {value!r}")
        if self.initial_capacity is not None and self.initial_capacity < 0:
            raise ValueError(f"HashTableOptions.initial_capacity must be >= 0 or None, got {self.initial_capacity}")
        if self.block_rows <= 0 or self.block_rows & (self.block_rows - 1) or self.block_rows > 1 << 24:
            raise ValueError(f"HashTableOptions.block_rows must be a power of two of at most 2**24, got {self.block_rows}")
        if not isinstance(self.host_rows, bool):
            raise ValueError(f"HashTableOptions.host_rows must be True or False, got {self.host_rows!r}")
        if self.initializer not in INITIALIZERS:
            raise ValueError(f"HashTableOptions.initializer must be one of {INITIALIZERS}, got {self.initializer!r}")
        if (self.init_min is not None and self.init_max is not None) and self.init_min > self.init_max:
            raise ValueError(
                f"HashTableOptions.init_min ({self.init_min}) must not exceed init_max ({self.init_max})"
            )
        if self.init_std < 0:
            raise ValueError(f"HashTableOptions.init_std must be >= 0, got {self.init_std}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"HashTableOptions.seed must be in [0, 2**64), got {self.seed}")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(
                f"HashTableOptions.eviction_policy must be one of {EVICTION_POLICIES}, got {self.eviction_policy!r}"
            )
        if self.device is not None:
            import torch

            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                raise ValueError(f"HashTableOptions.device {self.device!r} is not a device") from None
            if kind not in ("cpu", "cuda"):
                raise ValueError(f"HashTableOptions.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.host_rows and self.device is not None and not str(self.device).startswith("cuda"):
            raise ValueError(f"HashTableOptions.host_rows applies to CUDA tables, but device is {self.device!r}")
        if self.version != 1:
            raise ValueError(f"HashTableOptions.version {self.version} is not supported (this release writes 1)")
        if self.admit_threshold < 0:
            raise ValueError(f"HashTableOptions.admit_threshold must be >= 0, got {self.admit_threshold}")
        if self.admit_capacity is not None and (not isinstance(self.admit_capacity, int) or self.admit_capacity <= 0):
            raise ValueError(f"HashTableOptions.admit_capacity must be a positive int or None, got {self.admit_capacity!r}")
        if self.ttl_steps is not None and self.ttl_steps <= 0:
            raise ValueError(f"HashTableOptions.ttl_steps must be > 0 or None, got {self.ttl_steps}")
        if self.max_capacity is not None and self.max_capacity <= 0:
            raise ValueError(f"HashTableOptions.max_capacity must be > 0 or None, got {self.max_capacity}")
        if self.max_capacity is not None and self.eviction_policy == "none":
            raise ValueError("HashTableOptions.max_capacity needs eviction_policy 'lru' or 'lfu'")
        if self.max_capacity is None and self.eviction_policy != "none":
            raise ValueError(
                f"HashTableOptions.eviction_policy={self.eviction_policy!r} applies under max_capacity; set one"
            )
        self._check_storage()

    def _check_storage(self) -> None:
        if self.storage not in STORAGES:
            raise ValueError(f"HashTableOptions.storage must be one of {STORAGES}, got {self.storage!r}")
        if self.storage == "memory":
            for name in ("storage_path", "cache_bytes"):
                if getattr(self, name) is not None:
                    raise ValueError(f"HashTableOptions.{name} applies to storage='ssd', but storage is 'memory'")
            if self.io_threads != 4:
                raise ValueError("HashTableOptions.io_threads applies to storage='ssd', but storage is 'memory'")
            return
        if not isinstance(self.storage_path, str) or not self.storage_path:
            raise ValueError(f"HashTableOptions.storage='ssd' needs storage_path (a directory), got {self.storage_path!r}")
        if self.cache_bytes is None or self.cache_bytes <= 0:
            raise ValueError(f"HashTableOptions.storage='ssd' needs cache_bytes > 0, got {self.cache_bytes!r}")
        if not 1 <= self.io_threads <= 64:
            raise ValueError(f"HashTableOptions.io_threads must be in [1, 64], got {self.io_threads}")
        if self.host_rows or (self.device is not None and not str(self.device).startswith("cpu")):
            raise ValueError("HashTableOptions.storage='ssd' applies to CPU tables; the table is on a CUDA device")
        if self.max_capacity is not None:
            raise NotImplementedError(
                "HashTableOptions: max_capacity with storage='ssd' is not supported yet (the cap would count the "
                "rows on disk too); leave it unset (ttl_steps works) or use storage='memory'")

    def init_kind(self) -> int:
        return INIT_KINDS[self.initializer]

    def policy_code(self) -> int:
        """The C++ EvictionPolicy code."""
        return POLICY_CODES[self.eviction_policy]


OptionsArg = Union[None, HashTableOptions, Mapping[str, HashTableOptions]]


def resolve_options(
    tables: Sequence[Any], options: OptionsArg, strict: bool = True
) -> Dict[str, HashTableOptions]:
    """Per-table options from None, one ``HashTableOptions`` for all, or a dict by table name.

    ``strict``: a dict naming a table that is not in ``tables`` is an error. The sharders pass
    one dict to every module of a model, so the sharded modules read theirs with ``strict=False``.
    """
    names = [t.name for t in tables]
    if options is None:
        return {n: HashTableOptions() for n in names}
    if isinstance(options, HashTableOptions):
        return {n: options for n in names}
    unknown = sorted(set(options) - set(names))
    if unknown and strict:
        raise ValueError(f"options names tables {unknown} that are not in this collection (tables: {names})")
    for name, o in options.items():
        if name in unknown:
            continue
        if not isinstance(o, HashTableOptions):
            raise TypeError(f"options[{name!r}] must be a HashTableOptions, got {type(o).__name__}")
    return {n: options.get(n, HashTableOptions()) for n in names}
