# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The project's enums, read from the op library (``csrc/hashtable/constants.h`` and the headers
it names), so Python's codes are the C++ definitions, not copies of them."""

from typing import Dict, Tuple

from recis_torchrec._ext import C

_ALL = C.constants()

INIT_KINDS: Dict[str, int] = dict(_ALL["init_kind"])
EVICTION_POLICIES: Dict[str, int] = dict(_ALL["eviction_policy"])
POOLING_MODES: Dict[str, int] = dict(_ALL["pooling"])
OPTIMIZERS: Dict[str, int] = dict(_ALL["optimizer"])
WEIGHT_DECAY_MODES: Dict[str, int] = dict(_ALL["weight_decay_mode"])
ROW_TYPES: Dict[str, int] = dict(_ALL["row_type"])
ROW_META_COLUMNS: int = int(_ALL["row_meta_columns"])
# The update ops' hyperparameters, in the order they take them (RECIS_HYPERPARAMETERS).
HYPERPARAMETERS: Tuple[str, ...] = tuple(_ALL["hyperparameters"])

POOLING_SUM = POOLING_MODES["sum"]
POOLING_MEAN = POOLING_MODES["mean"]

__all__ = [
    "EVICTION_POLICIES",
    "HYPERPARAMETERS",
    "INIT_KINDS",
    "OPTIMIZERS",
    "POOLING_MEAN",
    "POOLING_MODES",
    "POOLING_SUM",
    "ROW_META_COLUMNS",
    "ROW_TYPES",
    "WEIGHT_DECAY_MODES",
]
