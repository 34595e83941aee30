# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Which devices the op library runs on: the CPU always; CUDA with a ``RECIS_CUDA=1`` build and a GPU."""

import torch

from recis_torchrec import _ext  # noqa: F401  (registers torch.ops.recis)


def cuda_tables_available() -> bool:
    """True when the extension has the CUDA table ops and a GPU is present."""
    return torch.cuda.is_available() and hasattr(torch.ops.recis, "gpu_table_create")


def require_cuda(what: str) -> None:
    """Raises, saying what is missing, unless CUDA tables can be built here."""
    if not hasattr(torch.ops.recis, "gpu_table_create"):
        raise NotImplementedError(
            f"{what}: this build of recis_torchrec has no CUDA tables; rebuild with RECIS_CUDA=1 "
            "(RECIS_CUDA=1 pip install --no-build-isolation --no-deps -e .) on a machine with nvcc"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what}: CUDA tables need a GPU, and torch.cuda.is_available() is False")


__all__ = ["cuda_tables_available", "require_cuda"]
