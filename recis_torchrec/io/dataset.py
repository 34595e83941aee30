# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``ColumnarDataset``: Parquet / ORC / CSV files -> TorchRec ``Batch``es, sharded, shuffled, resumable."""

import queue
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torchrec.datasets.utils import Batch

from recis_torchrec import _exit
from recis_torchrec.io.arrow import ColumnError, check_columns, to_batch, transform_dense
from recis_torchrec.io.schema import WEIGHTS_SUFFIX, Schema
from recis_torchrec.io.sources import File, Unit, expand

_STATE_VERSION = 1


def rank_batch_sizes(num_rows: int, world_size: int, batch_size: int, drop_last: bool) -> List[List[int]]:
    """The batch sizes of every rank for one epoch, equal in number on every rank.

    Full batches of ``batch_size`` go round the ranks. With ``drop_last`` the
    rows that do not fill a round are dropped (fewer than
    ``world_size * batch_size``). Otherwise they are spread as one smaller
    last batch per rank; if there are fewer of them than ranks, the last full
    round and they are spread as two smaller batches per rank.
    """
    per_round = world_size * batch_size
    full, rest = divmod(num_rows, per_round)
    sizes = [[batch_size] * full for _ in range(world_size)]
    if drop_last or rest == 0:
        return sizes

    def spread(total: int) -> List[int]:
        return [total // world_size + (1 if r < total % world_size else 0) for r in range(world_size)]

    if rest >= world_size:
        for r, n in enumerate(spread(rest)):
            sizes[r].append(n)
        return sizes
    if full == 0 or batch_size < 2:
        raise ValueError(
            f"{num_rows} rows cannot be split into the same number of non-empty batches of at most "
            f"{batch_size} on each of {world_size} ranks; use drop_last=True"
        )
    for r, n in enumerate(spread(per_round + rest)):
        sizes[r][-1:] = [(n + 1) // 2, n // 2]
    return sizes


def _check_types(f: File, schema: Schema) -> None:
    """Fails early, naming file and column, on a column the schema cannot read."""
    types = {}
    if f.format == "parquet":
        types = {n: f._pq.schema_arrow.field(n).type for n in f.column_names}
    elif f.format == "orc":
        types = {n: f._orc.schema.field(n).type for n in f.column_names}
    elif f._csv is not None:
        types = {n: f._csv.schema.field(n).type for n in f.column_names}

    def numeric(t: pa.DataType) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)

    def id_type(t: pa.DataType) -> bool:
        return (
            pa.types.is_integer(t)
            or pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_binary(t)
            or pa.types.is_null(t)
        )

    def is_list(t: pa.DataType) -> bool:
        return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

    for role, cols in (("dense", schema.dense), ("label", schema.labels)):
        for c in cols:
            if not numeric(types[c]):
                raise ColumnError(f"{f.path}: {role} column {c!r} must be numeric, got {types[c]}")
    for key, spec in schema.sparse.items():
        for c in [spec] if isinstance(spec, str) else spec:
            t = types[c]
            if not (id_type(t) or (is_list(t) and id_type(t.value_type))):
                raise ColumnError(
                    f"{f.path}: column {c!r} (KJT key {key!r}) holds {t}, but sparse ids must be integers or "
                    "strings (or lists of them)"
                )
    for key, spec in schema.masks.items():
        for c in [spec] if isinstance(spec, str) else spec:
            if not numeric(types[c]):
                raise ColumnError(f"{f.path}: mask column {c!r} (KJT key {key!r}) must be numeric, got {types[c]}")
    for key, c in schema.weights.items():
        t = types[c]
        if not (is_list(t) and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))):
            raise ColumnError(f"{f.path}: weight column {c!r} (KJT key {key!r}) must be list<float>, got {t}")


class ColumnarDataset:
    """An iterable of TorchRec ``Batch``es read from columnar files.

    Args:
        paths: files, directories, globs or ``pyarrow.fs`` URIs (``s3://``,
            ``gs://``, ``hdfs://``, ...), of Parquet, ORC, CSV or TSV.
        schema: which columns become dense features, KJT keys, weights, labels.
        batch_size: rows per batch; every batch has exactly this many rows
            except, with ``drop_last=False``, the last one or two of an epoch.
        rank, world_size: this reader's part. Ranks take contiguous ranges of
            the (shuffled) row stream, so every row goes to exactly one rank,
            and every rank yields the same number of batches per epoch.
        shuffle: shuffle the units (Parquet row groups, ORC and CSV files)
            each epoch, and the rows within buffers of ``shuffle_buffer`` rows,
            seeded by ``seed`` and the epoch; the same on every rank.
        seed: the shuffle seed.
        shuffle_buffer: rows per shuffle buffer (default 16 batches).
        drop_last: drop the rows that do not fill a batch on every rank.
        prefetch: batches a background thread prepares ahead (0: none).
        pin_memory: pin batches (needs CUDA).
        device: move batches there (``non_blocking`` after pinning).
        format: ``"parquet"``, ``"orc"``, ``"csv"`` or ``"tsv"`` for every
            file; None picks by extension.
        filesystem: a ``pyarrow.fs.FileSystem`` for every path.
        features: a :class:`recis_torchrec.features.FeatureEngine` applied to
            every batch while reading (in the loader's background thread):
            the batch's KJT becomes the engine's output, with the dense
            columns (``schema.dense``) as the bucketize inputs.

    ``state_dict()`` records how many batches of which epoch were handed out;
    after ``load_state_dict`` the next batch is the one that would have come.

    Example::

        schema = Schema(dense=["price"], sparse={"user": "user_id", "items": "clicked"}, labels=["click"])
        for batch in ColumnarDataset("s3://bucket/day=01/*.parquet", schema, 4096, rank, world_size):
            loss = model(batch.dense_features, batch.sparse_features)  # a KeyedJaggedTensor
    """

    def __init__(
        self,
        paths: Union[str, Sequence[str]],
        schema: Schema,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: Optional[int] = None,
        drop_last: bool = False,
        prefetch: int = 2,
        pin_memory: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        format: Optional[str] = None,
        filesystem: Optional[pafs.FileSystem] = None,
        features: Any = None,
    ) -> None:
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a recis_torchrec.io.Schema, got {type(schema).__name__}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank}, world_size {world_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA, and torch.cuda.is_available() is False")
        if features is not None:
            from recis_torchrec.features import FeatureEngine, FeatureSpecError

            if not isinstance(features, FeatureEngine):
                raise TypeError(f"features must be a recis_torchrec.features.FeatureEngine, got {type(features).__name__}")
            for key in features.input_keys():
                if key not in schema.sparse:
                    raise FeatureSpecError(
                        f"features: input key {key!r} is not a sparse key of the schema ({list(schema.sparse)})"
                    )
            for col in features.dense_inputs():
                if col not in schema.dense:
                    raise FeatureSpecError(
                        f"features: dense column {col!r} is not a dense column of the schema ({list(schema.dense)})"
                    )
        self.features = features
        # The schema as given (`schema` becomes it with repeated header names resolved to their
        # columns, which re-resolve to more columns if read again): what a package stores.
        self.declared_schema = schema
        self.schema = schema
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.shuffle_buffer = (shuffle_buffer or 16 * batch_size) if shuffle else None
        if self.shuffle_buffer is not None and self.shuffle_buffer <= 0:
            raise ValueError(f"shuffle_buffer must be > 0, got {shuffle_buffer}")
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.device = torch.device(device) if device is not None else None
        self._files: List[File] = []
        resolved: Optional[Schema] = None
        first_repeated: Dict[str, List[str]] = {}
        for fs, path in expand(paths, filesystem):
            f = File(fs, path, format, schema=schema)
            if resolved is None:
                resolved, first_repeated = schema.resolve(f.repeated), f.repeated
            elif {k: len(v) for k, v in f.repeated.items()} != {k: len(v) for k, v in first_repeated.items()}:
                raise ColumnError(
                    f"{path}: its header repeats names {sorted(f.repeated)} a different number of times than "
                    f"{self._files[0].path} does ({sorted(first_repeated)}); a key gathered from repeated columns "
                    "needs the same columns in every file"
                )
            check_columns(f.column_names, resolved, path)
            _check_types(f, resolved)
            self._files.append(f)
        if resolved is not None:
            schema = resolved
            self.schema = schema
        for c in schema.dense:
            if schema.transform_of(c) == "standardize" and c not in schema.dense_stats:
                raise ValueError(
                    f"ColumnarDataset: dense column {c!r} is to be standardized but Schema.dense_stats has no "
                    f"(mean, std) for it (see recis_torchrec.io.dense_stats)"
                )
        self._columns = [c for c in schema.columns()]
        self._columns += [c + WEIGHTS_SUFFIX for c in schema.sparse_columns()
                          if any(c + WEIGHTS_SUFFIX in f.column_names for f in self._files)]
        self._units: List[Tuple[int, Unit]] = [(i, u) for i, f in enumerate(self._files) for u in f.units]
        self.num_rows = sum(u.num_rows for _, u in self._units)
        self._epoch = 0
        self._batches_done = 0

    # -- planning --------------------------------------------------------------

    def _unit_order(self, epoch: int) -> List[Tuple[int, Unit]]:
        if not self.shuffle:
            return list(self._units)
        perm = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self._units))
        return [self._units[i] for i in perm]

    def batch_sizes(self, epoch: Optional[int] = None) -> List[int]:
        """This rank's batch sizes in an epoch (the current one by default)."""
        return rank_batch_sizes(self.num_rows, self.world_size, self.batch_size, self.drop_last)[self.rank]

    @property
    def paths(self) -> List[str]:
        """The files read, in order."""
        return [f.path for f in self._files]

    def __len__(self) -> int:
        return len(self.batch_sizes())

    def _rank_range(self) -> Tuple[int, int]:
        sizes = rank_batch_sizes(self.num_rows, self.world_size, self.batch_size, self.drop_last)
        start = sum(sum(s) for s in sizes[: self.rank])
        return start, start + sum(sizes[self.rank])

    # -- reading -----------------------------------------------------------------

    def _read_rows(self, order: List[Tuple[int, Unit]], begin: int, end: int) -> Iterator[pa.Table]:
        """Rows [begin, end) of the epoch's global stream."""
        pos = 0
        for file_index, unit in order:
            u_begin, u_end = pos, pos + unit.num_rows
            pos = u_end
            if u_end <= begin or unit.num_rows == 0:
                continue
            if u_begin >= end:
                break
            skip = max(0, begin - u_begin)
            want = min(u_end, end) - (u_begin + skip)
            for t in self._files[file_index].read(unit, self._columns, skip):
                if want <= 0:
                    break
                t = t.slice(0, want)
                want -= t.num_rows
                yield t

    def _stream(self, epoch: int, start: int) -> Iterator[pa.Table]:
        """This rank's rows of the epoch from rank-local row `start`, shuffled within buffers."""
        order = self._unit_order(epoch)
        begin, end = self._rank_range()
        if self.shuffle_buffer is None:
            yield from self._read_rows(order, begin + start, end)
            return
        size = self.shuffle_buffer
        k = start // size
        while begin + k * size < end:
            b0, b1 = begin + k * size, min(begin + (k + 1) * size, end)
            buf = pa.concat_tables(list(self._read_rows(order, b0, b1)))
            perm = np.random.default_rng([self.seed, epoch, self.rank + 1, k]).permutation(buf.num_rows)
            buf = buf.take(pa.array(perm))
            offset = start - k * size if k * size < start else 0
            yield buf.slice(offset)
            k += 1

    def _batches(self, epoch: int, first_batch: int) -> Iterator[Tuple[int, Batch]]:
        sizes = self.batch_sizes(epoch)
        start = sum(sizes[:first_batch])
        k = first_batch
        stream = self._stream(epoch, start)
        if self.prefetch > 0:
            # Decode the next units while this thread cuts and converts batches.
            stream = Prefetcher(stream, 2)
        try:
            yield from self._cut(stream, sizes, k, epoch)
        finally:
            if isinstance(stream, Prefetcher):
                stream.close()

    def _cut(self, stream: Iterator[pa.Table], sizes: List[int], k: int, epoch: int) -> Iterator[Tuple[int, Batch]]:
        pending: List[pa.Table] = []
        have = 0
        while k < len(sizes):
            need = sizes[k]
            while have < need:
                t = next(stream)
                pending.append(t)
                have += t.num_rows
            table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            batch_table, rest = table.slice(0, need), table.slice(need)
            pending, have = ([rest] if rest.num_rows else []), rest.num_rows
            where = f"{self._describe()} (rank {self.rank}, epoch {epoch}, batch {k})"
            batch = to_batch(batch_table, self.schema, where, transform=self.features is None)
            if self.features is not None:
                # forward, not __call__: this runs in the loader's thread, and a tracer in the main one
                # (TorchRec's pipeline rewrites the model with torch.fx) patches nn.Module.__call__.
                # The engine (its bucketize) reads the raw dense values; the model gets the transformed ones.
                kjt = self.features.forward(
                    batch.sparse_features, dense=batch.dense_features, dense_keys=self.schema.dense
                )
                batch = Batch(dense_features=transform_dense(batch.dense_features, self.schema), sparse_features=kjt,
                              labels=batch.labels)
            if self.pin_memory:
                batch = batch.pin_memory()
            yield k, batch
            k += 1

    def _describe(self) -> str:
        names = [f.path for f in self._files]
        return names[0] if len(names) == 1 else f"{len(names)} files ({names[0]}, ...)"

    # -- iteration ---------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        if self._batches_done >= len(self):
            self._epoch += 1
            self._batches_done = 0
        epoch = self._epoch
        source = self._batches(epoch, self._batches_done)
        if self.prefetch > 0:
            source = Prefetcher(source, self.prefetch)
        try:
            for k, batch in source:
                if self.device is not None:
                    batch = batch.to(self.device, non_blocking=self.pin_memory)
                self._batches_done = k + 1
                yield batch
        finally:
            if isinstance(source, Prefetcher):
                source.close()

    def set_epoch(self, epoch: int) -> None:
        """Starts `epoch` at its first batch (the shuffle depends on it)."""
        self.seek(epoch, 0)

    def seek(self, epoch: int, batch: int) -> None:
        """Makes batch `batch` of epoch `epoch` the next one iteration yields."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"ColumnarDataset.seek: batch {batch} is outside the epoch's {len(self)} batches")
        self._epoch, self._batches_done = epoch, batch

    # -- state ---------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "batches_done": self._batches_done,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "drop_last": self.drop_last,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"ColumnarDataset.load_state_dict: unknown state version {state.get('version')!r}")
        for key in ("rank", "world_size", "batch_size", "seed", "shuffle", "shuffle_buffer", "drop_last", "num_rows"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"ColumnarDataset.load_state_dict: the state has {key}={state[key]!r} but this dataset has "
                    f"{getattr(self, key)!r}; a loader position only resumes on the same data and layout"
                )
        self._epoch = int(state["epoch"])
        self._batches_done = int(state["batches_done"])

    def load_resharded(self, states: List[Dict[str, Any]], rank: int, world_size: int) -> None:
        """The position of states saved by a different number of ranks (one state per saved rank),
        re-derived from the rows they consumed: this epoch's batches over every saved rank, divided
        by this dataset's world size (rounded down: at most ``world_size - 1`` batches are read again).
        The batch size, shuffle and data must be the ones saved."""
        for st in states:
            if st.get("version") != _STATE_VERSION:
                raise ValueError(f"ColumnarDataset.load_resharded: unknown state version {st.get('version')!r}")
            for key in ("batch_size", "seed", "shuffle", "shuffle_buffer", "drop_last", "num_rows"):
                if st[key] != getattr(self, key):
                    raise ValueError(
                        f"ColumnarDataset.load_resharded: the state has {key}={st[key]!r} but this dataset has "
                        f"{getattr(self, key)!r}; a loader position only carries over on the same data and batches"
                    )
        epochs = {int(st["epoch"]) for st in states}
        if len(epochs) != 1:
            raise ValueError(f"ColumnarDataset.load_resharded: the saved ranks are in different epochs {sorted(epochs)}")
        self._epoch = epochs.pop()
        self._batches_done = min(len(self), sum(int(st["batches_done"]) for st in states) // world_size)


def dense_stats(
    paths: Union[str, Sequence[str]], schema: Schema, batch_size: int = 8192, max_batches: Optional[int] = None,
    format: Optional[str] = None,
) -> Dict[str, Tuple[float, float, float]]:
    """``(mean, std, max |x|)`` of each raw dense column (before ``dense_transform``, nulls as their
    defaults) over the files' rows (the first ``max_batches`` batches of them, if given): the
    ``Schema.dense_stats`` that ``"standardize"`` needs, and a check of the columns' scale."""
    import dataclasses

    if not schema.dense:
        return {}
    raw = dataclasses.replace(schema, dense_transform="none", dense_stats={})
    ds = ColumnarDataset(paths, raw, batch_size, prefetch=0, format=format)
    n, s1, s2 = 0, torch.zeros(len(schema.dense), dtype=torch.float64), torch.zeros(len(schema.dense), dtype=torch.float64)
    amax = torch.zeros(len(schema.dense), dtype=torch.float64)
    for k, b in enumerate(ds):
        if max_batches is not None and k >= max_batches:
            break
        x = b.dense_features.double()
        n += x.shape[0]
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
        amax = torch.maximum(amax, x.abs().max(0).values)
    mean = s1 / max(n, 1)
    std = (s2 / max(n, 1) - mean * mean).clamp(min=0).sqrt()
    return {c: (float(mean[j]), float(std[j]), float(amax[j])) for j, c in enumerate(schema.dense)}


class Prefetcher:
    """Runs a generator in a background thread, `depth` items ahead."""

    _DONE = object()

    def __init__(self, source: Iterator, depth: int) -> None:
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()
        _exit.close_at_exit(self)  # a daemon thread inside a torch call at exit aborts the process

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as e:  # noqa: B902 - handed to the consumer
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
