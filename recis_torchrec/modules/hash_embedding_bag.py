# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``HashEmbeddingBagCollection``: TorchRec's EBC interface on dynamic hashtables."""

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recis_torchrec import ops
from recis_torchrec.modules.device import module_device
from recis_torchrec.modules.hash_module import HashTablesMixin
from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.tables.options import OptionsArg
from recis_torchrec.tables.factory import build_tables, check_table_configs
from recis_torchrec.modules.lookup import BagLayout, LookupGroup
from recis_torchrec.modules.kjt import check_unique_keys, checked_kjt, expand_batch, explain_kjt, permute_keys, uniform_batch
from recis_torchrec.modules.tracing import ForwardRef, hash_forward
from recis_torchrec.optim.fused import HashFusedOptimizer
from recis_torchrec.optim.in_backward import table_optimizers

torch.fx.wrap("hash_forward")  # one fx node per module (see tracing.py)

_POOLING = {PoolingType.SUM: ops.POOLING_SUM, PoolingType.MEAN: ops.POOLING_MEAN}


@dataclass(frozen=True)
class _KeyPlan:
    """How one KJT key layout maps onto the tables (cached per key tuple)."""

    permute: Optional[List[int]]  # reorder/duplicate the KJT first (a feature shared by tables)
    layout: BagLayout
    # Tables with different optimizers are looked up apart: per lookup group, its layout
    # (group-local tables, its own columns), and the output's columns in the groups' concatenation.
    group_layouts: Optional[List[BagLayout]] = None
    columns: Optional[torch.Tensor] = None


class HashEmbeddingBagCollection(HashTablesMixin, EmbeddingBagCollectionInterface, FusedOptimizerModule):
    """``torchrec.EmbeddingBagCollection`` backed by dynamic hashtables.

    Ids are unbounded int64 values: each table grows as new ids arrive, and
    ``num_embeddings`` is only a capacity hint. A new id's row starts at a
    deterministic function of (table, id). The sparse optimizer chosen by
    ``fused_params`` runs inside backward and keeps its state in the rows; its
    hyper-parameters and state are exposed by :attr:`fused_optimizer`.

    In training mode forward inserts unseen ids; in eval mode it inserts
    nothing and an unseen id reads its initial value.

    Args:
        tables: the tables, as for TorchRec's EBC. Feature names shared by
            several tables are output as ``"feature@table"``, as TorchRec does.
        is_weighted: pool with the KJT's weights (per-sample weights).
        device: ``"cpu"`` (or None).
        fused_params: TorchRec-style ``{"optimizer": EmbOptimType..., "learning_rate": ..., ...}``:
            the optimizer's hyperparameters by FBGEMM's names (``optim/registry.py``, the README's
            ``fused_params`` table) and ``weight_decay_mode``.
            Defaults to EXACT_SGD with learning rate 0.01.
        options: one ``HashTableOptions`` for every table, or a dict by table name.
        table_fused_params: per table name, fused parameters merged with ``fused_params`` (a key
            both give must agree). ``rt.convert`` and the sharders fill it from
            ``apply_optimizer_in_backward`` on the TorchRec module's weights. Tables with
            different optimizers are looked up and updated apart.

    Example::

        tables = [
            EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"]),
            EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"]),
        ]
        ebc = HashEmbeddingBagCollection(
            tables, fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 1e-3}
        )

        #        i = 0        i = 1    i = 2  <-- batch indices
        # "f1"   [2**40, -7]  None     [2]
        # "f2"   [3]          [4]      [5, 6, 7]
        features = KeyedJaggedTensor(
            keys=["f1", "f2"],
            values=torch.tensor([2**40, -7, 2, 3, 4, 5, 6, 7]),
            offsets=torch.tensor([0, 2, 2, 3, 4, 5, 8]),
        )
        pooled = ebc(features)
        pooled.keys()            # ['f1', 'f2']
        pooled.values().shape    # torch.Size([3, 7])
        pooled.offset_per_key()  # [0, 3, 7]
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        options: OptionsArg = None,
        table_fused_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
    ) -> None:
        super().__init__()
        self._fx_forward = ForwardRef(self)
        self._device = module_device(device, "HashEmbeddingBagCollection")
        self._is_weighted = is_weighted
        check_table_configs(tables, EmbeddingBagConfig)
        self._embedding_bag_configs = tables
        for config in tables:
            if isinstance(config, EmbeddingBagConfig) and config.pooling not in _POOLING:
                raise NotImplementedError(f"table {config.name!r}: pooling {config.pooling} is not supported")
        self._optimizer_configs = table_optimizers(
            [getattr(c, "name", None) for c in tables], fused_params, table_fused_params, "HashEmbeddingBagCollection"
        )
        self._options_arg = options
        self._embedding_names: List[str] = [n for names in get_embedding_names_by_table(tables) for n in names]
        self._lengths_per_embedding: List[int] = [c.embedding_dim for c in tables for _ in c.feature_names]
        self._out_dim = sum(self._lengths_per_embedding)
        self._feature_names: List[List[str]] = [c.feature_names for c in tables]
        # (table index, feature name, output column) of every output, in output order.
        self._outputs: List[Tuple[int, str, int]] = []
        col = 0
        for t, c in enumerate(tables):
            for f in c.feature_names:
                self._outputs.append((t, f, col))
                col += c.embedding_dim
        self._table_modes = [_POOLING[c.pooling] for c in tables]
        # (embedding name, first column, dim) of every output, in output order.
        self._output_columns = [
            (name, col, tables[t].embedding_dim) for name, (t, _, col) in zip(self._embedding_names, self._outputs)
        ]
        by_config: Dict[Any, List[int]] = {}
        for t, c in enumerate(tables):
            by_config.setdefault(self._optimizer_configs[c.name], []).append(t)
        # Table indices of each lookup group: one group per distinct optimizer config.
        self._group_tables: List[List[int]] = list(by_config.values()) or [[]]
        self._plans: Dict[Tuple[str, ...], _KeyPlan] = {}
        self._build()

    def _build(self) -> None:
        """The tables, fused optimizer and lookup groups, on ``self._device`` (none on meta)."""
        tables = self._embedding_bag_configs
        self._tables: Dict[str, HashTable] = build_tables(
            tables, self._optimizer_configs, self._options_arg, EmbeddingBagConfig, self._device
        )
        self._optim = HashFusedOptimizer(self._tables, self._optimizer_configs)
        if self._device.type == "meta":
            self._table_list: List[HashTable] = []
            self._lookups: List[Any] = []
            return
        self._table_list = [self._tables[c.name] for c in tables]
        self._lookups = [LookupGroup([self._table_list[t] for t in g], self._optim) for g in self._group_tables]

    # -- TorchRec interface ----------------------------------------------------

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    @property
    def embedding_bags(self) -> Dict[str, Any]:
        """TorchRec's ``ebc.embedding_bags[name]``: each table's device, dtype, config and rows
        (read-only), as :class:`~recis_torchrec.modules.hash_module.TableView`."""
        return self._table_views(self._embedding_bag_configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    # -- forward ---------------------------------------------------------------

    def _plan(self, keys: List[str]) -> _KeyPlan:
        cache_key = tuple(keys)
        plan = self._plans.get(cache_key)
        if plan is not None:
            return plan
        index = {k: i for i, k in enumerate(keys)}
        for t, f, _ in self._outputs:
            if f not in index:
                raise KeyError(
                    f"HashEmbeddingBagCollection: feature {f!r} (table {self._embedding_bag_configs[t].name!r}) is missing "
                    f"from the KeyedJaggedTensor, whose keys are {list(keys)}"
                )
        used_by = {}
        for t, f, col in self._outputs:
            used_by.setdefault(f, []).append((t, col))
        if any(len(v) > 1 for v in used_by.values()):
            # A feature read by several tables: give each output its own copy
            # of the key, so every key maps to exactly one table.
            permute = [index[f] for _, f, _ in self._outputs]
            feature_table = [t for t, _, _ in self._outputs]
            feature_col = [col for _, _, col in self._outputs]
        else:
            permute = None
            feature_table = [used_by[k][0][0] if k in used_by else -1 for k in keys]
            feature_col = [used_by[k][0][1] if k in used_by else 0 for k in keys]
        feature_mode = [
            _POOLING[self._embedding_bag_configs[t].pooling] if t >= 0 else ops.POOLING_SUM for t in feature_table
        ]
        layout = BagLayout(feature_table, feature_mode, feature_col, self._out_dim)
        plan = _KeyPlan(permute, layout, *self._split_by_group(layout))
        self._plans[cache_key] = plan
        return plan

    def _split_by_group(self, layout: BagLayout) -> Tuple[Optional[List[BagLayout]], Optional[torch.Tensor]]:
        """Per lookup group, the layout of its own features (group-local tables, columns packed in
        key order); and where each output column lies in the groups' outputs side by side."""
        if len(self._group_tables) == 1:
            return None, None
        layouts, source = [], {}
        base = 0
        for g, members in enumerate(self._group_tables):
            local = {t: i for i, t in enumerate(members)}
            ft, cols, col = [], [], 0
            for k, t in enumerate(layout.feature_table):
                if t in local:
                    dim = self._embedding_bag_configs[t].embedding_dim
                    ft.append(local[t])
                    cols.append(col)
                    source[layout.feature_col[k]] = (base + col, dim)
                    col += dim
                else:
                    ft.append(-1)
                    cols.append(0)
            layouts.append(BagLayout(ft, list(layout.feature_mode), cols, col))
            base += col
        columns = torch.cat([torch.arange(src, src + dim) for _, (src, dim) in sorted(source.items())])
        # On the tables' device: index_select with a CPU index on CUDA outputs fails.
        return layouts, columns.to(self._device) if self._device.type != "meta" else columns

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pools each feature's bags into a ``KeyedTensor`` ordered as TorchRec's EBC orders it.

        Args:
            features: a KJT holding at least every feature of every table
                (extra keys are ignored, as TorchRec ignores them).

        Returns:
            KeyedTensor: keys = the embedding names, values ``(B, sum(dims))``.
        """
        return hash_forward(self._fx_forward, features)

    def _forward_impl(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"HashEmbeddingBagCollection expects a KeyedJaggedTensor, got {type(features).__name__}")
        check_unique_keys(features, "HashEmbeddingBagCollection")
        features, inverse = uniform_batch(features, "HashEmbeddingBagCollection")
        plan = self._plan(features.keys())
        if self._device.type == "meta":  # shapes only, as TorchRec's EBC on meta
            return KeyedTensor(
                keys=self._embedding_names,
                length_per_key=self._lengths_per_embedding,
                values=torch.empty(
                    features.stride() if inverse is None else inverse[1].shape[-1], self._out_dim, device="meta"
                ),
            )
        if plan.permute is not None:
            features = permute_keys(features, plan.permute)
        values, offsets, weights, _ = checked_kjt(features, self._is_weighted, check_values=False)
        if values.device != self._device:
            raise ValueError(
                f"HashEmbeddingBagCollection is on {self._device} but the KeyedJaggedTensor of features "
                f"{features.keys()} is on {values.device}"
            )
        layouts = plan.group_layouts or [plan.layout]
        pieces = []
        for lookup, layout in zip(self._lookups, layouts):
            try:
                pieces.append(lookup(values, offsets, weights, layout, self.training))
            except RuntimeError:
                explain_kjt(features, self._is_weighted, "HashEmbeddingBagCollection")
                raise
        if plan.columns is None:
            pooled = pieces[0]
        else:
            joined = torch.cat(pieces, dim=1)
            columns = plan.columns if plan.columns.device == joined.device else plan.columns.to(joined.device)
            pooled = joined.index_select(1, columns)
        if inverse is not None:
            pooled = expand_batch(pooled, self._output_columns, inverse)
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._lengths_per_embedding,
            values=pooled,
        )
