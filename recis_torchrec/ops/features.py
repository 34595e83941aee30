# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The fused feature ops: hash, mod, multi_hash, truncate, cross and bucketize.

Each op transforms a whole group of features of a KJT-layout input in one
call: ``values`` (N,) int64, ``lengths`` (num_features * B,) int64 (feature
k owns bags ``k*B .. (k+1)*B``, as in a ``KeyedJaggedTensor``) and optional
per-value ``weights`` (N,) float32. It returns the transformed features, in
the order listed, as ``(values, lengths, weights)`` in the same layout
(``weights`` is None when the input has none).

Ids are read as unsigned 64-bit integers. A modulus of 0 means none. Salts
and moduli are in [0, 2**63).

- ``hash``: XXH64 of the id's 8 little-endian bytes, seeded with the
  feature's salt (salt 0 for none), then the modulus. String ids hashed by the
  loader (:func:`recis_torchrec.ops.hash_string`) use the same function over
  the UTF-8 bytes, so all of the project's hashes are one family.
- ``multi_hash``: ``num_hashes`` independent hashes of every id, output
  ``g * num_hashes + r`` holding hash r of feature g, seeded
  ``salt + r * 0x9E3779B97F4A7C15`` (hash 0 equals ``hash``).
- ``truncate``: the first (``from_end`` 0) or last (1) ``max_lengths[g]`` ids
  of every bag.
- ``cross``: per sample, every pair (a from bag left[p], b from bag right[p]),
  a outer, hashed as XXH64 of a's then b's 8 bytes (seed: the salt); weights
  multiply. A bag crossed with an empty bag is empty.
- ``bucketize``: a dense column against sorted boundaries, one id per sample:
  the number of boundaries <= x (``torch.bucketize(x, b, right=True)``), so
  ids run from 0 to len(boundaries). NaN gets its own bucket,
  ``len(boundaries) + 1``.
"""

from typing import List, Optional, Sequence, Tuple

import torch

from recis_torchrec import _ext  # noqa: F401  (registers torch.ops.recis)

Jagged = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]

SEED_STEP = 0x9E3779B97F4A7C15


def _ints(xs: Sequence[int]) -> List[int]:
    return [int(x) for x in xs]


def feature_hash(values, lengths, weights, num_features: int, features, salts, moduli) -> Jagged:
    return torch.ops.recis.feature_hash(values, lengths, weights, num_features, _ints(features), _ints(salts),
                                        _ints(moduli))


def feature_mod(values, lengths, weights, num_features: int, features, moduli) -> Jagged:
    return torch.ops.recis.feature_mod(values, lengths, weights, num_features, _ints(features), _ints(moduli))


def feature_multi_hash(values, lengths, weights, num_features: int, features, salts, moduli, num_hashes: int) -> Jagged:
    return torch.ops.recis.feature_multi_hash(values, lengths, weights, num_features, _ints(features), _ints(salts),
                                              _ints(moduli), int(num_hashes))


def feature_truncate(values, lengths, weights, num_features: int, features, max_lengths, from_end) -> Jagged:
    return torch.ops.recis.feature_truncate(values, lengths, weights, num_features, _ints(features),
                                            _ints(max_lengths), _ints(from_end))


def feature_cross(values, lengths, weights, num_features: int, left, right, salts, moduli) -> Jagged:
    return torch.ops.recis.feature_cross(values, lengths, weights, num_features, _ints(left), _ints(right),
                                         _ints(salts), _ints(moduli))


def feature_bucketize(dense, columns, boundaries, boundary_offsets) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.recis.feature_bucketize(dense, _ints(columns), boundaries, _ints(boundary_offsets))


def feature_concat(values, lengths, weights, batch: int, buffers, features) -> Jagged:
    """Output key k = feature ``features[k]`` of buffer ``buffers[k]`` (KJT layouts), in one copy."""
    return torch.ops.recis.feature_concat(list(values), list(lengths), list(weights), int(batch), _ints(buffers),
                                          _ints(features))


def feature_program(values, lengths, weights, num_features: int, dense, boundaries, program) -> Jagged:
    """A whole feature plan in one pass (CPU): each output feature computed from the input and written once.

    ``program`` is ``[K]`` then, per output feature, ``source, a, b, c, d, T, (max_length, side) x T,
    S, (step, seed, modulus) x S``. Source 0 is input feature ``a``; 1 the cross of input features
    ``a`` and ``b`` (salt ``c``, modulus ``d``); 2 dense column ``a`` bucketized against
    ``boundaries[b:c]``. The truncations apply in order (side 1 keeps the last ids), then the
    per-id steps: step 0 hashes with ``seed`` then takes ``modulus`` (0: none), step 1 takes
    ``modulus`` (> 0). Seeds are 64-bit patterns given as signed ints. :class:`FeatureEngine`
    compiles its specs into such a program.
    """
    return torch.ops.recis.feature_program(values, lengths, weights, int(num_features), dense, boundaries,
                                           _ints(program))


def _fake_out(lengths, weights, num_features: int, num_out: int):
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size()
    batch = lengths.shape[0] // max(num_features, 1)
    out_w = weights.new_empty((n,)) if weights is not None else None
    return lengths.new_empty((n,)), lengths.new_empty((num_out * batch,)), out_w


@torch.library.register_fake("recis::feature_hash")
def _hash_fake(values, lengths, weights, num_features, features, salts, moduli):
    if len(features) == 0:
        return values.new_empty((0,)), lengths.new_empty((0,)), None if weights is None else weights.new_empty((0,))
    return _fake_out(lengths, weights, num_features, len(features))


@torch.library.register_fake("recis::feature_mod")
def _mod_fake(values, lengths, weights, num_features, features, moduli):
    return _fake_out(lengths, weights, num_features, len(features))


@torch.library.register_fake("recis::feature_multi_hash")
def _multi_hash_fake(values, lengths, weights, num_features, features, salts, moduli, num_hashes):
    return _fake_out(lengths, weights, num_features, len(features) * num_hashes)


@torch.library.register_fake("recis::feature_truncate")
def _truncate_fake(values, lengths, weights, num_features, features, max_lengths, from_end):
    return _fake_out(lengths, weights, num_features, len(features))


@torch.library.register_fake("recis::feature_cross")
def _cross_fake(values, lengths, weights, num_features, left, right, salts, moduli):
    return _fake_out(lengths, weights, num_features, len(left))


@torch.library.register_fake("recis::feature_concat")
def _concat_fake(values, lengths, weights, batch, buffers, features):
    n = torch.library.get_ctx().new_dynamic_size()
    out_w = weights[0].new_empty((n,)) if len(weights) else None
    return values[0].new_empty((n,)), lengths[0].new_empty((len(features) * batch,)), out_w


@torch.library.register_fake("recis::feature_program")
def _program_fake(values, lengths, weights, num_features, dense, boundaries, program):
    return _fake_out(lengths, weights, num_features, int(program[0]) if len(program) else 0)


@torch.library.register_fake("recis::feature_bucketize")
def _bucketize_fake(dense, columns, boundaries, boundary_offsets):
    n = dense.shape[0] * len(columns)
    return dense.new_empty((n,), dtype=torch.int64), dense.new_empty((n,), dtype=torch.int64)


__all__ = [
    "SEED_STEP",
    "feature_bucketize",
    "feature_concat",
    "feature_cross",
    "feature_hash",
    "feature_mod",
    "feature_multi_hash",
    "feature_program",
    "feature_truncate",
]
