# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``HashEmbeddingBagCollection``: TorchRec's EBC interface on dynamic hashtables."""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recis_torchrec import ops
from recis_torchrec.modules.hash_table import HashTable
from recis_torchrec.modules.lookup import BagLayout, LookupGroup
from recis_torchrec.modules.options import HashTableOptions
from recis_torchrec.modules.kjt import checked_kjt, expand_batch, explain_kjt, permute_keys, uniform_batch
from recis_torchrec.modules.state_dict import load_tables, save_tables
from recis_torchrec.ops.devices import require_cuda
from recis_torchrec.modules.state_rows import Owner
from recis_torchrec.modules.tracing import ForwardRef, hash_forward, refuse_scripting
from recis_torchrec.optim.fused import HashFusedOptimizer
from recis_torchrec.optim.in_backward import table_optimizers

OptionsArg = Union[None, HashTableOptions, Mapping[str, HashTableOptions]]

torch.fx.wrap("hash_forward")  # one fx node per module (see tracing.py)

_POOLING = {PoolingType.SUM: ops.POOLING_SUM, PoolingType.MEAN: ops.POOLING_MEAN}


def resolve_options(
    tables: Sequence[EmbeddingBagConfig], options: OptionsArg, strict: bool = True
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


@dataclass(frozen=True)
class _KeyPlan:
    """How one KJT key layout maps onto the tables (cached per key tuple)."""

    permute: Optional[List[int]]  # reorder/duplicate the KJT first (a feature shared by tables)
    layout: BagLayout
    # Tables with different optimizers are looked up apart: per lookup group, its layout
    # (group-local tables, its own columns), and the output's columns in the groups' concatenation.
    group_layouts: Optional[List[BagLayout]] = None
    columns: Optional[torch.Tensor] = None


def module_device(device: Optional[Any], who: str) -> torch.device:
    """The device of a hash-backed module: CPU (None, outside a ``torch.device("meta")`` context),
    CUDA, or meta (configs only: the tables are built when the module is moved off it)."""
    if device is None:
        default = torch.get_default_device()
        return torch.device("meta") if default.type == "meta" else torch.device("cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda", "meta"):
        raise NotImplementedError(f"{who}: device {device} is not supported; use 'cpu', 'cuda' or 'meta'")
    if device.type == "cuda":
        require_cuda(who)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def build_tables(
    configs: Sequence[Any],
    optimizer_configs: Mapping[str, Any],
    options: OptionsArg,
    config_type: type,
    device: torch.device = torch.device("cpu"),
) -> Dict[str, Any]:
    """A table per TorchRec table config (``EmbeddingBagConfig`` or ``EmbeddingConfig``), checked:
    ``HashTable``s on ``device``. ``optimizer_configs``: each table's
    ``SparseOptimizerConfig``, by name."""
    per_table = resolve_options(configs, options)
    for name, o in per_table.items():
        if o.device is not None and torch.device(o.device).type != device.type:
            raise ValueError(
                f"table {name!r}: HashTableOptions.device={o.device!r} but the module is on {device}; "
                "a module's tables share its device"
            )
    seen = set()
    for config in configs:
        if not isinstance(config, config_type):
            raise TypeError(f"tables must be {config_type.__name__}, got {type(config).__name__}")
        if config.name in seen:
            raise ValueError(f"Duplicate table name {config.name}")
        seen.add(config.name)
        if config.embedding_dim <= 0:
            raise ValueError(f"table {config.name!r}: embedding_dim must be > 0, got {config.embedding_dim}")
        if config.data_type not in ROW_DTYPES:
            raise NotImplementedError(
                f"table {config.name!r}: data_type {config.data_type} is not supported; hash tables store "
                f"{sorted(d.name for d in ROW_DTYPES)}"
            )
        if not config.feature_names:
            config.feature_names = [config.name]
        repeated = sorted({f for f in config.feature_names if config.feature_names.count(f) > 1})
        if repeated:
            raise ValueError(f"table {config.name!r}: feature_names lists {repeated} more than once")
    if device.type == "meta":
        return {}  # built when the module leaves the meta device
    return {
        c.name: make_table(c, optimizer_configs[c.name], per_table[c.name], c.num_embeddings, device) for c in configs
    }


# TorchRec's table data types that hash tables store, and their torch dtypes.
ROW_DTYPES = {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}


def make_table(config: Any, optimizer_config, options: HashTableOptions, num_embeddings: int, device: torch.device):
    """The table of one TorchRec config, a ``HashTable`` on ``device``.
    ``num_embeddings`` is the capacity hint (a shard's share of the config's, when sharded)."""
    kwargs = dict(
        name=config.name,
        dim=config.embedding_dim,
        state_dim=optimizer_config.state_dim(config.embedding_dim),
        options=options,
        num_embeddings=num_embeddings,
        init_range=(config.get_weight_init_min(), config.get_weight_init_max()),
    )
    return HashTable(**kwargs, dtype=ROW_DTYPES[config.data_type], device=device)


class HashTablesMixin:
    """What the hash-backed TorchRec modules share: their tables (``self._tables``), fused
    optimizer (``self._optim``), CPU device, and state-dict form ``{section}.{table}.weight``
    plus ``.ids`` (``_state_section``: ``"embedding_bags"`` for the EBC, ``"embeddings"`` for the EC)."""

    _state_section = "embedding_bags"

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def fused_optimizer(self) -> HashFusedOptimizer:
        return self._optim

    @property
    def hash_optimizer(self) -> HashFusedOptimizer:
        """The fused optimizer of this module's hash tables (``fused_optimizer`` of a mixed plan's
        sharded module also holds TorchRec's)."""
        return self._optim

    def __prepare_scriptable__(self) -> "HashTablesMixin":
        refuse_scripting(self)
        return self

    def reset_parameters(self) -> None:
        """Re-initialises every row: each id keeps its row, with its initial value and zero optimizer
        state and metadata (as TorchRec re-initialises its weights). Admission counts and the eviction
        log are dropped."""
        for table in self._tables.values():
            ids = table.export()[0]
            table.clear()
            if ids.numel():
                table.import_(ids)

    # -- devices and dtypes: each either takes effect or raises ---------------------

    def _move(self, device: Optional[torch.device], how: str) -> None:
        if device is None:
            return
        device = torch.device(device)
        who = type(self).__name__
        if self._device.type == "meta":
            if device.type != "meta":  # materialise: build the (empty) tables there
                self._device = module_device(device, who)
                self._build()
            return
        if device.type == self._device.type and (device.index is None or device == self._device):
            return
        if device.type == "meta":
            raise RuntimeError(
                f"{who}.{how}(meta): moving a module with hash tables to the meta device would drop its rows; "
                "build it on meta instead (device='meta')"
            )
        raise RuntimeError(
            f"{who}.{how}({device}): its tables live on {self._device}; build the module on {device} "
            f"(device=...) or convert the TorchRec model there (rt.convert(model, device=...))"
        )

    def _check_dtype(self, dtype: Optional[torch.dtype], how: str) -> None:
        if dtype is not None and dtype != torch.float32:
            raise RuntimeError(
                f"{type(self).__name__}.{how}({dtype}): the tables' dtype comes from each config's data_type "
                "(EmbeddingBagConfig(data_type=...)); converting a module's tables is not supported"
            )

    def to(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        self._check_dtype(dtype, "to")
        self._move(device, "to")
        return super().to(*args, **kwargs)  # children (a TorchRec child of a mixed plan) as usual

    def to_empty(self, *, device: Any, recurse: bool = True):  # type: ignore[override]
        if self._device.type != "meta":
            raise RuntimeError(
                f"{type(self).__name__}.to_empty({device}): the module holds tables with rows; to_empty "
                "materialises a module built on the meta device"
            )
        self._move(device, "to_empty")
        return self

    def cuda(self, device: Any = None):  # type: ignore[override]
        self._move(torch.device("cuda") if device is None else torch.device("cuda", device) if isinstance(device, int)
                   else torch.device(device), "cuda")
        return self

    def cpu(self):  # type: ignore[override]
        self._move(torch.device("cpu"), "cpu")
        return self

    def half(self):  # type: ignore[override]
        self._check_dtype(torch.float16, "half")
        return self

    def bfloat16(self):  # type: ignore[override]
        self._check_dtype(torch.bfloat16, "bfloat16")
        return self

    def double(self):  # type: ignore[override]
        self._check_dtype(torch.float64, "double")
        return self

    def float(self):  # type: ignore[override]
        return self

    def type(self, dst_type: Any):  # type: ignore[override]
        raise RuntimeError(f"{type(self).__name__}.type({dst_type}): not supported on hash tables")

    def tables(self) -> Dict[str, HashTable]:
        """The tables by name (none while the module is on the meta device)."""
        return dict(self._tables)

    def table_stats(self) -> Dict[str, Dict[str, int]]:
        """Rows, capacity and memory of every table."""
        return {name: t.info() for name, t in self._tables.items()}

    def _state_sharding(self) -> Optional[Tuple[Any, Owner, torch.device]]:
        """(process group, this rank, collective device) when the rows are a shard; None: all rows."""
        return None

    def _row_filter(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """Which ids of loaded rows this module keeps (``ids -> bool mask``); None: all of them.
        A shard keeps the ids its rank owns."""
        return None

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_tables(self._tables, destination, prefix, section=self._state_section, sharding=self._state_sharding())

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = load_tables(
            self._tables, state_dict, prefix, missing_keys, error_msgs, keep=self._row_filter(),
            section=self._state_section,
        )
        # The base class loads nothing here (the module has no parameters) but
        # reports, when strict, keys under this prefix that are not ours.
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k not in ours},
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )


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
        fused_params: TorchRec-style ``{"optimizer": EmbOptimType..., "learning_rate": ...,
            "eps", "beta1", "beta2", "weight_decay", "weight_decay_mode"}``.
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
        return layouts, columns

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
        pooled = pieces[0] if plan.columns is None else torch.cat(pieces, dim=1).index_select(1, plan.columns)
        if inverse is not None:
            pooled = expand_batch(pooled, self._output_columns, inverse)
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._lengths_per_embedding,
            values=pooled,
        )
