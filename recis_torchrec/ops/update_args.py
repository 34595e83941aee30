# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The typed arguments of a fused sparse update (C++ ``OptimParams``)."""

from dataclasses import dataclass
from typing import List, Mapping, Tuple

from recis_torchrec.ops.constants import HYPERPARAMETERS


@dataclass(frozen=True)
class UpdateArgs:
    """One fused update's optimizer (its C++ ``OptimType`` code), every hyperparameter by its
    ``fused_params`` name (``ops.constants.HYPERPARAMETERS``: all of them, read or not), the C++
    ``WeightDecayMode`` code and each table's update count, this update included (bias correction)."""

    optimizer: int
    values: Mapping[str, float]
    weight_decay_mode: int
    steps: List[int]

    def __post_init__(self) -> None:
        missing = [n for n in HYPERPARAMETERS if n not in self.values]
        unknown = sorted(set(self.values) - set(HYPERPARAMETERS))
        if missing or unknown:
            raise ValueError(f"UpdateArgs: hyperparameters {list(HYPERPARAMETERS)} are each given once; "
                             f"missing {missing}, unknown {unknown}")

    def hyperparameters(self) -> Tuple[int, List[float], int]:
        """The ops' optimizer arguments, in their schema's order (before the step counts)."""
        return self.optimizer, [float(self.values[n]) for n in HYPERPARAMETERS], self.weight_decay_mode
