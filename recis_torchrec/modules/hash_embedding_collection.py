# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``HashEmbeddingCollection``: TorchRec's ``EmbeddingCollection`` (unpooled, per-id embeddings) on hashtables.

Each id's embedding is its row: the module runs the bag module's fused
lookup with every id as a bag of one, so the forward finds (in training,
inserts) and gathers the rows in one op per table, and the backward sums the
gradients of repeated ids and applies the fused optimizer to each row once.
Memory is the unique rows plus the (N, dim) output.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollectionInterface, get_embedding_names_by_table
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recis_torchrec import ops
from recis_torchrec.modules.hash_embedding_bag import (
    OptionsArg,
    checked_kjt,
    load_tables,
    resolve_options,
    save_tables,
)
from recis_torchrec.modules.hash_table import HashTable
from recis_torchrec.modules.lookup import BagLayout, LookupGroup
from recis_torchrec.optim.fused import HashFusedOptimizer, parse_fused_params


class _SequenceLookup(torch.autograd.Function):
    """Rows of `ids` (one table), unpooled; backward sums each row's gradients and updates it once.

    The forward is the bag module's fused lookup with every id as a bag of
    one. The backward groups the gradients by row with ``torch.unique`` and
    ``index_add_`` (a scatter into the unique rows, which stay cache-resident)
    and applies the fused optimizer with ``sparse_update``: for long
    sequences this is several times faster than reducing bags of one.
    """

    @staticmethod
    def forward(ctx, anchor, group, ids, layout, insert):  # type: ignore[override]
        n = ids.numel()
        out, rows = ops.lookup_pooled_forward(
            group.tables, ids, torch.arange(n + 1, dtype=torch.int64), None, layout.feature_table,
            layout.feature_mode, layout.feature_col, layout.out_dim, insert, group.clock(),
        )
        ctx.group = group
        ctx.save_for_backward(rows)
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        group = ctx.group
        args = group.optimizer.next_update_args(group.table_names)
        keep = rows >= 0  # ids not admitted (or eval lookups) get no update
        grad = grad_output.to(torch.float32)
        if not bool(keep.all()):
            rows, grad = rows[keep], grad[keep]
        if rows.numel():
            unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
            summed = torch.zeros(unique.numel(), grad.shape[1], dtype=torch.float32).index_add_(0, inverse, grad)
            ops.sparse_update(group.tables[0], unique, summed, *args[:7], int(args[7][0]))
        return (None,) * 5


class HashEmbeddingCollection(EmbeddingCollectionInterface, FusedOptimizerModule):
    """Unpooled embeddings for unbounded int64 ids, with TorchRec's ``EmbeddingCollection`` interface.

    Args:
        tables: TorchRec ``EmbeddingConfig``s; all of one ``embedding_dim``, as TorchRec requires.
            ``num_embeddings`` is a capacity hint.
        device: ``None`` or CPU.
        need_indices: also return each feature's ids as its JaggedTensor's weights (as TorchRec does).
        use_gather_select, use_gather_select_per_sharding: accepted for TorchRec's signature; TorchRec's
            gather strategies for its sharded lookups, with no effect on hash tables.
        fused_params: the fused sparse optimizer (TorchRec keys; default exact SGD).
        options: ``HashTableOptions`` for every table, or by table name.

    ``forward(kjt) -> Dict[str, JaggedTensor]``: per embedding name (the
    feature name, or ``feature@table`` for a feature several tables read),
    values ``(n_ids, dim)`` with the feature's lengths.
    """

    def __init__(
        self,
        tables: List[EmbeddingConfig],
        device: Optional[torch.device] = None,
        need_indices: bool = False,
        use_gather_select: bool = False,
        use_gather_select_per_sharding: Optional[Dict[str, bool]] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        options: OptionsArg = None,
    ) -> None:
        super().__init__()
        if device is not None and torch.device(device).type != "cpu":
            raise NotImplementedError(f"HashEmbeddingCollection: device {device!r} is not supported yet; use 'cpu'")
        self._device = torch.device("cpu")
        self._need_indices = need_indices
        self._embedding_configs = tables
        self._optimizer_config = parse_fused_params(fused_params)
        per_table = resolve_options(tables, options)
        dim, seen = -1, set()
        for c in tables:
            if not isinstance(c, EmbeddingConfig):
                raise TypeError(f"tables must be EmbeddingConfig, got {type(c).__name__}")
            if c.name in seen:
                raise ValueError(f"Duplicate table name {c.name}")
            seen.add(c.name)
            if c.embedding_dim <= 0:
                raise ValueError(f"table {c.name!r}: embedding_dim must be > 0, got {c.embedding_dim}")
            dim = c.embedding_dim if dim < 0 else dim
            if c.embedding_dim != dim:
                raise ValueError(
                    f"All tables in an EmbeddingCollection must have the same embedding_dim; table {c.name!r} has "
                    f"{c.embedding_dim}, the first has {dim}"
                )
            if c.data_type != DataType.FP32:
                raise NotImplementedError(f"table {c.name!r}: data_type {c.data_type} is not supported; tables are FP32")
            if not c.feature_names:
                c.feature_names = [c.name]
        self._embedding_dim = dim
        self._tables: Dict[str, HashTable] = {
            c.name: HashTable(
                name=c.name,
                dim=c.embedding_dim,
                state_dim=self._optimizer_config.state_dim(c.embedding_dim),
                options=per_table[c.name],
                num_embeddings=c.num_embeddings,
                init_range=(c.get_weight_init_min(), c.get_weight_init_max()),
            )
            for c in tables
        }
        self._optim = HashFusedOptimizer(self._tables, self._optimizer_config)
        # One lookup group per table: each backward counts one update of its own table.
        self._groups = [LookupGroup([self._tables[c.name]], self._optim) for c in tables]
        self._layout = BagLayout([0], [ops.POOLING_SUM], [0], max(dim, 1))
        self._embedding_names_by_table = get_embedding_names_by_table(tables)
        self._feature_names = [c.feature_names for c in tables]

    # -- TorchRec interface ------------------------------------------------------

    def embedding_configs(self) -> List[EmbeddingConfig]:
        return self._embedding_configs

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        return self._embedding_dim

    def embedding_names_by_table(self) -> List[List[str]]:
        return self._embedding_names_by_table

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def fused_optimizer(self) -> HashFusedOptimizer:
        return self._optim

    def reset_parameters(self) -> None:
        """Tables start empty and rows are initialised when ids arrive; nothing to reset."""

    def tables(self) -> Dict[str, HashTable]:
        return dict(self._tables)

    def table_stats(self) -> Dict[str, Dict[str, int]]:
        return {name: t.info() for name, t in self._tables.items()}

    # -- forward -------------------------------------------------------------------

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"HashEmbeddingCollection expects a KeyedJaggedTensor, got {type(features).__name__}")
        keys = features.keys()
        for t, names in enumerate(self._feature_names):
            for f in names:
                if f not in keys:
                    raise KeyError(
                        f"HashEmbeddingCollection: feature {f!r} (table {self._embedding_configs[t].name!r}) is "
                        f"missing from the KeyedJaggedTensor, whose keys are {list(keys)}"
                    )
        values, _, _, batch = checked_kjt(features, False, "HashEmbeddingCollection")
        lengths = features.lengths().long()
        per_key = lengths.view(len(keys), batch).sum(1).tolist() if batch else [0] * len(keys)
        starts = [0]
        for n in per_key:
            starts.append(starts[-1] + n)
        index = {k: i for i, k in enumerate(keys)}
        out: Dict[str, JaggedTensor] = {}
        for t, names in enumerate(self._feature_names):
            spans: List[Tuple[int, int]] = [(starts[index[f]], starts[index[f] + 1]) for f in names]
            ids = torch.cat([values[a:b] for a, b in spans]) if len(spans) > 1 else values[spans[0][0] : spans[0][1]]
            n = ids.numel()
            if n:
                g = self._groups[t]
                rows = _SequenceLookup.apply(g._anchor, g, ids, self._layout, self.training)
            else:
                rows = torch.zeros(0, self._embedding_dim)
            pos = 0
            for j, f in enumerate(names):
                k = index[f]
                cnt = spans[j][1] - spans[j][0]
                out[self._embedding_names_by_table[t][j]] = JaggedTensor(
                    values=rows[pos : pos + cnt],
                    lengths=lengths[k * batch : (k + 1) * batch],
                    weights=values[spans[j][0] : spans[j][1]] if self._need_indices else None,
                )
                pos += cnt
        return out

    # -- state dict ------------------------------------------------------------------
    # Tables appear as "embeddings.{table}.weight" (rows ordered by id) and
    # "embeddings.{table}.ids"; a TorchRec EmbeddingCollection state dict
    # (weights only) loads too: its row i becomes id i.

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_tables(self._tables, destination, prefix, section="embeddings")

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = load_tables(self._tables, state_dict, prefix, missing_keys, error_msgs, section="embeddings")
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k not in ours},
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )


__all__ = ["HashEmbeddingCollection"]
