# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The fused optimizers, each declared once on the Python side: its name (its C++ code is read from
the op library), the ``EmbOptimType`` values that select it, its state slots and their widths, the
hyperparameters it reads, and the torch / TorchRec optimizer classes that
``apply_optimizer_in_backward`` maps onto it. Its update is one function shared by the CPU and CUDA
kernels (``csrc/hashtable/optimizers.h``).

Adding an optimizer: an entry in ``RECIS_OPTIMIZERS``, its update struct and its ``dispatch_optimizer``
case in ``optimizers.h``, and an ``OptimizerDef`` here (see the README's "Contributing"). A new
hyperparameter: an entry in ``RECIS_HYPERPARAMETERS`` (``optimizers.h``) and a ``Hyperparameter``
here; ``fused_params``, the config, the param groups, checkpoints and the ops read it from these.
"""

import importlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from fbgemm_gpu.split_embedding_configs import EmbOptimType

from recis_torchrec.ops.constants import HYPERPARAMETERS as HYPERPARAMETER_ORDER
from recis_torchrec.ops.constants import OPTIMIZERS as CODES


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter: its ``fused_params`` name, FBGEMM's TBE default, the values it takes
    (``">= 0"``, ``"> 0"`` or ``"[0, 1)"``), and its key in the optimizer's param groups (TorchRec's
    fused optimizers name the learning rate ``lr`` there)."""

    name: str
    default: float
    domain: str
    group_key: str = ""

    @property
    def key(self) -> str:
        return self.group_key or self.name

    def check(self, value: float) -> None:
        ok = {">= 0": value >= 0, "> 0": value > 0, "[0, 1)": 0.0 <= value < 1.0}[self.domain]
        if not ok:
            raise ValueError(f"fused_params['{self.name}'] must be {self.domain.replace('[', 'in [')}, got {value}")


HYPERPARAMETERS: Dict[str, Hyperparameter] = {
    h.name: h
    for h in (
        Hyperparameter("learning_rate", 0.01, ">= 0", group_key="lr"),
        Hyperparameter("eps", 1.0e-8, "> 0"),
        Hyperparameter("beta1", 0.9, "[0, 1)"),
        Hyperparameter("beta2", 0.999, "[0, 1)"),
        Hyperparameter("weight_decay", 0.0, ">= 0"),
        Hyperparameter("eta", 0.001, "> 0"),
        Hyperparameter("momentum", 0.9, "[0, 1)"),
    )
}
assert set(HYPERPARAMETERS) == set(HYPERPARAMETER_ORDER), (
    f"optim/registry.py and csrc/hashtable/optimizers.h disagree on the hyperparameters: {HYPERPARAMETER_ORDER}"
)


@dataclass(frozen=True)
class Slot:
    """One optimizer-state slot of a row: ``dim`` floats (``per_element``) or one float per row."""

    name: str
    per_element: bool = True


@dataclass(frozen=True)
class OptimizerDef:
    """One fused optimizer.

    Attributes:
        name: the C++ name (``RECIS_OPTIMIZERS``); ``code`` is its C++ code.
        emb_optim_types: the ``fused_params["optimizer"]`` values that select it.
        slots: its state, in row order, named as TorchRec names FBGEMM's (the first is "momentum1").
        hyperparameters: the ``fused_params`` keys its update reads (besides ``optimizer``).
        optimizer_classes: dotted names of the classes ``apply_optimizer_in_backward`` maps onto it.
    """

    name: str
    emb_optim_types: Tuple[EmbOptimType, ...]
    slots: Tuple[Slot, ...]
    hyperparameters: Tuple[str, ...]
    optimizer_classes: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [h for h in self.hyperparameters if h not in HYPERPARAMETERS and h != "weight_decay_mode"]
        if unknown:
            raise ValueError(f"optimizer {self.name!r} reads undeclared hyperparameters {unknown}")

    @property
    def code(self) -> int:
        return CODES[self.name]

    def state_dim(self, dim: int) -> int:
        """Optimizer-state floats per row of a table of this dim."""
        return sum(dim if s.per_element else 1 for s in self.slots)

    def slot_layout(self) -> List[Tuple[str, int, Optional[int]]]:
        """``(name, offset, width)`` per slot, in units of dim (width None: one float per row)."""
        out, offset = [], 0
        for s in self.slots:
            out.append((s.name, offset, 1 if s.per_element else None))
            offset += 1
        return out


_DECAY = ("weight_decay", "weight_decay_mode")
OPTIMIZERS: Dict[str, OptimizerDef] = {
    d.name: d
    for d in (
        OptimizerDef(
            "sgd", (EmbOptimType.EXACT_SGD, EmbOptimType.SGD), (), ("learning_rate",) + _DECAY,
            ("torch.optim.SGD", "torchrec.optim.optimizers.SGD"),
        ),
        OptimizerDef(
            "adagrad", (EmbOptimType.EXACT_ADAGRAD,), (Slot("momentum1"),), ("learning_rate", "eps") + _DECAY,
            ("torch.optim.Adagrad", "torchrec.optim.optimizers.Adagrad"),
        ),
        OptimizerDef(
            "rowwise_adagrad", (EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.ROWWISE_ADAGRAD),
            (Slot("momentum1", per_element=False),), ("learning_rate", "eps") + _DECAY,
            ("torchrec.optim.rowwise_adagrad.RowWiseAdagrad",),
        ),
        OptimizerDef(
            "adam", (EmbOptimType.ADAM,), (Slot("momentum1"), Slot("exp_avg_sq")),
            ("learning_rate", "eps", "beta1", "beta2") + _DECAY,
            # AdamW is Adam with decoupled weight decay (in_backward.py sets the mode and torch's default).
            ("torch.optim.Adam", "torch.optim.AdamW", "torchrec.optim.optimizers.Adam"),
        ),
        OptimizerDef(
            # FBGEMM's LARS_SGD: it applies weight_decay itself (weight_decay_mode is not read).
            "lars_sgd", (EmbOptimType.LARS_SGD,), (Slot("momentum1"),),
            ("learning_rate", "eta", "momentum", "weight_decay"), ("torchrec.optim.optimizers.LarsSGD",),
        ),
        OptimizerDef(
            # FBGEMM's LAMB: it applies weight_decay itself (weight_decay_mode is not read).
            "lamb", (EmbOptimType.LAMB,), (Slot("momentum1"), Slot("exp_avg_sq")),
            ("learning_rate", "eps", "beta1", "beta2", "weight_decay"), ("torchrec.optim.optimizers.LAMB",),
        ),
        OptimizerDef(
            # FBGEMM's PARTIAL_ROWWISE_ADAM: the second moment one float per row; weight_decay always applied.
            "partial_rowwise_adam", (EmbOptimType.PARTIAL_ROWWISE_ADAM,),
            (Slot("momentum1"), Slot("momentum2", per_element=False)),
            ("learning_rate", "eps", "beta1", "beta2", "weight_decay"), ("torchrec.optim.optimizers.PartialRowWiseAdam",),
        ),
        OptimizerDef(
            # FBGEMM's PARTIAL_ROWWISE_LAMB: LAMB with the second moment one float per row.
            "partial_rowwise_lamb", (EmbOptimType.PARTIAL_ROWWISE_LAMB,),
            (Slot("momentum1"), Slot("momentum2", per_element=False)),
            ("learning_rate", "eps", "beta1", "beta2", "weight_decay"), ("torchrec.optim.optimizers.PartialRowWiseLAMB",),
        ),
    )
}
assert set(OPTIMIZERS) == set(CODES), f"optim/registry.py and csrc/hashtable/optimizers.h disagree: {set(CODES)}"

BY_EMB_OPTIM_TYPE: Dict[EmbOptimType, OptimizerDef] = {t: d for d in OPTIMIZERS.values() for t in d.emb_optim_types}
BY_CODE: Dict[int, OptimizerDef] = {d.code: d for d in OPTIMIZERS.values()}


def optimizer_classes() -> Dict[type, OptimizerDef]:
    """The torch / TorchRec optimizer classes that map onto each fused optimizer."""
    out = {}
    for d in OPTIMIZERS.values():
        for dotted in d.optimizer_classes:
            module, _, name = dotted.rpartition(".")
            out[getattr(importlib.import_module(module), name)] = d
    return out


__all__ = ["BY_CODE", "BY_EMB_OPTIM_TYPE", "HYPERPARAMETERS", "Hyperparameter", "OPTIMIZERS", "OptimizerDef", "Slot",
           "optimizer_classes"]
