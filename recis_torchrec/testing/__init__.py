# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Reusable test fixtures: random KJTs and plain-PyTorch references."""

from recis_torchrec.testing.kjt import random_kjt, zipf_ids
from recis_torchrec.testing.reference import (
    reference_adam_rows,
    reference_pooled,
    reference_pooled_backward,
    reference_rowwise_adagrad_rows,
)

__all__ = [
    "random_kjt",
    "reference_adam_rows",
    "reference_pooled",
    "reference_pooled_backward",
    "reference_rowwise_adagrad_rows",
    "zipf_ids",
]
