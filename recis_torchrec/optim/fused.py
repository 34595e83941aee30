# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Fused sparse optimizers: TorchRec ``fused_params`` in, a ``FusedOptimizer`` out.

The update runs inside backward (``recis::pooled_backward_update``); the
optimizer object only carries the hyper-parameters, read at every backward so
that changes made through ``param_groups`` (by hand or by an LR scheduler)
take effect on the next update, and exposes the state stored in the table rows
through ``state_dict()``.
"""

import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.optim.fused import FusedOptimizer

try:
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
except ImportError:  # older fbgemm_gpu
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode  # type: ignore

from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.ops.constants import WEIGHT_DECAY_MODES
from recis_torchrec.ops.update_args import UpdateArgs
from recis_torchrec.optim.registry import BY_EMB_OPTIM_TYPE, HYPERPARAMETERS, OPTIMIZERS, OptimizerDef
from recis_torchrec.tables.state_rows import Owner, RowShards, gather_counts, is_partial, put_rows

# C++ OptimType codes (csrc/hashtable/optimizers.h), read from the op library.
OPTIM_SGD, OPTIM_ADAGRAD, OPTIM_ROWWISE_ADAGRAD, OPTIM_ADAM = (
    OPTIMIZERS[k].code for k in ("sgd", "adagrad", "rowwise_adagrad", "adam")
)
_WD_MODES = {
    WeightDecayMode.NONE: WEIGHT_DECAY_MODES["none"],
    WeightDecayMode.L2: WEIGHT_DECAY_MODES["l2"],
    WeightDecayMode.DECOUPLE: WEIGHT_DECAY_MODES["decoupled"],
}

# State slots per optimizer code: (name, offset, width) in the row's state in units of dim
# (width None: one float per row), from each optimizer's declaration (optim/registry.py).
STATE_SLOTS = {d.code: d.slot_layout() for d in OPTIMIZERS.values()}


class _SparseOptimizerConfigMethods:
    """The checks and derived values of ``SparseOptimizerConfig`` (its fields come from the
    registry, below)."""

    def __post_init__(self) -> None:
        if self.optimizer not in BY_EMB_OPTIM_TYPE:
            supported = ", ".join(sorted(o.name for o in BY_EMB_OPTIM_TYPE))
            raise ValueError(f"fused_params['optimizer']={self.optimizer}: unsupported; supported: {supported}")
        if self.weight_decay_mode not in _WD_MODES:
            supported = ", ".join(m.name for m in _WD_MODES)
            raise ValueError(
                f"fused_params['weight_decay_mode']={self.weight_decay_mode!r}: unsupported; supported: {supported}"
            )
        for h in HYPERPARAMETERS.values():
            value = getattr(self, h.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"fused_params['{h.name}'] must be a number, got {type(value).__name__} {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"fused_params['{h.name}'] must be finite, got {value}")
            h.check(value)
        if (self.weight_decay != 0 and self.weight_decay_mode == WeightDecayMode.NONE
                and "weight_decay_mode" in self.definition.hyperparameters):
            # FBGEMM ignores weight_decay in this mode; a setting that does nothing is refused.
            raise ValueError(
                f"fused_params['weight_decay']={self.weight_decay} has no effect with weight_decay_mode NONE; "
                "set weight_decay_mode to WeightDecayMode.L2 or WeightDecayMode.DECOUPLE"
            )

    @property
    def code(self) -> int:
        return BY_EMB_OPTIM_TYPE[self.optimizer].code

    @property
    def definition(self) -> OptimizerDef:
        """The optimizer's declaration (state slots, hyperparameters)."""
        return BY_EMB_OPTIM_TYPE[self.optimizer]

    @property
    def weight_decay_code(self) -> int:
        return _WD_MODES[self.weight_decay_mode]

    def hyperparameter_values(self) -> Dict[str, float]:
        """Every hyperparameter by name (the ones this optimizer does not read at their defaults)."""
        return {name: float(getattr(self, name)) for name in HYPERPARAMETERS}

    def state_dim(self, dim: int) -> int:
        """Optimizer-state floats per row of a table of this dim."""
        return self.definition.state_dim(dim)


# One field per declared hyperparameter (optim/registry.py), with FBGEMM's default: a hyperparameter
# added there is a field here, checked as declared, without an edit to this file.
SparseOptimizerConfig = dataclasses.make_dataclass(
    "SparseOptimizerConfig",
    [("optimizer", EmbOptimType, dataclasses.field(default=EmbOptimType.EXACT_SGD))]
    + [(h.name, float, dataclasses.field(default=h.default)) for h in HYPERPARAMETERS.values()]
    + [("weight_decay_mode", WeightDecayMode, dataclasses.field(default=WeightDecayMode.NONE))],
    bases=(_SparseOptimizerConfigMethods,),
    frozen=True,
    namespace={"__module__": __name__},
)
SparseOptimizerConfig.__doc__ = """The optimizer a ``fused_params`` dict asks for (FBGEMM TBE defaults).

    Attributes:
        optimizer: an ``EmbOptimType`` the registry maps (``optim/registry.py``): SGD/EXACT_SGD,
            EXACT_ADAGRAD, (EXACT_)ROWWISE_ADAGRAD, ADAM, LAMB, LARS_SGD.
        learning_rate, eps, beta1, beta2, weight_decay, eta, momentum: as FBGEMM names them (one
            field per declared hyperparameter; each optimizer reads its own).
        weight_decay_mode: ``WeightDecayMode`` NONE, L2 or DECOUPLE. ADAM with DECOUPLE is AdamW.
            LAMB and LARS_SGD apply weight_decay themselves and read no mode.
    """


def parse_fused_params(fused_params: Optional[Mapping[str, Any]]) -> SparseOptimizerConfig:
    """Reads TorchRec-style ``fused_params``; unknown keys are an error."""
    if fused_params is None:
        return SparseOptimizerConfig()
    if isinstance(fused_params, SparseOptimizerConfig):
        return fused_params
    known = {f.name for f in dataclasses.fields(SparseOptimizerConfig)}
    unknown = sorted(set(fused_params) - known)
    if unknown:
        raise ValueError(f"fused_params: unsupported keys {unknown}; supported keys: {sorted(known)}")
    kwargs = dict(fused_params)
    if "optimizer" in kwargs and not isinstance(kwargs["optimizer"], EmbOptimType):
        text = str(kwargs["optimizer"])
        by_name = {o.name: o for o in EmbOptimType}
        try:  # an EmbOptimType's value ("exact_row_wise_adagrad") or its name ("EXACT_ROWWISE_ADAGRAD")
            kwargs["optimizer"] = by_name[text.upper()] if text.upper() in by_name else EmbOptimType(text.lower())
        except ValueError:
            raise ValueError(
                f"fused_params['optimizer']={kwargs['optimizer']!r} is not an EmbOptimType; "
                f"supported: {', '.join(sorted(o.name for o in BY_EMB_OPTIM_TYPE))}"
            ) from None
    if "weight_decay_mode" in kwargs and not isinstance(kwargs["weight_decay_mode"], WeightDecayMode):
        try:
            kwargs["weight_decay_mode"] = WeightDecayMode(kwargs["weight_decay_mode"])
        except ValueError:
            raise ValueError(
                f"fused_params['weight_decay_mode']={kwargs['weight_decay_mode']!r} is not a WeightDecayMode"
            ) from None
    for name in HYPERPARAMETERS:
        if name in kwargs:
            value = kwargs[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"fused_params['{name}'] must be a number, got {type(value).__name__} {value!r}")
            kwargs[name] = float(value)
    config = SparseOptimizerConfig(**kwargs)
    ignored = sorted(set(kwargs) - {"optimizer"} - set(config.definition.hyperparameters))
    if ignored:
        raise ValueError(
            f"fused_params {ignored} have no effect with optimizer {config.optimizer.name} (it reads "
            f"{list(config.definition.hyperparameters)}); remove them"
        )
    return config


class _TableStateSlot:
    """One optimizer-state slot of a table, seen as ``{"ids", "values"}``.

    KeyedOptimizer calls ``state_dict()``/``load_state_dict()`` on state
    entries that have them, so the slot exports from, and imports into, the
    table rows on demand instead of holding a copy. On a sharded table the two
    are this rank's shard of a global row group (``state_rows.py``), and loading
    keeps the ids this rank owns.
    """

    def __init__(self, table: HashTable, offset: int, width: Optional[int], optimizer: "HashFusedOptimizer") -> None:
        self.table = table
        self.offset = offset
        self.width = width  # None: one float per row
        self._optimizer = optimizer

    def _cols(self) -> slice:
        dim = self.table.dim
        if self.width is None:
            return slice(self.offset * dim, self.offset * dim + 1)
        return slice(self.offset * dim, (self.offset + self.width) * dim)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        ids, _, state = self.table.export()
        order = torch.argsort(ids)
        values = state[order][:, self._cols()]
        members = {"ids": ids[order], "values": values.squeeze(1) if self.width is None else values}
        out: Dict[str, torch.Tensor] = {}
        sharding = self._optimizer._sharding
        shards = None
        if sharding is not None:
            pg, owner, device, _ = sharding
            shards = RowShards(owner, tuple(gather_counts(pg, [ids.numel()], device)[0]))
        put_rows(out, None, members, shards)
        return out

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        ids = sd["ids"].to(torch.int64).cpu()
        values = sd["values"].to(torch.float32).cpu()
        if self.width is None:
            values = values.reshape(-1, 1)
        sharding = self._optimizer._sharding
        if sharding is not None:
            mask = sharding[3](ids)
            if is_partial(sd["ids"]) and not bool(mask.all()):
                raise ValueError(
                    f"table {self.table.name!r}: the optimizer state holds one rank's shard with rows this rank "
                    "does not own; load a torch.distributed.checkpoint with "
                    "planner=recis_torchrec.checkpoint.DCPLoadPlanner()"
                )
            ids, values = ids[mask], values[mask]
        # Rows already in the table keep their other slots.
        state = torch.zeros(ids.numel(), self.table.state_dim)
        cur_ids, _, cur_state = self.table.export()
        if cur_ids.numel() and ids.numel():
            order = torch.argsort(cur_ids)
            sorted_ids = cur_ids[order]
            pos = torch.searchsorted(sorted_ids, ids).clamp(max=sorted_ids.numel() - 1)
            hit = sorted_ids[pos] == ids
            state[hit] = cur_state[order[pos[hit]]]
        state[:, self._cols()] = values
        self.table.import_(ids, None, state)


class HashFusedOptimizer(FusedOptimizer):
    """The fused optimizer of a hash-backed embedding module, as TorchRec shapes it.

    ``params`` are keyed ``"{table}.weight"``; each table's state holds its
    slots (``"{table}.momentum1"``, ...) and its update count
    ``"{table}.step"``. Tables with the same optimizer config share a param
    group, which holds every hyperparameter (``lr``, ``eps``, ``beta1``, ...,
    ``optim/registry.py``); the next backward reads them.

    Args:
        tables: the tables by name.
        config: one optimizer config for every table, or one per table name.
    """

    def __init__(
        self,
        tables: Mapping[str, HashTable],
        config: Union[SparseOptimizerConfig, Mapping[str, SparseOptimizerConfig]],
    ) -> None:
        self._tables = dict(tables)
        self._sharding: Optional[Tuple[Any, Owner, torch.device, Callable[[torch.Tensor], torch.Tensor]]] = None
        if isinstance(config, SparseOptimizerConfig):
            self.configs: Dict[str, SparseOptimizerConfig] = {name: config for name in self._tables}
        else:
            self.configs = {name: config[name] for name in self._tables}
        self._steps: Dict[str, torch.Tensor] = {
            name: torch.zeros((), dtype=torch.int64, device="cpu") for name in self._tables
        }
        # Table rows are not tensors; each table is keyed by a 0-element
        # placeholder, as KeyedOptimizer needs a tensor per parameter key.
        params: Dict[str, torch.Tensor] = {}
        state: Dict[Any, Any] = {}
        groups: Dict[SparseOptimizerConfig, Dict[str, Any]] = {}
        self._group_of: Dict[str, int] = {}
        for name, table in self._tables.items():
            cfg = self.configs[name]
            placeholder = torch.empty(0, device="cpu")
            params[f"{name}.weight"] = placeholder
            slots: Dict[str, Any] = {
                f"{name}.{slot}": _TableStateSlot(table, offset, width, self)
                for slot, offset, width in STATE_SLOTS[cfg.code]
            }
            slots[f"{name}.step"] = self._steps[name]
            state[placeholder] = slots
            if cfg not in groups:
                groups[cfg] = {"params": [], **{h.key: getattr(cfg, h.name) for h in HYPERPARAMETERS.values()}}
            self._group_of[name] = list(groups).index(cfg)
            groups[cfg]["params"].append(placeholder)
        param_groups = list(groups.values()) or [{"params": [], **{h.key: h.default for h in HYPERPARAMETERS.values()}}]
        super().__init__(params, state, param_groups)

    def set_sharding(
        self, pg: Any, owner: Owner, device: torch.device, keep: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """The tables are one rank's shards: state dicts hold this rank's rows as shards of global
        row groups (collective), and loading keeps the ids ``keep`` selects."""
        self._sharding = (pg, owner, device, keep)

    @property
    def config(self) -> SparseOptimizerConfig:
        """The optimizer config, when every table has the same one."""
        distinct = set(self.configs.values())
        if len(distinct) != 1:
            raise ValueError(f"the tables have {len(distinct)} different optimizer configs; use config_of(table)")
        return next(iter(distinct))

    def config_of(self, table: str) -> SparseOptimizerConfig:
        return self.configs[table]

    @property
    def step_count(self) -> int:
        """The most updates any table has had (Adam's bias-correction step)."""
        return max((int(s.item()) for s in self._steps.values()), default=0)

    def steps(self) -> Dict[str, int]:
        """Updates applied so far, per table."""
        return {name: int(s.item()) for name, s in self._steps.items()}

    def next_update_args(self, table_names: Sequence[str]) -> UpdateArgs:
        """Counts one more update of the named tables and returns the update's hyperparameters
        (as the param group holds them now) and each table's update count."""
        groups = {self._group_of[name] for name in table_names}
        if len(groups) > 1:
            raise ValueError(f"tables {list(table_names)} do not share one optimizer config; they update apart")
        steps = []
        for name in table_names:
            self._steps[name] += 1
            steps.append(int(self._steps[name].item()))
        g = self.param_groups[groups.pop() if groups else 0]  # type: ignore[index]
        cfg = self.configs[table_names[0]] if table_names else SparseOptimizerConfig()
        return UpdateArgs(
            optimizer=cfg.code,
            values={h.name: float(g[h.key]) for h in HYPERPARAMETERS.values()},
            weight_decay_mode=cfg.weight_decay_code,
            steps=steps,
        )

    def param_group_of(self, table: str) -> Dict[str, Any]:
        """The param group holding ``table``'s hyperparameters (tables with one config share one)."""
        return self.param_groups[self._group_of[table]]

    def step(self, closure: Any = None) -> None:
        """A no-op: the update already ran in backward."""
        if closure is not None:
            closure()

    def zero_grad(self, set_to_none: bool = False) -> None:
        """A no-op: fused tables keep no gradients."""
