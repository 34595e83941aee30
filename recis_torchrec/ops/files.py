# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The checkpoint file writer: a header and tensors' bytes to one file, hashed on the way out."""

from typing import Sequence

import torch

from recis_torchrec import _ext  # noqa: F401  (registers torch.ops.recis)


def write_file(
    path: str, header: bytes, tensors: Sequence[torch.Tensor], durable: bool = True, share: float = 1.0
) -> int:
    """Writes ``header`` then the bytes of each CPU tensor (row-major; strided ones gathered) to ``path``, through the
    page cache only where the file system refuses ``O_DIRECT``; returns the XXH64 (seed 0) of the
    whole file as an unsigned int. With ``durable`` the file is fsync'd before this returns.
    ``share`` (0, 1] caps the fraction of one core's time the writer is busy: below 1 it sleeps
    between its 8 MiB writes, so that work beside it (a training step) keeps its cores. Runs
    without the GIL."""
    for i, t in enumerate(tensors):
        if t.layout != torch.strided or t.device.type != "cpu":
            raise ValueError(f"write_file: {path}: tensor {i} must be a dense CPU tensor, got {t.layout} on {t.device}")
    head = torch.frombuffer(bytearray(header), dtype=torch.uint8) if header else torch.empty(0, dtype=torch.uint8)
    digest = torch.ops.recis.write_file(path, head, list(tensors), durable, float(share))
    return digest & (2**64 - 1)
