# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``ShardedHashEmbeddingBagCollection``: an EBC whose hash tables are sharded by id.

Every rank holds, for every hash table, the rows of the ids it owns
(``owner_of(id, world_size)``). ``input_dist`` sends each rank's ids to their
owners, deduplicated; ``compute`` looks them up (inserting new ones) and pools
the requesters' bags over the owned ids; ``output_dist`` returns the partial
pools, which the requester sums. Backward returns the pooled gradients to the
owners, whose fused optimizer updates the rows. See ``comm.py`` for the wire
format and the cost model.

Tables the plan gives to TorchRec's own sharding types live in a TorchRec
``ShardedEmbeddingBagCollection`` child, and both outputs are merged into one
``KeyedTensor`` in the original EBC's key order.
"""

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    ShardedModule,
    ShardingEnv,
)
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Multistreamable

from recis_torchrec import ops
from recis_torchrec.distributed.comm import GroupDistContext, IdsSplitsAwaitable, pooled_output_dist
from recis_torchrec.modules.device import module_device
from recis_torchrec.modules.hash_module import HashTablesMixin
from recis_torchrec.tables.options import OptionsArg, resolve_options
from recis_torchrec.tables.factory import make_table
from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.modules.kjt import (
    check_unique_keys,
    checked_kjt,
    expand_batch,
    expand_kjt,
    kjt_offsets,
    permute_keys,
    uniform_batch,
)
from recis_torchrec.tables.state_dict import import_rows
from recis_torchrec.modules.lookup import BagLayout, LookupGroup
from recis_torchrec.tables.state_rows import Owner
from recis_torchrec.optim.fused import HashFusedOptimizer
from recis_torchrec.optim.in_backward import in_backward_by_table, table_optimizers

# The sharding type (and compute kernel) of hash-sharded tables in a ShardingPlan.
HASH_SHARDING = "recis_hash"
# The compute kernel of a hash-sharded EmbeddingCollection table that is the
# hash-sharded EmbeddingBagCollection table of the same name (plan(..., share_tables=True)).
HASH_SHARED = "recis_hash_shared"

_POOLING = {PoolingType.SUM: ops.POOLING_SUM, PoolingType.MEAN: ops.POOLING_MEAN}


def shard_table(config, optimizer_config, options, world_size: int, device: torch.device):
    """One rank's shard of a hash table (its capacity hint is the config's share per rank)."""
    return make_table(config, optimizer_config, options, (config.num_embeddings + world_size - 1) // world_size, device)


def context_tensors(ctx: Any) -> List[torch.Tensor]:
    """Every tensor a per-step context holds: in its fields, nested lists, tuples, dicts and plain
    objects (the group and table contexts); the TorchRec child's context records its own."""
    out: List[torch.Tensor] = []
    seen = set()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif hasattr(x, "__dict__") and not isinstance(x, (type, Multistreamable)) and id(x) not in seen:
            seen.add(id(x))
            for v in vars(x).values():
                walk(v)

    for name, value in vars(ctx).items():
        if name != "torchrec_ctx":
            walk(value)
    return out


class HashContext(Multistreamable):
    """Per-step state a sharded hash module keeps from input dist to output dist: the TorchRec
    child's context, and the slots TorchRec's KJTListSplitsAwaitable reads."""

    def __init__(self) -> None:
        self.torchrec_ctx: Optional[Multistreamable] = None
        self.num_torchrec_inputs = 0
        # Read by TorchRec's KJTListSplitsAwaitable: the TorchRec child's
        # sharding contexts, then one empty slot per hash input.
        self.sharding_contexts: List[Any] = []

    def record_stream(self, stream: torch.Stream) -> None:
        """Tells the caching allocator that ``stream`` uses every tensor of this step.

        Under ``TrainPipelineSparseDist`` on CUDA the input dist runs on the data-dist stream and
        the lookup and output dist on the default stream; TorchRec calls this with the default
        stream, so a tensor made in input dist (mean scales, the sequence gather index, the
        received lengths) is not reused by the data-dist stream's next batch while the default
        stream still reads it. It walks every field, so a field added later is covered too.
        """
        if self.torchrec_ctx is not None:
            self.torchrec_ctx.record_stream(stream)
        for t in context_tensors(self):
            if t.is_cuda:
                t.record_stream(stream)

    def start_torchrec_input_dist(
        self, torchrec: Optional[ShardedModule], features: KeyedJaggedTensor, num_hash_inputs: int
    ) -> List[Any]:
        """Starts the TorchRec child's input dist (if any) and lays out the sharding contexts:
        the child's, then one empty slot per hash input. Returns the child's awaitables."""
        awaitables: List[Any] = []
        if torchrec is not None:
            self.torchrec_ctx = torchrec.create_context()
            request = torchrec.input_dist(self.torchrec_ctx, features)
            awaitables.extend(request.awaitables)
            self.num_torchrec_inputs = len(request.awaitables)
            self.sharding_contexts = list(getattr(self.torchrec_ctx, "sharding_contexts", []))
        self.sharding_contexts += [None] * num_hash_inputs
        return awaitables


class HashEBCContext(HashContext):
    """Per-step state of a sharded hash EBC."""

    def __init__(self, num_groups: int) -> None:
        super().__init__()
        self.groups = [GroupDistContext() for _ in range(num_groups)]
        self.local_batch = 0
        self.mean_scales: List[Optional[torch.Tensor]] = []
        self.inverse_indices: Optional[Tuple[List[str], torch.Tensor]] = None

    def bytes_sent(self) -> int:
        """Bytes this rank put on the wire for the hash groups' input dist."""
        return sum(g.bytes_sent for g in self.groups)


class ShardedTablesMixin(HashTablesMixin):
    """What the sharded hash modules add to the unsharded ones' table handling: each rank holds
    the rows of the ids it owns (``self._world_size``, ``self._rank``) as
    ``{section}.{table}.weight``/``.ids``; loading keeps only those ids, so a full (unsharded)
    state dict loads on every rank; the unsharded module's weights are imported the same way;
    the fused optimizer includes the TorchRec child's (``self.torchrec``), if any."""

    holds_a_shard = True

    def _row_filter(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda ids: ops.owner_of(ids, self._world_size) == self._rank

    def _state_sharding(self) -> Tuple[Any, Owner, torch.device]:
        return self._pg, Owner(self._world_size, self._rank), self._device

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        if self.torchrec is None:
            return self._optim
        # No prefix for the child: its keys ("embedding_bags.{table}.weight") are those of the unsharded
        # module, as its state dict's are.
        return CombinedOptimizer([("", self._optim), ("", self.torchrec.fused_optimizer)])

    # The TorchRec child's state sits at the unsharded module's keys ("embedding_bags.{table}.weight",
    # not "torchrec.embedding_bags..."), so a TorchRec state dict or checkpoint loads into a mixed
    # plan, and the mixed module's state dict is keyed as TorchRec's sharded EBC's would be.
    _CHILD = "torchrec."

    def _set_torchrec_child(self, child: Optional[ShardedModule]) -> None:
        self.torchrec = child
        if child is not None:
            self._register_state_dict_hook(ShardedTablesMixin._lift_child_keys)

    @staticmethod
    def _lift_child_keys(module, state_dict, prefix, local_metadata) -> None:
        inner = prefix + ShardedTablesMixin._CHILD
        for key in [k for k in state_dict if k.startswith(inner)]:
            state_dict[prefix + key[len(inner):]] = state_dict.pop(key)

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if getattr(self, "torchrec", None) is not None:
            # Hand the child its tables' keys (the loader passes this dict on to the children).
            child_tables = {c.name for c in self._torchrec_configs()}
            section = prefix + self._state_section + "."
            for key in [k for k in state_dict if k.startswith(section)]:
                if key[len(section):].split(".", 1)[0] in child_tables:
                    state_dict[prefix + self._CHILD + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _torchrec_configs(self) -> List[Any]:
        """The configs of the tables TorchRec shards (the module's tables that are not ours)."""
        configs = getattr(self, "_embedding_bag_configs", None) or getattr(self, "_embedding_configs")
        ours = {c.name for c in self._hash_configs}
        return [c for c in configs if c.name not in ours]

    def _import_unsharded_weights(self, module: torch.nn.Module) -> None:
        """Rows 0..num_embeddings-1 of the unsharded module's tables become ids, each on its owner."""
        unsharded = getattr(module, self._state_section, None)
        if unsharded is None:
            return
        weights = {name: getattr(unsharded[name], "weight", None) for name in self._tables}
        import_rows(self._tables, weights, keep=self._row_filter())


def checked_process_group(env: ShardingEnv, where: str) -> Tuple[dist.ProcessGroup, int, int]:
    """(process group, world size, rank) of a sharding env, checked against each other."""
    if env.process_group is None:
        raise ValueError(f"{where}: hash sharding needs a process group (ShardingEnv.from_process_group)")
    if dist.get_world_size(env.process_group) != env.world_size:
        raise ValueError(
            f"{where}: the sharding env says world size {env.world_size} "
            f"but the process group has {dist.get_world_size(env.process_group)} ranks"
        )
    return env.process_group, env.world_size, env.rank


@dataclass
class _Group:
    """Hash tables looked up, and communicated, together."""

    tables: List[EmbeddingBagConfig]
    keys: List[str]  # KJT keys, in group order (a feature read by 2 tables appears twice)
    names: List[str]  # embedding (output) names, one per key
    dims: List[int]
    # The owners pool every feature as a sum: a mean over a bag split across
    # owners is the sum of the owners' partial sums over the whole bag's
    # length, which only the requester knows. mean_keys are those features.
    layout: BagLayout
    mean_keys: List[int]
    lookup: LookupGroup

    def mean_scale(self, kjt: KeyedJaggedTensor) -> Optional[torch.Tensor]:
        """(B, out_dim) factors turning summed partial pools into means, or None."""
        if not self.mean_keys:
            return None
        batch = kjt.stride()
        lengths = kjt.lengths().view(len(self.keys), batch)
        scale = torch.ones(batch, self.layout.out_dim, device=lengths.device)
        for k in self.mean_keys:
            col, dim = self.layout.feature_col[k], self.dims[k]
            scale[:, col : col + dim] = (1.0 / lengths[k].clamp(min=1).to(torch.float32))[:, None]
        return scale


class _MergedAwaitable(LazyAwaitable[KeyedTensor]):
    """The output KeyedTensor: hash groups' pooled outputs and TorchRec's, in
    the original EBC's key order."""

    def __init__(
        self,
        pieces: List[torch.Tensor],
        torchrec_out: Optional[Awaitable[KeyedTensor]],
        columns: List[Tuple[int, int, int]],
        keys: List[str],
        dims: List[int],
    ) -> None:
        super().__init__()
        self._pieces = pieces
        self._torchrec_out = torchrec_out
        self._columns = columns  # per output: (piece index, first column, dim)
        self._keys = keys
        self._dims = dims

    def _wait_impl(self) -> KeyedTensor:
        pieces = list(self._pieces)
        if self._torchrec_out is not None:
            pieces.append(self._torchrec_out.wait().values())
        if len(pieces) == 1 and [c[1] for c in self._columns] == list(itertools.accumulate([0] + self._dims[:-1])):
            values = pieces[0]
        else:
            slices, run = [], None
            for piece, col, dim in self._columns:
                if run is not None and run[0] == piece and run[2] == col:
                    run = (piece, run[1], col + dim)
                else:
                    if run is not None:
                        slices.append(pieces[run[0]][:, run[1] : run[2]])
                    run = (piece, col, col + dim)
            if run is not None:
                slices.append(pieces[run[0]][:, run[1] : run[2]])
            values = torch.cat(slices, dim=1) if slices else pieces[0][:, :0]
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=values)


class ShardedHashEmbeddingBagCollection(
    ShardedTablesMixin,
    ShardedModule[KJTList, Tuple[Any, List[torch.Tensor]], KeyedTensor, HashEBCContext],
    FusedOptimizerModule,
):
    """The sharded form of a ``torchrec.EmbeddingBagCollection`` whose tables
    (all or some) the plan puts on :data:`HASH_SHARDING`.

    Args:
        module: the unsharded EBC. If its weights are materialised, each rank
            imports the rows of the ids ``0..num_embeddings-1`` it owns, as
            ``rt.convert`` does.
        hash_params: the plan entries of the hash-sharded tables.
        env: the sharding environment (process group).
        fused_params: TorchRec-style sparse optimizer parameters.
        options: ``HashTableOptions`` for all tables or by table name.
        merge_tables: look up and communicate the features of tables that
            share dim and options together (one all-to-all round per group);
            with False, one round per table.
        torchrec_child: TorchRec's sharded module for the other tables, if any.
        module_fqn: the module's path in the model, for messages.
        device: ``None``/CPU (gloo), or a CUDA device: CUDA tables, and the
            all-to-alls on device tensors (NCCL).
    """

    def __init__(
        self,
        module: EmbeddingBagCollection,
        hash_params: Mapping[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: Optional[Dict[str, Any]] = None,
        options: OptionsArg = None,
        merge_tables: bool = True,
        torchrec_child: Optional[ShardedModule] = None,
        module_fqn: Optional[str] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self._device = module_device(device, module_fqn or "EmbeddingBagCollection")
        self._fqn = module_fqn or "EmbeddingBagCollection"
        self._pg, self._world_size, self._rank = checked_process_group(env, self._fqn)
        self._is_weighted = module.is_weighted()
        configs = module.embedding_bag_configs()
        self._embedding_bag_configs = configs
        self._hash_configs = [c for c in configs if c.name in hash_params]
        hash_names = [c.name for c in self._hash_configs]
        in_backward = in_backward_by_table(module, "embedding_bags", self._fqn)
        self._optimizer_configs = table_optimizers(
            hash_names, fused_params, {n: p for n, p in in_backward.items() if n in hash_names}, self._fqn
        )
        per_table_options = resolve_options(self._hash_configs, options, strict=False)
        self._tables: Dict[str, HashTable] = {
            c.name: shard_table(
                c, self._optimizer_configs[c.name], per_table_options[c.name], self._world_size, self._device
            )
            for c in self._hash_configs
        }
        self._optim = HashFusedOptimizer(self._tables, self._optimizer_configs)
        self._optim.set_sharding(*self._state_sharding(), self._row_filter())
        self._set_torchrec_child(torchrec_child)

        # Output names and dims in the original order, as TorchRec's EBC has them.
        all_names = get_embedding_names_by_table(configs)
        self._embedding_names = [n for names in all_names for n in names]
        self._embedding_dims = [c.embedding_dim for c in configs for _ in c.feature_names]
        name_of = {(c.name, f): n for c, names in zip(configs, all_names) for f, n in zip(c.feature_names, names)}

        self._groups = self._make_groups(per_table_options, merge_tables, name_of)
        self._torchrec_names = [
            name_of[(c.name, f)] for c in configs if c.name not in hash_params for f in c.feature_names
        ]
        # Where each output column block comes from: (piece, first column, dim),
        # piece g < len(groups) is group g, the last piece is TorchRec's output.
        where: Dict[str, Tuple[int, int, int]] = {}
        for g, group in enumerate(self._groups):
            for name, col, dim in zip(group.names, group.layout.feature_col, group.dims):
                where[name] = (g, col, dim)
        col = 0
        for name in self._torchrec_names:
            dim = self._embedding_dims[self._embedding_names.index(name)]
            where[name] = (len(self._groups), col, dim)
            col += dim
        self._columns = [where[n] for n in self._embedding_names]
        self._permutes: Dict[Tuple[str, ...], Tuple[List[int], List[int]]] = {}

        self._import_unsharded_weights(module)

    def _make_groups(self, per_table_options, merge_tables: bool, name_of) -> List[_Group]:
        buckets: Dict[Any, List[EmbeddingBagConfig]] = {}
        for c in self._hash_configs:
            # Tables with different optimizers update apart, so they never share a group.
            key = (c.embedding_dim, per_table_options[c.name], self._optimizer_configs[c.name]) if merge_tables else c.name
            buckets.setdefault(key, []).append(c)
        groups = []
        for tables in buckets.values():
            keys, names, dims, ft, modes, cols = [], [], [], [], [], []
            col = 0
            for t, c in enumerate(tables):
                for f in c.feature_names:
                    keys.append(f)
                    names.append(name_of[(c.name, f)])
                    dims.append(c.embedding_dim)
                    ft.append(t)
                    modes.append(_POOLING[c.pooling])
                    cols.append(col)
                    col += c.embedding_dim
            lookup = LookupGroup([self._tables[c.name] for c in tables], self._optim)
            mean_keys = [k for k, m in enumerate(modes) if m == ops.POOLING_MEAN]
            sum_modes = [ops.POOLING_SUM] * len(modes)
            groups.append(_Group(tables, keys, names, dims, BagLayout(ft, sum_modes, cols, col), mean_keys, lookup))
        return groups

    # -- TorchRec interface ----------------------------------------------------

    @property
    def unsharded_module_type(self) -> type:
        return EmbeddingBagCollection

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def create_context(self) -> HashEBCContext:
        return HashEBCContext(len(self._groups))

    # -- input dist ------------------------------------------------------------

    def _group_permute(self, keys: List[str]) -> Tuple[List[int], List[int]]:
        cache_key = tuple(keys)
        cached = self._permutes.get(cache_key)
        if cached is not None:
            return cached
        index = {k: i for i, k in enumerate(keys)}
        permute, sizes = [], []
        for group in self._groups:
            for t, k in zip(group.layout.feature_table, group.keys):
                if k not in index:
                    raise KeyError(
                        f"{self._fqn}: feature {k!r} (table {group.tables[t].name!r}) is missing from the "
                        f"KeyedJaggedTensor, whose keys are {keys}"
                    )
                permute.append(index[k])
            sizes.append(len(group.keys))
        self._permutes[cache_key] = (permute, sizes)
        return permute, sizes

    def input_dist(self, ctx: HashEBCContext, features: KeyedJaggedTensor) -> KJTListSplitsAwaitable:
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"{self._fqn} expects a KeyedJaggedTensor, got {type(features).__name__}")
        check_unique_keys(features, self._fqn)
        # A variable batch per feature (VBE): for the hash tables every feature is padded to the
        # largest batch here, and expanded to the output batch by the inverse indices after the
        # output dist; TorchRec's child gets the KJT expanded to the output batch.
        vbe = features.variable_stride_per_key()
        hash_features, ctx.inverse_indices = uniform_batch(features, self._fqn)
        child_features = expand_kjt(features) if vbe and self.torchrec is not None else features
        awaitables = ctx.start_torchrec_input_dist(self.torchrec, child_features, len(self._groups))
        features = hash_features
        if features.values().device.type != self._device.type:
            raise ValueError(
                f"{self._fqn} is sharded on {self._device} but the KeyedJaggedTensor of features "
                f"{features.keys()} is on {features.values().device}"
            )
        weights = features.weights_or_none() if self._is_weighted else None
        if weights is not None and weights.requires_grad:
            raise NotImplementedError(
                f"{self._fqn}: per-sample weights that require grad (a feature processor's) are not supported by "
                "hash sharding yet: their gradient would be dropped; use the unsharded module "
                "(rt.convert) or weights that do not require grad"
            )
        with torch.no_grad():
            permute, sizes = self._group_permute(features.keys())
            ours = permute_keys(features, permute)
            values, offsets, weights, batch = checked_kjt(ours, self._is_weighted, self._fqn)
            ctx.local_batch = batch
            ours = KeyedJaggedTensor(
                keys=ours.keys(), values=values, lengths=ours.lengths(), offsets=offsets, weights=weights, stride=batch
            )
            for g, kjt in enumerate(ours.split(sizes)):
                ctx.mean_scales.append(self._groups[g].mean_scale(kjt))
                awaitables.append(IdsSplitsAwaitable(kjt, self._pg, ctx.groups[g]))
        return KJTListSplitsAwaitable(awaitables, ctx, self._fqn)

    # -- compute and output dist -------------------------------------------------

    def compute(self, ctx: HashEBCContext, dist_input: KJTList) -> Tuple[Any, List[torch.Tensor]]:
        torchrec_out = None
        n = ctx.num_torchrec_inputs
        if self.torchrec is not None:
            torchrec_out = self.torchrec.compute(ctx.torchrec_ctx, KJTList(list(dist_input)[:n]))
        pooled = []
        for g, group in enumerate(self._groups):
            kjt = dist_input[n + g]
            weights = kjt.weights_or_none() if self._is_weighted else None
            pooled.append(group.lookup(kjt.values(), kjt_offsets(kjt), weights, group.layout, self.training))
        return torchrec_out, pooled

    def output_dist(self, ctx: HashEBCContext, output: Tuple[Any, List[torch.Tensor]]) -> LazyAwaitable[KeyedTensor]:
        torchrec_out, pooled = output
        pieces = []
        for g, p in enumerate(pooled):
            piece = pooled_output_dist(p, self._pg, ctx.groups[g], ctx.local_batch)
            scale = ctx.mean_scales[g]
            piece = piece if scale is None else piece * scale
            if ctx.inverse_indices is not None:
                group = self._groups[g]
                piece = expand_batch(
                    piece, list(zip(group.names, group.layout.feature_col, group.dims)), ctx.inverse_indices
                )
            pieces.append(piece)
        torchrec_awaitable = (
            self.torchrec.output_dist(ctx.torchrec_ctx, torchrec_out) if self.torchrec is not None else None
        )
        return _MergedAwaitable(pieces, torchrec_awaitable, self._columns, self._embedding_names, self._embedding_dims)


__all__ = [
    "HASH_SHARDING",
    "HASH_SHARED",
    "HashContext",
    "HashEBCContext",
    "ShardedTablesMixin",
    "ShardedHashEmbeddingBagCollection",
    "checked_process_group",
    "shard_table",
]
