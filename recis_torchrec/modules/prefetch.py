# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The prefetch stage of tables with rows on disk (``HashTableOptions(storage="ssd")``).

``TablePrefetcher`` brings the rows a batch needs from disk into its tables' caches on a worker
thread; ``PrefetchTrainPipeline`` runs it one batch ahead of the training step, in the shape of
TorchRec's ``TrainPipelineBase`` (``progress(dataloader_iter)`` runs one step and returns the model's
output) and of its ``PrefetchTrainPipelineSparseDist`` (the next batch's rows come in while the
current step runs). The worker does the disk's reads and writes with the table lock released
(``csrc/ops/disk_bindings.cpp``), so the step is not held up by them; the lookup's own prefetch then
finds the rows in the cache. Without the stage, tables on disk still work: each lookup reads its
batch's rows first, on the training thread.
"""

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recis_torchrec.modules.hash_module import HashTablesMixin
from recis_torchrec.tables.hash_table import HashTable


def _disk_tables(model: nn.Module) -> List[Tuple[HashTable, List[str], Any]]:
    """(table, its feature names, the module's fused optimizer) for every table on disk in `model`
    (a table shared by several modules once, with all their features)."""
    found: Dict[int, Tuple[HashTable, List[str], Any]] = {}
    for module in model.modules():
        if not isinstance(module, HashTablesMixin):
            continue
        configs_of = getattr(module, "embedding_bag_configs", None) or getattr(module, "embedding_configs", None)
        if configs_of is None:  # a sharded module: its lookups read their own rows
            continue
        tables = module.tables()
        for config in configs_of():
            table = tables.get(config.name)
            if table is not None and table.on_disk:
                found.setdefault(id(table), (table, [], module.fused_optimizer))[1].extend(config.feature_names)
    return list(found.values())


class TablePrefetcher:
    """Brings a batch's rows from disk into the caches of the model's tables on disk, on one worker
    thread (unsharded modules; a sharded module's lookup reads its own rows first).

    Args:
        model: the model; its ``HashEmbeddingBagCollection`` / ``HashEmbeddingCollection`` tables
            with ``storage="ssd"`` are served.
        features_of: the batch's ``KeyedJaggedTensor`` of sparse features (default: the batch is one).
    """

    def __init__(self, model: nn.Module, features_of: Optional[Callable[[Any], KeyedJaggedTensor]] = None) -> None:
        self.tables = _disk_tables(model)
        self.features_of = features_of or (lambda batch: batch)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recis-prefetch")
        self._pending: Optional[Future] = None
        self._ahead: Any = None  # the batch next_from read ahead, whose rows are coming in

    def _ids(self, kjt: Optional[KeyedJaggedTensor], names: List[str]) -> torch.Tensor:
        if kjt is None:
            return torch.zeros(0, dtype=torch.int64)
        keys = set(kjt.keys())
        parts = [kjt[n].values() for n in names if n in keys]
        return torch.cat(parts).to(torch.int64) if parts else torch.zeros(0, dtype=torch.int64)

    def _run(self, batch: KeyedJaggedTensor, running: Optional[KeyedJaggedTensor]) -> int:
        got = 0
        for table, names, optimizer in self.tables:
            clock = optimizer.steps().get(table.name, 0)
            got += table.prefetch(self._ids(batch, names), clock=clock, keep=self._ids(running, names))
        return got

    def submit(self, batch: Any, running: Any = None) -> None:
        """Starts bringing in `batch`'s rows (after the previous request finished). `running`: the
        batch whose step may be under way now; its rows stay in the cache."""
        self.wait()
        if not self.tables:
            return
        kjt = self.features_of(batch)
        now = self.features_of(running) if running is not None else None
        self._pending = self._pool.submit(self._run, kjt, now)

    def next_from(self, it: Iterator[Any]) -> Any:
        """The next batch of `it`, its rows in the caches, with the batch after it read from `it` and its
        rows coming in while this one trains (:meth:`drop_ahead` forgets it). Raises StopIteration when
        `it` is done."""
        batch = self._ahead
        if batch is None:
            batch = next(it)
            self.submit(batch)
        self.wait()
        self._ahead = next(it, None)
        if self._ahead is not None:
            self.submit(self._ahead, running=batch)
        return batch

    def drop_ahead(self) -> None:
        """Waits for the request in flight and forgets the batch read ahead (not trained on: the caller
        reads it again)."""
        self.wait()
        self._ahead = None

    def wait(self) -> int:
        """Waits for the request in flight (its errors raise here); returns the rows it read."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else 0

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()


class PrefetchTrainPipeline:
    """Trains with the next batch's rows coming in from disk while the current step runs.

    ``progress(dataloader_iter)`` runs one step, as TorchRec's ``TrainPipelineBase`` does: the model
    is called on the batch and returns ``(loss, output)``; in training mode ``loss.backward()`` and
    ``optimizer.step()`` follow (the tables' fused optimizers update in the backward). It raises
    ``StopIteration`` when the iterator is done. Call :meth:`sync` before a checkpoint, so that no
    rows are moving while the tables are written.
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 features_of: Optional[Callable[[Any], KeyedJaggedTensor]] = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.prefetcher = TablePrefetcher(model, features_of)
        self._iter: Optional[Iterator[Any]] = None

    def progress(self, dataloader_iter: Iterator[Any]) -> Any:
        if self._iter is not dataloader_iter:  # a new iterator: forget the batch read ahead of the old one
            self.prefetcher.drop_ahead()
            self._iter = dataloader_iter
        batch = self.prefetcher.next_from(dataloader_iter)  # its rows are in the cache
        if self.optimizer is not None:
            self.optimizer.zero_grad()
        loss, output = self.model(batch)
        if self.model.training:
            loss.backward()
            if self.optimizer is not None:
                self.optimizer.step()
        return output

    def sync(self) -> None:
        """Waits for the prefetch in flight."""
        self.prefetcher.wait()

    def close(self) -> None:
        self.prefetcher.close()
