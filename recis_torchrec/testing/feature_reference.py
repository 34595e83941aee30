# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The feature specs run feature by feature with plain torch ops: the unfused reference.

It computes what :class:`FeatureEngine` computes, one feature and one op at a
time, with the hashes written as torch integer arithmetic (uint64 emulated in
int64: wrapping multiply and add, logical shifts by masking). The tests check
the engine against it, and the feature benchmark measures it as the baseline a
user would write without the engine.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recis_torchrec.features.spec import Cross, Hash, Mod, MultiHash, Spec, Truncate

_M64 = 2**64


def _signed(x: int) -> int:
    x %= _M64
    return x - _M64 if x >= 2**63 else x


_P1, _P2, _P3, _P4, _P5 = (
    _signed(0x9E3779B185EBCA87),
    _signed(0xC2B2AE3D27D4EB4F),
    _signed(0x165667B19E3779F9),
    _signed(0x85EBCA77C2B2AE63),
    0x27D4EB2F165667C5,
)
SEED_STEP = 0x9E3779B97F4A7C15


def _lsr(x: torch.Tensor, r: int) -> torch.Tensor:
    return (x >> r) & ((1 << (64 - r)) - 1)


def _rotl(x: torch.Tensor, r: int) -> torch.Tensor:
    return (x << r) | _lsr(x, 64 - r)


def _lane(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    k = _rotl(v * _P2, 31) * _P1
    return _rotl(h ^ k, 27) * _P1 + _P4


def _avalanche(h: torch.Tensor) -> torch.Tensor:
    h = h ^ _lsr(h, 33)
    h = h * _P2
    h = h ^ _lsr(h, 29)
    h = h * _P3
    return h ^ _lsr(h, 32)


def hash_ids(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """XXH64(seed) of each int64 id's 8 little-endian bytes, as int64."""
    h0 = torch.full_like(ids, _signed(seed + _P5 + 8))
    return _avalanche(_lane(h0, ids))


def hash_pairs(a: torch.Tensor, b: torch.Tensor, seed: int) -> torch.Tensor:
    """XXH64(seed) of a's then b's 8 little-endian bytes, as int64."""
    h0 = torch.full_like(a, _signed(seed + _P5 + 16))
    return _avalanche(_lane(_lane(h0, a), b))


def umod(x: torch.Tensor, m: int) -> torch.Tensor:
    """x read as unsigned 64-bit, modulo m (0: unchanged)."""
    if m == 0:
        return x
    r = torch.remainder(x, m)  # of the signed value, in [0, m)
    t = r - (m - _M64 % m)  # + 2**64 for the negative ones, kept in range
    return torch.where(x < 0, torch.where(t < 0, t + m, t), r)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def truncate(values, lengths, weights, n: int, last: bool):
    off = _offsets(lengths)
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    pos = torch.arange(values.numel()) - off[seg]
    keep = pos >= (lengths[seg] - n) if last else pos < n
    return values[keep], torch.clamp(lengths, max=n), None if weights is None else weights[keep]


def cross(va, la, wa, vb, lb, wb, seed: int):
    oa, ob = _offsets(la), _offsets(lb)
    out_len = la * lb
    seg = torch.repeat_interleave(torch.arange(la.numel()), out_len)
    pos = torch.arange(int(out_len.sum())) - _offsets(out_len)[seg]
    ia = oa[seg] + torch.div(pos, lb[seg], rounding_mode="floor")
    ib = ob[seg] + torch.remainder(pos, lb[seg].clamp(min=1))
    w = wa[ia] * wb[ib] if wa is not None else None
    return hash_pairs(va[ia], vb[ib], seed), out_len, w


def bucketize(x: torch.Tensor, boundaries: Sequence[float]) -> torch.Tensor:
    b = torch.tensor(list(boundaries), dtype=torch.float32)
    ids = torch.bucketize(x.float().contiguous(), b, right=True)
    return torch.where(torch.isnan(x), torch.full_like(ids, len(boundaries) + 1), ids)


def _run_ops(ops, parts: List[Tuple]) -> List[Tuple]:
    for op in ops:
        if isinstance(op, Truncate):
            parts = [truncate(v, l, w, op.max_length, op.side == "last") for v, l, w in parts]
        elif isinstance(op, Hash):
            parts = [(hash_ids(v, op.salt), l, w) for v, l, w in parts]
        elif isinstance(op, Mod):
            parts = [(umod(v, op.modulus), l, w) for v, l, w in parts]
        elif isinstance(op, MultiHash):
            parts = [
                (hash_ids(v, (op.salt + r * SEED_STEP) % _M64), l, w) for v, l, w in parts for r in range(op.num_hashes)
            ]
    return parts


def reference_engine(
    specs: Sequence[Spec], kjt: KeyedJaggedTensor, dense: Optional[Dict[str, torch.Tensor]] = None
) -> KeyedJaggedTensor:
    """What ``FeatureEngine(specs)(kjt, dense)`` returns, computed feature by feature.

    ``dense`` maps a column name to its (B,) values.
    """
    jts = kjt.to_dict()
    weighted = kjt.weights_or_none() is not None
    keys, vals, lens, ws = [], [], [], []
    for s in specs:
        if isinstance(s, Cross):
            a, b = jts[s.left], jts[s.right]
            parts = [cross(a.values(), a.lengths().long(), a.weights_or_none(), b.values(), b.lengths().long(),
                           b.weights_or_none(), s.salt)]
            ops = s.ops
        elif s.is_dense:
            x = dense[s.source].reshape(-1)
            ids = bucketize(x, s.ops[0].boundaries)
            parts = [(ids, torch.ones_like(ids), torch.ones(ids.numel()) if weighted else None)]
            ops = s.ops[1:]
        else:
            jt = jts[s.source]
            parts = [(jt.values().long(), jt.lengths().long(), jt.weights_or_none())]
            ops = s.ops
        parts = _run_ops(ops, parts)
        for name, (v, l, w) in zip(s.output_names(), parts):
            keys.append(name)
            vals.append(v)
            lens.append(l)
            ws.append(w)
    return KeyedJaggedTensor(
        keys, torch.cat(vals), torch.cat(ws) if weighted else None, lengths=torch.cat(lens), stride=kjt.stride()
    )


__all__ = ["bucketize", "cross", "hash_ids", "hash_pairs", "reference_engine", "truncate", "umod"]
