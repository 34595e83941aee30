# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""CUDA tables: ``CudaHashTable`` (the GPU hash table of ``csrc/cuda/``) and the differentiable
lookups the modules run on it.

A ``CudaHashTable`` has the ``HashTable`` interface the modules, the fused optimizer and the
checkpoints use (``find``, ``find_or_insert``, ``export``, ``import_``, ``lookup``, ``info``), with
CPU tensors at the export/import boundary. An id's initial row is the CPU table's, bit for bit
(``init_element`` is shared and the kernels are built without fused multiply-adds).

Host-device synchronisation on the training path: ``find_or_insert`` reads the table's row count
(8 bytes) once per call (one call per feature), to grow the table before the next launch; the KJT's
per-feature value counts are read once per forward (as TorchRec does for its splits). The backward
does not synchronise. Admission, TTL and capacity eviction are CPU-table features for now: options asking
for them raise.

Needs an extension built with ``RECIS_CUDA=1`` and a GPU (:func:`cuda_tables_available`).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from recis_torchrec import _ext  # noqa: F401  (registers torch.ops.recis)
from recis_torchrec.modules.hash_table import table_parameters
from recis_torchrec.modules.options import HashTableOptions
from recis_torchrec.ops.constants import POOLING_MEAN, POOLING_SUM  # noqa: F401


def cuda_tables_available() -> bool:
    """True when the extension has the CUDA table ops and a GPU is present."""
    return torch.cuda.is_available() and hasattr(torch.ops.recis, "gpu_table_create")


def require_cuda(what: str) -> None:
    if not hasattr(torch.ops.recis, "gpu_table_create"):
        raise NotImplementedError(
            f"{what}: this build of recis_torchrec has no CUDA tables; rebuild with RECIS_CUDA=1 "
            "(RECIS_CUDA=1 pip install --no-build-isolation --no-deps -e .) on a machine with nvcc"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what}: CUDA tables need a GPU, and torch.cuda.is_available() is False")


def _signed64(x: int) -> int:
    return x - 2**64 if x >= 2**63 else x


class CudaHashTable:
    """One dynamic table on a GPU: the IdMap in GPU memory, the rows in GPU memory (or, with
    ``options.host_rows``, in pinned host memory the kernels reach over the bus).

    Args: as ``HashTable``, plus ``device`` (a CUDA device).
    """

    def __init__(
        self,
        name: str,
        dim: int,
        state_dim: int = 0,
        options: Optional[HashTableOptions] = None,
        num_embeddings: int = 0,
        init_range: Tuple[float, float] = (-0.01, 0.01),
        device: Optional[torch.device] = None,
    ) -> None:
        require_cuda(f"CudaHashTable {name!r}")
        options = options or HashTableOptions()
        if dim <= 0:
            raise ValueError(f"CudaHashTable {name!r}: dim must be > 0, got {dim}")
        if dim > 1024:
            raise ValueError(f"CudaHashTable {name!r}: dim must be <= 1024 on CUDA, got {dim}")
        unsupported = [
            f for f, on in (
                ("admit_threshold", options.admit_threshold > 1),
                ("ttl_steps", options.ttl_steps is not None),
                ("max_capacity", options.max_capacity is not None),
            ) if on
        ]
        if unsupported:
            raise NotImplementedError(
                f"CudaHashTable {name!r}: {', '.join(unsupported)} (admission and eviction) are CPU-table "
                "features for now; use a CPU table or leave them unset"
            )
        device = torch.device(device if device is not None else (options.device or "cuda"))
        if device.type != "cuda":
            raise ValueError(f"CudaHashTable {name!r}: device must be a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.name = name
        self.dim = dim
        self.state_dim = state_dim
        self.options = options
        self.num_embeddings = num_embeddings
        self.init_range = init_range
        self.device = device
        kind, a, b, seed, capacity = table_parameters(name, options, num_embeddings, init_range)
        self.handle: int = torch.ops.recis.gpu_table_create(
            dim, state_dim, capacity, options.block_rows, kind, a, b, _signed64(seed), options.host_rows,
            device.index,
        )

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            try:
                torch.ops.recis.gpu_table_release(handle)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
            self.handle = None

    def __len__(self) -> int:
        return int(torch.ops.recis.gpu_table_size(self.handle))

    def info(self) -> Dict[str, int]:
        rows = len(self)
        return {
            "rows": rows,
            "dim": self.dim,
            "state_dim": self.state_dim,
            "row_stride": self.dim + self.state_dim,
            "memory_bytes": rows * 4 * (self.dim + self.state_dim),
            "admitted": rows,
            "evicted": 0,
            "rejected": 0,
            "pending": 0,
        }

    def memory_bytes(self) -> int:
        return self.info()["memory_bytes"]

    def __repr__(self) -> str:
        return f"CudaHashTable(name={self.name!r}, dim={self.dim}, device={self.device}, rows={len(self)})"

    # -- data ----------------------------------------------------------------

    def _ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.reshape(-1).to(device=self.device, dtype=torch.int64)

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.recis.gpu_find(self.handle, self._ids(ids))

    def find_or_insert(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.recis.gpu_find_or_insert(self.handle, self._ids(ids))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings ``(n, dim)`` of ids as the model sees them, inserting nothing."""
        ids = self._ids(ids)
        out = torch.zeros(ids.numel(), self.dim, device=self.device)
        offsets = torch.arange(ids.numel() + 1, device=self.device)
        torch.ops.recis.gpu_pooled_forward(self.handle, ids, self.find(ids), offsets, None, POOLING_SUM, out, 0)
        return out

    def export(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids (n,), weights (n, dim), state (n, state_dim))`` on the CPU, ordered by id."""
        ids, data = torch.ops.recis.gpu_table_export(self.handle, self.device.index)
        ids, data = ids.cpu(), data.cpu()
        order = torch.argsort(ids)
        ids, data = ids[order], data[order]
        return ids, data[:, : self.dim].contiguous(), data[:, self.dim :].contiguous()

    def export_rows(self, since: int = -1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if since != -1:
            raise NotImplementedError(
                f"CudaHashTable {self.name!r}: delta exports (rows written since an update) are CPU-table "
                "features for now"
            )
        ids, weights, state = self.export()
        return ids, weights, state, torch.zeros(ids.numel(), 3, dtype=torch.int64)

    def import_(
        self,
        ids: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        state: Optional[torch.Tensor] = None,
        meta: Optional[torch.Tensor] = None,
    ) -> None:
        """Writes rows for distinct ids; a None part keeps its value (or, for a new id, its initial one)."""
        ids = ids.reshape(-1).to(torch.int64).cpu()
        n = ids.numel()
        if n == 0:
            return
        if weights is not None and tuple(weights.shape) != (n, self.dim):
            raise ValueError(
                f"CudaHashTable {self.name!r}: weights must be ({n}, {self.dim}), got {tuple(weights.shape)}"
            )
        if state is not None and tuple(state.shape) != (n, self.state_dim):
            raise ValueError(
                f"CudaHashTable {self.name!r}: state must be ({n}, {self.state_dim}), got {tuple(state.shape)}"
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

    def export_chunk(
        self, start: int, since: int, ids: torch.Tensor, weights: torch.Tensor, state: torch.Tensor,
        meta: torch.Tensor,
    ) -> Tuple[int, int]:
        """As ``HashTable.export_chunk``, with ``start`` an index into the rows ordered by id. Each
        call exports the table to the host once (CUDA tables have no chunked export kernel yet)."""
        all_ids, all_w, all_s, all_m = self.export_rows(since)
        n = max(0, min(ids.numel(), all_ids.numel() - start))
        ids[:n] = all_ids[start : start + n]
        weights[:n] = all_w[start : start + n]
        if self.state_dim:
            state[:n] = all_s[start : start + n]
        meta[:n] = all_m[start : start + n]
        return n, start + n

    def clear(self) -> None:
        """Drops every row: the table is replaced by an empty one with the same configuration."""
        old = self.handle
        kind, a, b, seed, capacity = table_parameters(self.name, self.options, self.num_embeddings, self.init_range)
        self.handle = torch.ops.recis.gpu_table_create(
            self.dim, self.state_dim, capacity, self.options.block_rows, kind, a, b, _signed64(seed),
            self.options.host_rows, self.device.index,
        )
        torch.ops.recis.gpu_table_release(old)

    # CUDA tables have no admission and no eviction (both raise at construction), so these are trivial.
    def export_pending(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)

    def import_pending(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        if ids.numel():
            raise ValueError(f"CudaHashTable {self.name!r}: admission counts given, but CUDA tables have no admission")

    def evicted_since(self, since: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)

    def restart_eviction_log(self, clock: int) -> None:
        """Nothing to restart: CUDA tables evict nothing."""

    # -- copying: each copy owns its own GPU table ------------------------------------

    def __getstate__(self):
        ids, weights, state = self.export()
        spec = (self.name, self.dim, self.state_dim, self.options, self.num_embeddings, self.init_range, self.device)
        return {"spec": spec, "ids": ids, "weights": weights, "state": state}

    def __setstate__(self, d) -> None:
        self.__init__(*d["spec"])
        if d["ids"].numel():
            self.import_(d["ids"], d["weights"], d["state"] if self.state_dim else None)

    def __deepcopy__(self, memo) -> "CudaHashTable":
        new = CudaHashTable.__new__(CudaHashTable)
        new.__setstate__(self.__getstate__())
        memo[id(self)] = new
        return new


class _CudaPooledLookup(torch.autograd.Function):
    """Pooled lookup over CUDA tables: one forward launch per feature, one fused backward
    launch per table (all its features' bags together, so a row read by several features
    gets one optimizer update)."""

    @staticmethod
    def forward(ctx, anchor, group, ids, offsets, weights, plan, insert):  # type: ignore[override]
        # plan: per table t, the features reading it: (key index, first value, value count, output column)
        batch, out_dim = plan.batch, plan.out_dim
        out = torch.zeros(batch, out_dim, device=ids.device)
        rows = torch.empty_like(ids)
        for t, feats in enumerate(plan.features):
            table = group.tables[t]
            for k, start, count, col in feats:
                sl = slice(start, start + count)
                rows[sl] = table.find_or_insert(ids[sl]) if insert else table.find(ids[sl])
                bag_offsets = offsets[k * batch : (k + 1) * batch + 1] - start
                torch.ops.recis.gpu_pooled_forward(
                    table.handle, ids[sl], rows[sl], bag_offsets, None if weights is None else weights[sl],
                    plan.modes[t], out, col,
                )
        ctx.group, ctx.plan = group, plan
        ctx.save_for_backward(rows, offsets, weights)
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        rows, offsets, weights = ctx.saved_tensors
        group, plan = ctx.group, ctx.plan
        grad = grad_output.to(torch.float32).contiguous()
        batch = plan.batch
        update = group.optimizer.next_update_args(group.table_names)
        for t, feats in enumerate(plan.features):
            if not feats:
                continue
            table = group.tables[t]
            dim = table.dim
            # The table's features as one list of bags: their gradient columns stacked, offsets rebased.
            table_rows = torch.cat([rows[s : s + c] for _, s, c, _ in feats])
            table_weights = None if weights is None else torch.cat([weights[s : s + c] for _, s, c, _ in feats])
            pieces, base = [], 0
            for j, (k, s, c, _) in enumerate(feats):
                o = offsets[k * batch : (k + 1) * batch + 1] - s + base
                pieces.append(o if j == len(feats) - 1 else o[:-1])
                base += c
            table_offsets = torch.cat(pieces)
            table_grad = torch.cat([grad[:, col : col + dim] for _, _, _, col in feats]).contiguous()
            torch.ops.recis.gpu_pooled_backward_update(
                table.handle, table_rows, table_offsets, table_weights, plan.modes[t], table_grad, 0,
                *update.hyperparameters(), update.steps[t],
            )
        return (None,) * 7


class CudaLookupPlan:
    """Which values each table reads, for one batch: per table t, ``features[t]`` holds
    (key index, first value, value count, output column) of every key it reads."""

    def __init__(self, batch: int, out_dim: int, modes: List[int], features: List[List[Tuple[int, int, int, int]]]):
        self.batch = batch
        self.out_dim = out_dim
        self.modes = modes
        self.features = features

    @classmethod
    def from_layout(cls, layout, kjt, modes: List[int]) -> "CudaLookupPlan":
        """The plan of a KJT whose keys map onto the tables by ``layout`` (a ``BagLayout``);
        ``modes``: each table's pooling. Reads the per-key value counts once (a host sync)."""
        features: List[List[Tuple[int, int, int, int]]] = [[] for _ in modes]
        start = 0
        for k, count in enumerate(kjt.length_per_key()):
            t = layout.feature_table[k]
            if t >= 0:
                features[t].append((k, start, count, layout.feature_col[k]))
            start += count
        return cls(kjt.stride(), layout.out_dim, modes, features)


class CudaLookupGroup:
    """CUDA tables looked up and updated together, with the optimizer that updates them."""

    def __init__(self, tables: Sequence[CudaHashTable], optimizer) -> None:
        self.tables = list(tables)
        self.table_names = [t.name for t in tables]
        self.optimizer = optimizer
        self._anchor = torch.zeros(0, device="cpu", requires_grad=True)

    def __call__(self, ids, offsets, weights, plan: CudaLookupPlan, insert: bool) -> torch.Tensor:
        return _CudaPooledLookup.apply(self._anchor, self, ids, offsets, weights, plan, insert)

    def sequence(self, ids: torch.Tensor, insert: bool) -> torch.Tensor:
        """The single table's rows of ``ids``, unpooled ``(N, dim)``: bags of one."""
        n = ids.numel()
        plan = CudaLookupPlan(n, self.tables[0].dim, [POOLING_SUM], [[(0, 0, n, 0)]])
        offsets = torch.arange(n + 1, device=ids.device)
        return _CudaPooledLookup.apply(self._anchor, self, ids, offsets, None, plan, insert)


__all__ = ["CudaHashTable", "CudaLookupGroup", "CudaLookupPlan", "cuda_tables_available"]
