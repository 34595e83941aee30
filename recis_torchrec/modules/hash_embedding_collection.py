# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``HashEmbeddingCollection``: TorchRec's ``EmbeddingCollection`` (unpooled, per-id embeddings) on hashtables.

Each id's embedding is its row: the module runs the bag module's fused
lookup with every id as a bag of one, so the forward finds (in training,
inserts) and gathers the rows in one op per table, and the backward sums the
gradients of repeated ids and applies the fused optimizer to each row once.
Memory is the unique rows plus the (N, dim) output.

A table can also serve an ``EmbeddingBagCollection``: with
``share_tables_with=ebc``, tables of the same name are the bag module's own
tables (one id space, such as item ids in both the candidate and the
history). The bag module owns them: it saves them, and its fused optimizer
updates them for both modules.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollectionInterface, get_embedding_names_by_table
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recis_torchrec.modules.device import module_device
from recis_torchrec.modules.hash_module import HashTablesMixin
from recis_torchrec.tables.options import OptionsArg
from recis_torchrec.tables.factory import build_tables, check_table_configs
from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.modules.kjt import check_kjt_tensors, check_unique_keys, checked_kjt, explain_kjt
from recis_torchrec.modules.lookup import LookupGroup, sequence_lookup
from recis_torchrec.modules.tracing import ForwardRef, hash_forward
from recis_torchrec.optim.fused import HashFusedOptimizer
from recis_torchrec.optim.in_backward import table_optimizers


torch.fx.wrap("hash_forward")  # one fx node per module (see tracing.py)


class HashEmbeddingCollection(HashTablesMixin, EmbeddingCollectionInterface, FusedOptimizerModule):
    """Unpooled embeddings for unbounded int64 ids, with TorchRec's ``EmbeddingCollection`` interface.

    Args:
        tables: TorchRec ``EmbeddingConfig``s; all of one ``embedding_dim``, as TorchRec requires.
            ``num_embeddings`` is a capacity hint.
        device: ``None`` (CPU), ``"cpu"`` or ``"cuda"`` (CUDA tables; needs a ``RECIS_CUDA=1`` build).
        need_indices: also return each feature's ids as its JaggedTensor's weights (as TorchRec does).
        use_gather_select, use_gather_select_per_sharding: accepted for TorchRec's signature; TorchRec's
            gather strategies for its sharded lookups, with no effect on hash tables.
        fused_params: the fused sparse optimizer (TorchRec keys; default exact SGD).
        options: ``HashTableOptions`` for every table, or by table name.
        table_fused_params: per table name, fused parameters merged with ``fused_params`` (a key
            both give must agree); filled by ``rt.convert`` and the sharders from
            ``apply_optimizer_in_backward``.
        share_tables_with: a hash module (usually a ``HashEmbeddingBagCollection``); each of this
            module's tables whose name it also holds is that module's table, with its rows, options and
            fused optimizer. ``tables()``, the state dict and ``fused_optimizer`` here cover only the
            tables this module owns.

    ``forward(kjt) -> Dict[str, JaggedTensor]``: per embedding name (the
    feature name, or ``feature@table`` for a feature several tables read),
    values ``(n_ids, dim)`` with the feature's lengths.
    """

    # Tables appear as "embeddings.{table}.weight" (rows ordered by id) and
    # "embeddings.{table}.ids"; a TorchRec EmbeddingCollection state dict
    # (weights only) loads too: its row i becomes id i.
    _state_section = "embeddings"

    def __init__(
        self,
        tables: List[EmbeddingConfig],
        device: Optional[torch.device] = None,
        need_indices: bool = False,
        use_gather_select: bool = False,
        use_gather_select_per_sharding: Optional[Dict[str, bool]] = None,
        fused_params: Optional[Dict[str, Any]] = None,
        options: OptionsArg = None,
        share_tables_with: Optional[nn.Module] = None,
        table_fused_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
    ) -> None:
        super().__init__()
        self._fx_forward = ForwardRef(self)
        self._device = module_device(device, "HashEmbeddingCollection")
        self._need_indices = need_indices
        check_table_configs(tables, EmbeddingConfig)
        self._embedding_configs = tables
        for c in tables[1:]:
            if c.embedding_dim != tables[0].embedding_dim:
                raise ValueError(
                    f"All tables in an EmbeddingCollection must have the same embedding_dim; table {c.name!r} has "
                    f"{c.embedding_dim}, the first has {tables[0].embedding_dim}"
                )
        borrowed = shared_tables(tables, share_tables_with, "HashEmbeddingCollection")
        own = [c for c in tables if c.name not in borrowed]
        borrowed_with_optimizer = sorted(set(table_fused_params or {}) & set(borrowed))
        if borrowed_with_optimizer:
            raise ValueError(
                f"HashEmbeddingCollection: tables {borrowed_with_optimizer} are shared with another module, whose "
                "optimizer updates them; set their optimizer on that module"
            )
        if borrowed and self._device.type == "meta":
            raise ValueError("HashEmbeddingCollection: tables shared with another module cannot be on the meta device")
        self._optimizer_configs = table_optimizers(
            [getattr(c, "name", None) for c in own], fused_params, table_fused_params, "HashEmbeddingCollection"
        )
        self._own_configs = own
        self._borrowed = borrowed
        self._options_arg = options
        self._embedding_dim = tables[0].embedding_dim if tables else -1
        for name, (table, _) in borrowed.items():
            if getattr(table, "device", torch.device("cpu")).type != self._device.type:
                raise ValueError(
                    f"HashEmbeddingCollection: table {name!r} is shared with a module on another device "
                    f"({getattr(table, 'device', 'cpu')}); this module is on {self._device}"
                )
        self._build()
        self._embedding_names_by_table = get_embedding_names_by_table(tables)
        self._table_features = [
            list(zip(c.feature_names, names)) for c, names in zip(tables, self._embedding_names_by_table)
        ]

    def _build(self) -> None:
        """The owned tables, fused optimizer and lookup groups, on ``self._device`` (none on meta)."""
        self._tables: Dict[str, HashTable] = build_tables(
            self._own_configs, self._optimizer_configs, self._options_arg, EmbeddingConfig, self._device
        )
        self._optim = HashFusedOptimizer(self._tables, self._optimizer_configs)
        if self._device.type == "meta":
            self._groups: List[Any] = []
            return
        # One lookup group per table: each backward counts one update of its own table,
        # through the optimizer of the module that owns the table.
        borrowed = self._borrowed
        self._groups = [
            LookupGroup([borrowed[c.name][0]], borrowed[c.name][1])
            if c.name in borrowed
            else LookupGroup([self._tables[c.name]], self._optim)
            for c in self._embedding_configs
        ]

    # -- TorchRec interface ------------------------------------------------------

    def embedding_configs(self) -> List[EmbeddingConfig]:
        return self._embedding_configs

    @property
    def embeddings(self) -> Dict[str, Any]:
        """TorchRec's ``ec.embeddings[name]``: each table's device, dtype, config and rows (read-only),
        as :class:`~recis_torchrec.modules.hash_module.TableView`."""
        return self._table_views(self._embedding_configs)

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        return self._embedding_dim

    def embedding_names_by_table(self) -> List[List[str]]:
        return self._embedding_names_by_table

    # -- forward -------------------------------------------------------------------

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        return hash_forward(self._fx_forward, features)

    def _forward_impl(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"HashEmbeddingCollection expects a KeyedJaggedTensor, got {type(features).__name__}")
        check_unique_keys(features, "HashEmbeddingCollection")
        table_names = [c.name for c in self._embedding_configs]
        if self._device.type == "meta":  # shapes only, as TorchRec's EC on meta
            sequences = sequences_by_table(
                features, table_names, self._table_features, "HashEmbeddingCollection", check_values=False
            )
            out = {}
            for seq in sequences:
                rows = torch.empty(seq.ids.shape[0], self._embedding_dim, device="meta")
                out.update(jagged_outputs(rows, seq.features, self._need_indices))
            return out
        check_kjt_tensors(features, "HashEmbeddingCollection")
        lengths = features.lengths()
        if not torch.compiler.is_compiling() and lengths.numel() and bool(
            ((lengths < 0) | (lengths > features.values().numel())).any()
        ):
            # No op reads a sequence's lengths before they reach the output: a negative length (with the
            # others summing to the id count) or lengths whose int64 sum wraps around to it would come
            # out in the JaggedTensors. Checked here, in eager mode (one read of a scalar).
            explain_kjt(features, False, "HashEmbeddingCollection")
        try:
            sequences = sequences_by_table(
                features, table_names, self._table_features, "HashEmbeddingCollection", check_values=False
            )
            out: Dict[str, JaggedTensor] = {}
            for t, seq in enumerate(sequences):
                rows = sequence_lookup(self._groups[t], seq.ids, self.training)
                out.update(jagged_outputs(rows, seq.features, self._need_indices))
        except RuntimeError:
            explain_kjt(features, False, "HashEmbeddingCollection")
            raise
        return out


@dataclass
class TableSequences:
    """One table's ids in a KJT: its features' ids concatenated (looked up together), and per
    feature (embedding name, lengths (B,), ids)."""

    ids: torch.Tensor
    features: List[Tuple[str, torch.Tensor, torch.Tensor]]


def sequences_by_table(
    features: KeyedJaggedTensor,
    table_names: List[str],
    table_features: List[List[Tuple[str, str]]],
    who: str,
    check_values: bool = True,
) -> List[TableSequences]:
    """Each table's ids from a KJT, checked (every feature present, int ids, consistent lengths;
    ``check_values=False`` leaves the lengths' values to the ops, see ``checked_kjt``).

    ``table_features[t]``: table t's (feature name, embedding name) pairs."""
    keys = features.keys()
    if features.variable_stride_per_key():
        raise NotImplementedError(
            f"{who}: KeyedJaggedTensors with a variable batch size per feature (features {keys}) are supported by "
            "the bag modules (HashEmbeddingBagCollection), not by the sequence modules"
        )
    index = {k: i for i, k in enumerate(keys)}
    for t, feats in enumerate(table_features):
        for f, _ in feats:
            if f not in index:
                raise KeyError(
                    f"{who}: feature {f!r} (table {table_names[t]!r}) is missing from the KeyedJaggedTensor, "
                    f"whose keys are {list(keys)}"
                )
    checked_kjt(features, False, who, check_values=check_values)
    # TorchRec's split of the KJT by key (it keeps per-key sizes symbolic under torch.export).
    try:
        per_key = features.to_dict(compute_offsets=False)  # lengths only: no FBGEMM op on a GPU tensor
    except RuntimeError:
        explain_kjt(features, False, who)  # the error that names the feature
        raise
    out = []
    for feats in table_features:
        described = []
        for f, name in feats:
            jt = per_key[f]
            described.append((name, jt.lengths().to(torch.int64), jt.values().to(torch.int64)))
        ids = torch.cat([d[2] for d in described]) if len(described) > 1 else described[0][2]
        out.append(TableSequences(ids, described))
    return out


def jagged_outputs(
    rows: torch.Tensor, features: List[Tuple[str, torch.Tensor, torch.Tensor]], need_indices: bool
) -> Dict[str, JaggedTensor]:
    """One JaggedTensor per feature of a table (``TableSequences.features``) from the rows of
    its concatenated ids."""
    # One feature: its rows as they are. Several: split, whose backward concatenates the gradients
    # in one pass (a slice's backward would zero-fill a rows-sized buffer per slice).
    pieces = [rows] if len(features) == 1 else rows.split([ids.numel() for _, _, ids in features])
    return {
        name: JaggedTensor(values=piece, lengths=lengths, weights=ids if need_indices else None)
        for (name, lengths, ids), piece in zip(features, pieces)
    }


def shared_tables(
    configs: List[Any], owner: Optional[nn.Module], who: str
) -> Dict[str, Tuple[HashTable, HashFusedOptimizer]]:
    """The tables of ``configs`` that ``owner`` holds (same name), with the owner's fused optimizer;
    their dims must agree."""
    if owner is None:
        return {}
    if not hasattr(owner, "tables") or not isinstance(getattr(owner, "fused_optimizer", None), HashFusedOptimizer):
        raise TypeError(
            f"{who}: share_tables_with must be a hash-backed module (HashEmbeddingBagCollection, "
            f"HashEmbeddingCollection), got {type(owner).__name__}"
        )
    theirs = owner.tables()
    out = {}
    for c in configs:
        table = theirs.get(c.name)
        if table is None:
            continue
        if table.dim != c.embedding_dim:
            raise ValueError(
                f"{who}: table {c.name!r} has embedding_dim {c.embedding_dim} but the shared table of that name "
                f"has dim {table.dim}"
            )
        out[c.name] = (table, owner.fused_optimizer)
    return out


__all__ = ["HashEmbeddingCollection"]
