# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``ShardedHashEmbeddingCollection``: an ``EmbeddingCollection`` whose hash tables are sharded by id.

Every rank holds, for every hash table, the rows of the ids it owns
(``owner_of(id, world_size)``, as for the bag module, so a table shared with
an ``EmbeddingBagCollection`` lives on the same ranks). Per step and table:

- input dist: the values of the table's features are deduplicated per owner
  and each owner gets this rank's distinct ids (``UniqueIdsAwaitable``);
- compute: the owner looks the ids up (inserting new ones in training);
- output dist: the owner returns one row per id, and the requester expands
  them to its values (``sequence_output_dist``) and splits them into one
  ``JaggedTensor`` per feature, with the input's lengths.

Backward sums the gradients of repeated ids on the requester, sends one
gradient row per distinct id back (divided by the world size under TorchRec's
gradient division, as its sequence all-to-all does), and the owner applies
the fused optimizer to each row once.

Tables the plan gives to TorchRec's own sharding types live in a TorchRec
``ShardedEmbeddingCollection`` child; both outputs are merged into one dict in
the original EC's order.
"""

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.types import Awaitable, LazyAwaitable, ParameterSharding, ShardedModule, ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection, get_embedding_names_by_table
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recis_torchrec.modules.kjt import check_unique_keys
from recis_torchrec.distributed.comm import SeqDistContext, UniqueIdsAwaitable, sequence_output_dist
from recis_torchrec.distributed.embeddingbag import (
    HashContext,
    ShardedTablesMixin,
    checked_process_group,
    shard_table,
)
from recis_torchrec.modules.device import module_device
from recis_torchrec.tables.options import OptionsArg, resolve_options
from recis_torchrec.modules.hash_embedding_collection import jagged_outputs, sequences_by_table
from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.modules.lookup import LookupGroup, sequence_lookup
from recis_torchrec.optim.fused import HashFusedOptimizer, parse_fused_params
from recis_torchrec.optim.in_backward import in_backward_by_table, merge_fused_params, table_optimizers

# Looks up a table shared with another module: name -> (table, its fused optimizer), or None.
SharedTableLookup = Callable[[str], Optional[Tuple[HashTable, HashFusedOptimizer]]]


class HashECContext(HashContext):
    """Per-step state of a sharded hash EC."""

    def __init__(self, num_tables: int) -> None:
        super().__init__()
        self.tables = [SeqDistContext() for _ in range(num_tables)]
        # Per hash table: (embedding name, lengths, ids) of each of its features.
        self.features: List[List[Tuple[str, torch.Tensor, torch.Tensor]]] = []

    def bytes_sent(self) -> int:
        """Bytes this rank put on the wire for the hash tables' input dist."""
        return sum(t.bytes_sent for t in self.tables)


class _MergedAwaitable(LazyAwaitable[Dict[str, JaggedTensor]]):
    """The output dict: hash tables' JaggedTensors and TorchRec's, in the original EC's order."""

    def __init__(
        self,
        ours: Dict[str, JaggedTensor],
        torchrec_out: Optional[Awaitable[Dict[str, JaggedTensor]]],
        order: List[str],
    ) -> None:
        super().__init__()
        self._ours = ours
        self._torchrec_out = torchrec_out
        self._order = order

    def _wait_impl(self) -> Dict[str, JaggedTensor]:
        if self._torchrec_out is None:
            return self._ours
        theirs = self._torchrec_out.wait()
        return {n: self._ours[n] if n in self._ours else theirs[n] for n in self._order}


class ShardedHashEmbeddingCollection(
    ShardedTablesMixin,
    ShardedModule[KJTList, Tuple[Any, List[torch.Tensor]], Dict[str, JaggedTensor], HashECContext],
    FusedOptimizerModule,
):
    """The sharded form of a ``torchrec.EmbeddingCollection`` whose tables (all or
    some) the plan puts on hash sharding.

    Args:
        module: the unsharded EC. If its weights are materialised, each rank
            imports the rows of the ids ``0..num_embeddings-1`` it owns.
        hash_params: the plan entries of the hash-sharded tables.
        env: the sharding environment (process group).
        fused_params: TorchRec-style sparse optimizer parameters.
        options: ``HashTableOptions`` for all tables or by table name.
        torchrec_child: TorchRec's sharded module for the other tables, if any.
        module_fqn: the module's path in the model, for messages.
        shared: tables this module takes from a hash-sharded
            ``EmbeddingBagCollection`` (same name), resolved on the first
            forward, when every module of the model has been sharded; the
            bag module owns, saves and updates them.
        shared_names: the names ``shared`` is asked for.
        device: ``None``/CPU (gloo), or a CUDA device (CUDA tables, NCCL).
    """

    # This rank's rows of each table it owns appear as "embeddings.{table}.weight" and ".ids".
    _state_section = "embeddings"

    def __init__(
        self,
        module: EmbeddingCollection,
        hash_params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: Optional[Dict[str, Any]] = None,
        options: OptionsArg = None,
        torchrec_child: Optional[ShardedModule] = None,
        module_fqn: Optional[str] = None,
        shared: Optional[SharedTableLookup] = None,
        shared_names: Tuple[str, ...] = (),
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self._fqn = module_fqn or "EmbeddingCollection"
        self._device = module_device(device, self._fqn)
        self._pg, self._world_size, self._rank = checked_process_group(env, self._fqn)
        configs = module.embedding_configs()
        self._embedding_configs = configs
        self._need_indices = module.need_indices()
        self._embedding_dim = module.embedding_dim()
        self._hash_configs = [c for c in configs if c.name in hash_params]
        self._shared = shared
        self._shared_names = set(shared_names) & {c.name for c in self._hash_configs}
        own = [c for c in self._hash_configs if c.name not in self._shared_names]
        in_backward = in_backward_by_table(module, "embeddings", self._fqn)
        # A shared table's optimizer is its owner's; one set here must be the same (checked on first use).
        self._shared_optimizers = {
            n: parse_fused_params(merge_fused_params(fused_params, p, f"{self._fqn} table {n!r}"))
            for n, p in in_backward.items()
            if n in self._shared_names
        }
        self._optimizer_configs = table_optimizers(
            [c.name for c in own], fused_params, {n: p for n, p in in_backward.items() if n in {c.name for c in own}},
            self._fqn,
        )
        per_table_options = resolve_options(self._hash_configs, options, strict=False)
        self._tables: Dict[str, HashTable] = {
            c.name: shard_table(
                c, self._optimizer_configs[c.name], per_table_options[c.name], self._world_size, self._device
            )
            for c in own
        }
        self._optim = HashFusedOptimizer(self._tables, self._optimizer_configs)
        self._optim.set_sharding(*self._state_sharding(), self._row_filter())
        # One lookup group per hash table, in config order; shared ones are filled in on first use.
        self._groups: List[Optional[LookupGroup]] = [
            None if c.name in self._shared_names else LookupGroup([self._tables[c.name]], self._optim)
            for c in self._hash_configs
        ]
        self._set_torchrec_child(torchrec_child)

        names_by_table = get_embedding_names_by_table(configs)
        self._embedding_names = [n for names in names_by_table for n in names]
        hash_names = set(hash_params)
        self._table_features: List[List[Tuple[str, str]]] = [
            list(zip(c.feature_names, names)) for c, names in zip(configs, names_by_table) if c.name in hash_names
        ]
        self._import_unsharded_weights(module)

    def _resolve_shared(self) -> None:
        for t, c in enumerate(self._hash_configs):
            if self._groups[t] is not None:
                continue
            found = self._shared(c.name) if self._shared is not None else None
            if found is None:
                raise ValueError(
                    f"{self._fqn}: table {c.name!r} is to be shared with an EmbeddingBagCollection, but no "
                    "hash-sharded EmbeddingBagCollection of this model has a table of that name"
                )
            table, optim = found
            wanted = self._shared_optimizers.get(c.name)
            if wanted is not None and wanted != optim.config_of(c.name):
                raise ValueError(
                    f"{self._fqn}: table {c.name!r} is shared with an EmbeddingBagCollection whose optimizer is "
                    f"{optim.config_of(c.name)}, but apply_optimizer_in_backward here asks for {wanted}"
                )
            if table.dim != c.embedding_dim:
                raise ValueError(
                    f"{self._fqn}: table {c.name!r} has embedding_dim {c.embedding_dim} but the shared table of "
                    f"that name has dim {table.dim}"
                )
            if getattr(table, "device", torch.device("cpu")).type != self._device.type:
                raise ValueError(
                    f"{self._fqn}: table {c.name!r} is shared with an EmbeddingBagCollection sharded on another "
                    f"device ({getattr(table, 'device', 'cpu')}); this module is on {self._device}"
                )
            self._groups[t] = LookupGroup([table], optim)

    # -- TorchRec interface ----------------------------------------------------

    @property
    def unsharded_module_type(self) -> type:
        return EmbeddingCollection

    def embedding_configs(self) -> List[EmbeddingConfig]:
        return self._embedding_configs

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        return self._embedding_dim

    def create_context(self) -> HashECContext:
        return HashECContext(len(self._hash_configs))

    # -- input dist ------------------------------------------------------------

    def input_dist(self, ctx: HashECContext, features: KeyedJaggedTensor) -> KJTListSplitsAwaitable:
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"{self._fqn} expects a KeyedJaggedTensor, got {type(features).__name__}")
        check_unique_keys(features, self._fqn)
        if self._groups and any(g is None for g in self._groups):
            self._resolve_shared()
        awaitables = ctx.start_torchrec_input_dist(self.torchrec, features, len(self._hash_configs))
        if features.values().device.type != self._device.type:
            raise ValueError(
                f"{self._fqn} is sharded on {self._device} but the KeyedJaggedTensor of features "
                f"{features.keys()} is on {features.values().device}"
            )
        table_names = [c.name for c in self._hash_configs]
        with torch.no_grad():
            for t, seq in enumerate(sequences_by_table(features, table_names, self._table_features, self._fqn)):
                ctx.features.append(seq.features)
                awaitables.append(UniqueIdsAwaitable(seq.ids, table_names[t], self._pg, ctx.tables[t]))
        return KJTListSplitsAwaitable(awaitables, ctx, self._fqn)

    # -- compute and output dist -------------------------------------------------

    def compute(self, ctx: HashECContext, dist_input: KJTList) -> Tuple[Any, List[torch.Tensor]]:
        torchrec_out = None
        n = ctx.num_torchrec_inputs
        if self.torchrec is not None:
            torchrec_out = self.torchrec.compute(ctx.torchrec_ctx, KJTList(list(dist_input)[:n]))
        rows = [sequence_lookup(group, dist_input[n + t].values(), self.training) for t, group in enumerate(self._groups)]
        return torchrec_out, rows

    def output_dist(
        self, ctx: HashECContext, output: Tuple[Any, List[torch.Tensor]]
    ) -> LazyAwaitable[Dict[str, JaggedTensor]]:
        torchrec_out, rows = output
        ours: Dict[str, JaggedTensor] = {}
        for t, r in enumerate(rows):
            embeddings = sequence_output_dist(r, self._pg, ctx.tables[t])
            ours.update(jagged_outputs(embeddings, ctx.features[t], self._need_indices))
        torchrec_awaitable = (
            self.torchrec.output_dist(ctx.torchrec_ctx, torchrec_out) if self.torchrec is not None else None
        )
        return _MergedAwaitable(ours, torchrec_awaitable, self._embedding_names)


__all__ = ["HashECContext", "ShardedHashEmbeddingCollection"]
