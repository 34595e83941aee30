# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The typed arguments of a fused sparse update (C++ ``OptimParams``)."""

from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class UpdateArgs:
    """One fused update's hyperparameters (C++ ``OptimParams``) and each table's update count."""

    optimizer: int  # the C++ OptimType code
    learning_rate: float
    eps: float
    beta1: float
    beta2: float
    weight_decay: float
    weight_decay_mode: int  # the C++ WeightDecayMode code
    steps: List[int]  # per table: its update count, this update included (Adam's bias correction)

    def hyperparameters(self) -> Tuple[int, float, float, float, float, float, int]:
        """The ops' optimizer arguments, in their schema's order (before the step counts)."""
        return (self.optimizer, self.learning_rate, self.eps, self.beta1, self.beta2, self.weight_decay,
                self.weight_decay_mode)
