# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The project's string hash (XXH64, read as int64) and the Arrow-buffer conversions."""

import torch

from recis_torchrec import _ext  # noqa: F401  (registers torch.ops.recis)


def hash_string(s: str, seed: int = 0) -> int:
    """The int64 id of a string id: XXH64 (``seed``, taken mod 2**64) of its UTF-8 bytes, as a
    signed int64. This is the one string hash of the project; the loader and the feature engine
    both use it."""
    b = s.encode("utf-8")
    data = torch.tensor(list(b), dtype=torch.uint8)
    seed = seed - 2**64 if seed >= 2**63 else seed
    return int(hash_strings(data, torch.tensor([0, len(b)], dtype=torch.int64), seed)[0])


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


def parse_id_lists(data: torch.Tensor, offsets: torch.Tensor, nulls, delimiter: str, weight_delimiter: str,
                   seed: int, column: str):
    """Delimited id lists in Arrow's string layout -> ``(items per row, ids, weights or None)``.

    Each row's string is split by ``delimiter`` (empty: the whole string is one item) into its
    non-empty items. An item written as a canonical decimal int64 (no leading zero) is that
    integer, any other its XXH64 (``seed``); with a ``weight_delimiter``, ``id<sep>weight`` items
    carry a weight (split at the last separator; none weighs 1). Null rows (``nulls``) are empty.
    """
    return torch.ops.recis.parse_id_lists(data, offsets, nulls, delimiter, weight_delimiter, seed, column)


def arrow_scalar_ids(values, validity, bit_offsets, num_rows: int):
    """Integer id columns (Arrow buffers) -> (values, lengths (C * num_rows,)) of a KJT, one key per column."""
    return torch.ops.recis.arrow_scalar_ids(values, validity, bit_offsets, num_rows)


def arrow_dense(values, validity, bit_offsets, defaults, num_rows: int) -> torch.Tensor:
    """Numeric columns (Arrow buffers) -> (num_rows, C) float32, nulls -> defaults."""
    return torch.ops.recis.arrow_dense(values, validity, bit_offsets, [float(d) for d in defaults], num_rows)


@torch.library.register_fake("recis::arrow_scalar_ids")
def _arrow_scalar_ids_fake(values, validity, bit_offsets, num_rows):
    ctx = torch.library.get_ctx()
    return values[0].new_empty((ctx.new_dynamic_size(),), dtype=torch.int64), values[0].new_empty(
        (len(values) * num_rows,), dtype=torch.int64
    )


@torch.library.register_fake("recis::arrow_dense")
def _arrow_dense_fake(values, validity, bit_offsets, defaults, num_rows):
    return values[0].new_empty((num_rows, len(values)), dtype=torch.float32)
