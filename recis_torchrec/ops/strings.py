# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The project's string hash: XXH64, read as int64."""

import torch

from recis_torchrec import _ext  # noqa: F401  (registers torch.ops.recis)


def hash_strings(data: torch.Tensor, offsets: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """XXH64 (``seed``) of strings in Arrow's layout, as int64.

    Args:
        data: (bytes,) uint8, the concatenated UTF-8 (or binary) strings.
        offsets: (n + 1,) int32 or int64; string i is ``data[offsets[i]:offsets[i + 1]]``.
        seed: XXH64 seed in [0, 2**63).

    Returns:
        (n,) int64: the 64-bit hashes' bits.
    """
    return torch.ops.recis.hash_strings(data, offsets, seed)


@torch.library.register_fake("recis::hash_strings")
def _hash_strings_fake(data, offsets, seed=0):
    return offsets.new_empty((offsets.shape[0] - 1,), dtype=torch.int64)
