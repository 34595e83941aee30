# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The devices a test runs on: ``@pytest.mark.parametrize("device", devices())``.

The CPU always; CUDA where a GPU and an extension built with ``RECIS_CUDA=1`` are
there (skipped, with the reason, elsewhere). A test parametrised so checks every
device against the same plain-PyTorch or CPU reference.
"""

import pytest
import torch

from recis_torchrec.ops.devices import cuda_tables_available

HAS_CUDA_TABLES = cuda_tables_available()
_skip_without_cuda = pytest.mark.skipif(not HAS_CUDA_TABLES,
                                        reason="needs a GPU and an extension built with RECIS_CUDA=1")
# Every test that runs on a GPU carries the `cuda` marker: `make gpu-check` selects them with
# `-m cuda` (a selection by name, `-k "cuda or gpu"`, missed GPU-only tests named otherwise).
CUDA_MARKS = [pytest.mark.cuda, _skip_without_cuda]


def needs_cuda(test):
    """A GPU-only test: marked `cuda`, skipped (with the reason) where no GPU and CUDA build are."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def devices() -> list:
    return ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]


def gpu_world_size() -> int:
    """Ranks for a multi-GPU test: one per GPU, at most two (one GPU still runs every collective)."""
    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def backend_of(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"
