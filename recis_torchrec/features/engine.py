# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``FeatureEngine``: feature specs compiled into a few fused op calls.

On the CPU the engine compiles its specs, once per input layout, into one
``feature_program``: a single op call computes every output feature from the
input in one pass and writes it once, into the output KJT's buffers, so a
chain costs what a single op does.

On CUDA the engine runs every spec's chain stage by stage and, at each stage, calls
one fused op per kind of op (per input buffer): all crosses in one
``feature_cross``, all bucketized columns in one ``feature_bucketize``, all
truncations in one ``feature_truncate``, all hashes in one ``feature_hash``
(a modulus that follows a hash is folded into it), and so on. A Criteo-style
spec of 26 hashed and modded features, 13 bucketized columns and 3 crosses
costs three op calls and one concatenation, whatever the number of features.

Truncation commutes with the per-id ops (hash, mod, multi_hash map each id on
its own), so the engine truncates first: fewer ids to hash.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recis_torchrec.features.spec import (
    Cross,
    Feature,
    FeatureSpecError,
    Hash,
    Mod,
    MultiHash,
    Spec,
    Truncate,
    spec_from_dict,
)
from recis_torchrec.ops import features as fops

DenseInput = Union[torch.Tensor, KeyedTensor, Dict[str, torch.Tensor], None]


@dataclass
class _Chain:
    spec: Spec
    source: Tuple[str, int]  # ("kjt", key index) | ("cross", -1) | ("dense", column)
    truncates: List[Truncate]
    steps: List[Tuple]  # ("hash", salt, modulus) | ("mod", modulus) | ("multi", k, salt, modulus)
    cross_modulus: int = 0
    cross_sides: Tuple[int, int] = (-1, -1)  # a cross's left and right key indices


def _fold(ops: Sequence[Any]) -> Tuple[List[Truncate], List[Tuple]]:
    """Splits a chain into its truncations and its per-id steps, folding mod into a hash before it."""
    truncates = [op for op in ops if isinstance(op, Truncate)]
    steps: List[Tuple] = []
    for op in ops:
        if isinstance(op, Hash):
            steps.append(("hash", op.salt, 0))
        elif isinstance(op, MultiHash):
            steps.append(("multi", op.num_hashes, op.salt, 0))
        elif isinstance(op, Mod):
            last = steps[-1] if steps else None
            if last is not None and last[0] == "hash" and last[2] == 0:
                steps[-1] = ("hash", last[1], op.modulus)
            elif last is not None and last[0] == "multi" and last[3] == 0:
                steps[-1] = ("multi", last[1], last[2], op.modulus)
            else:
                steps.append(("mod", op.modulus))
    return truncates, steps


def _use_program(values: torch.Tensor) -> bool:
    """Whether these inputs run as one ``feature_program`` (the CPU) or stage by stage (CUDA)."""
    return values.device.type == "cpu"


def _signed(x: int) -> int:
    """A 64-bit pattern as the signed int64 an op argument carries."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _expand_steps(steps: Sequence[Tuple]) -> List[List[Tuple[int, int, int]]]:
    """A chain's per-id steps as ``feature_program`` steps, one list per output: a multi_hash of k
    hashes makes k outputs of each output before it (output ``p * k + r`` is hash r of output p)."""
    outs: List[List[Tuple[int, int, int]]] = [[]]
    for step in steps:
        if step[0] == "hash":
            outs = [o + [(0, _signed(step[1]), step[2])] for o in outs]
        elif step[0] == "mod":
            outs = [o + [(1, 0, step[1])] for o in outs]
        else:
            _, k, salt, modulus = step
            outs = [o + [(0, _signed(salt + r * fops.SEED_STEP), modulus)] for o in outs for r in range(k)]
    return outs


class FeatureEngine(nn.Module):
    """Turns raw KJT keys (and dense columns) into the model's KJT keys, in fused C++ ops.

    Args:
        specs: ``Feature``/``Cross`` specs; the output KJT has their keys, in this order.
        dense_keys: the names of the dense tensor's columns, for ``bucketize`` sources
            (or pass them per call, or pass a ``KeyedTensor`` or a dict of columns).
        passthrough: input KJT keys that no spec reads (and no spec's output replaces) follow
            the specs' keys in the output unchanged, in their input order; False drops them.

    ``engine(kjt, dense=None) -> KeyedJaggedTensor``. If ``kjt`` has weights, so
    does the output: weights follow their ids (truncate keeps them, cross
    multiplies them, hashes keep them) and bucket ids weigh 1.
    """

    def __init__(self, specs: Sequence[Spec], dense_keys: Optional[Sequence[str]] = None,
                 passthrough: bool = False) -> None:
        super().__init__()
        specs = list(specs)
        if not specs:
            raise FeatureSpecError("FeatureEngine: no feature specs given")
        for s in specs:
            if not isinstance(s, (Feature, Cross)):
                raise FeatureSpecError(f"FeatureEngine: specs must be Feature or Cross, got {s!r}")
            s.validate()
        names = [n for s in specs for n in s.output_names()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise FeatureSpecError(f"FeatureEngine: output keys {dupes} are produced more than once")
        self.specs: Tuple[Spec, ...] = tuple(specs)
        self.dense_keys = list(dense_keys) if dense_keys is not None else None
        self.passthrough = bool(passthrough)
        self._keys = names
        self._plans: Dict[Tuple, List[_Chain]] = {}
        self._programs: Dict[Tuple, Tuple[List[int], torch.Tensor, List[str]]] = {}

    def output_keys(self, input_keys: Optional[Sequence[str]] = None) -> List[str]:
        """The output KJT's keys: the specs', then (with ``passthrough``) the ``input_keys`` no spec uses."""
        return list(self._keys) + (self.passed_keys(input_keys) if input_keys is not None else [])

    def passed_keys(self, input_keys: Sequence[str]) -> List[str]:
        """The input keys that pass through unchanged (none without ``passthrough``)."""
        if not self.passthrough:
            return []
        used = set(self.input_keys()) | set(self._keys)
        return [k for k in input_keys if k not in used]

    def input_keys(self) -> List[str]:
        """The KJT keys the specs read (sources of non-dense features and both sides of crosses)."""
        out: List[str] = []
        for s in self.specs:
            for k in ([s.left, s.right] if isinstance(s, Cross) else [] if s.is_dense else [s.source]):
                if k not in out:
                    out.append(k)
        return out

    def dense_inputs(self) -> List[str]:
        return [s.source for s in self.specs if isinstance(s, Feature) and s.is_dense]

    # -- serialisation -----------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return {"version": 1, "dense_keys": self.dense_keys, "passthrough": self.passthrough,
                "features": [s.to_dict() for s in self.specs]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FeatureEngine":
        if not isinstance(d, dict) or d.get("version") != 1 or "features" not in d:
            raise FeatureSpecError(f"FeatureEngine.from_dict: expected {{'version': 1, 'features': [...]}}, got {d!r}")
        return cls([spec_from_dict(x) for x in d["features"]], d.get("dense_keys"), bool(d.get("passthrough", False)))

    def extra_repr(self) -> str:
        return f"{len(self.specs)} specs -> {len(self._keys)} keys"

    # -- compile -------------------------------------------------------------------

    def _plan(self, keys: Tuple[str, ...], dense_keys: Optional[Tuple[str, ...]]) -> List[_Chain]:
        plan_key = (keys, dense_keys)
        plan = self._plans.get(plan_key)
        if plan is not None:
            return plan
        index = {k: i for i, k in enumerate(keys)}
        dense_index = {k: i for i, k in enumerate(dense_keys or ())}

        def find(key: str, what: str) -> int:
            if key not in index:
                raise FeatureSpecError(f"{what}: input key {key!r} is not in the KJT (its keys: {list(keys)})")
            return index[key]

        plan = []
        for s in self.specs:
            if isinstance(s, Cross):
                what = f"cross {s.output_name!r}"
                left, right = find(s.left, what), find(s.right, what)
                truncates, steps = _fold(s.ops)
                modulus = 0
                if steps and steps[0][0] == "mod":  # folded into the cross hash
                    modulus = steps.pop(0)[1]
                chain = _Chain(s, ("cross", -1), truncates, steps, modulus, (left, right))
            elif s.is_dense:
                what = f"feature {s.output_name!r}"
                if dense_keys is None:
                    raise FeatureSpecError(
                        f"{what}: bucketizes dense column {s.source!r}, but no dense input (or dense_keys) was given"
                    )
                if s.source not in dense_index:
                    raise FeatureSpecError(
                        f"{what}: dense column {s.source!r} is not among the dense keys {list(dense_keys)}"
                    )
                truncates, steps = _fold(s.ops[1:])
                chain = _Chain(s, ("dense", dense_index[s.source]), truncates, steps)
            else:
                truncates, steps = _fold(s.ops)
                chain = _Chain(s, ("kjt", find(s.source, f"feature {s.output_name!r}")), truncates, steps)
            plan.append(chain)
        self._plans[plan_key] = plan
        return plan

    # -- run -------------------------------------------------------------------------

    def _program(self, keys: Tuple[str, ...],
                 dense_keys: Optional[Tuple[str, ...]]) -> Tuple[List[int], torch.Tensor, List[str]]:
        """The plan for these input keys as one ``feature_program`` (its encoding: ``ops.feature_program``),
        its boundaries and its output keys."""
        plan_key = (keys, dense_keys)
        compiled = self._programs.get(plan_key)
        if compiled is not None:
            return compiled
        program: List[int] = []
        bounds: List[float] = []
        count = 0
        for c in self._plan(keys, dense_keys):
            if c.source[0] == "cross":
                head = [1, c.cross_sides[0], c.cross_sides[1], _signed(c.spec.salt), c.cross_modulus]
            elif c.source[0] == "dense":
                b = c.spec.ops[0].boundaries
                head = [2, c.source[1], len(bounds), len(bounds) + len(b), 0]
                bounds.extend(float(x) for x in b)
            else:
                head = [0, c.source[1], 0, 0, 0]
            cuts = [len(c.truncates)] + [x for t in c.truncates for x in (t.max_length, int(t.side == "last"))]
            for steps in _expand_steps(c.steps):
                program += head + cuts + [len(steps)] + [x for step in steps for x in step]
                count += 1
        index = {k: i for i, k in enumerate(keys)}
        for k in self.passed_keys(keys):
            program += [0, index[k], 0, 0, 0, 0, 0]
            count += 1
        compiled = ([count] + program, torch.tensor(bounds, dtype=torch.float32), self.output_keys(keys))
        self._programs[plan_key] = compiled
        return compiled

    def forward(
        self, kjt: KeyedJaggedTensor, dense: DenseInput = None, dense_keys: Optional[Sequence[str]] = None
    ) -> KeyedJaggedTensor:
        if not isinstance(kjt, KeyedJaggedTensor):
            raise TypeError(f"FeatureEngine: expected a KeyedJaggedTensor, got {type(kjt).__name__}")
        values = kjt.values()
        if values.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"FeatureEngine: KJT values must be int64 or int32 ids, got {values.dtype}")
        values = values.long()
        batch = kjt.stride()
        lengths = kjt.lengths().long()
        weights = kjt.weights_or_none()
        if weights is not None:
            weights = weights.float()
        dense_t, dk = self._dense(dense, dense_keys, batch)
        if _use_program(values):
            program, bounds, keys = self._program(tuple(kjt.keys()), dk)
            v, l, w = fops.feature_program(values, lengths, weights, len(kjt.keys()), dense_t, bounds, program)
            return KeyedJaggedTensor(keys, v, w, lengths=l, stride=batch)
        return self._staged(kjt, values, lengths, weights, dense_t, dk, batch)

    def _staged(self, kjt: KeyedJaggedTensor, values: torch.Tensor, lengths: torch.Tensor,
                weights: Optional[torch.Tensor], dense_t: Optional[torch.Tensor], dk, batch: int) -> KeyedJaggedTensor:
        """The plan as one fused op per kind of op and stage, then one concatenation (the CUDA path)."""
        plan = self._plan(tuple(kjt.keys()), dk)

        # buffers[i] = (values, lengths, weights, num_features); locs[c] = (buffer, feature) of each of
        # chain c's current outputs. Both are per call: the cached plan is never written, so one engine
        # can serve several loader threads.
        buffers: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]] = [
            (values, lengths, weights, len(kjt.keys()))
        ]
        locs: List[List[Tuple[int, int]]] = [[(0, c.source[1])] if c.source[0] == "kjt" else [] for c in plan]

        crosses = [i for i, c in enumerate(plan) if c.source[0] == "cross"]
        if crosses:
            v, l, w = fops.feature_cross(
                values, lengths, weights, len(kjt.keys()),
                [plan[i].cross_sides[0] for i in crosses], [plan[i].cross_sides[1] for i in crosses],
                [plan[i].spec.salt for i in crosses], [plan[i].cross_modulus for i in crosses],
            )
            buffers.append((v, l, w, len(crosses)))
            for j, i in enumerate(crosses):
                locs[i] = [(len(buffers) - 1, j)]
        dense_chains = [i for i, c in enumerate(plan) if c.source[0] == "dense"]
        if dense_chains:
            bounds = [plan[i].spec.ops[0].boundaries for i in dense_chains]
            offsets = [0]
            for b in bounds:
                offsets.append(offsets[-1] + len(b))
            v, l = fops.feature_bucketize(
                dense_t, [plan[i].source[1] for i in dense_chains],
                torch.tensor([x for b in bounds for x in b], dtype=torch.float32), offsets,
            )
            w = torch.ones(v.shape[0], dtype=torch.float32) if weights is not None else None
            buffers.append((v, l, w, len(dense_chains)))
            for j, i in enumerate(dense_chains):
                locs[i] = [(len(buffers) - 1, j)]

        for t in range(max(len(c.truncates) for c in plan)):
            groups: Dict[int, List[int]] = {}
            for i, c in enumerate(plan):
                if t < len(c.truncates):
                    groups.setdefault(locs[i][0][0], []).append(i)
            for buf, members in groups.items():
                feats = [f for i in members for _, f in locs[i]]
                sizes = [plan[i].truncates[t].max_length for i in members for _ in locs[i]]
                ends = [int(plan[i].truncates[t].side == "last") for i in members for _ in locs[i]]
                bv, bl, bw, bf = buffers[buf]
                buffers.append((*fops.feature_truncate(bv, bl, bw, bf, feats, sizes, ends), len(feats)))
                self._relocate(locs, members, len(buffers) - 1, 1)

        for s in range(max(len(c.steps) for c in plan)):
            groups2: Dict[Tuple, List[int]] = {}
            for i, c in enumerate(plan):
                if s < len(c.steps):
                    step = c.steps[s]
                    groups2.setdefault((locs[i][0][0], step[0], step[1] if step[0] == "multi" else 0), []).append(i)
            for (buf, kind, k), members in groups2.items():
                feats = [f for i in members for _, f in locs[i]]

                def per_output(field: int) -> List[int]:
                    return [plan[i].steps[s][field] for i in members for _ in locs[i]]

                bv, bl, bw, bf = buffers[buf]
                if kind == "hash":
                    out = fops.feature_hash(bv, bl, bw, bf, feats, per_output(1), per_output(2))
                elif kind == "mod":
                    out = fops.feature_mod(bv, bl, bw, bf, feats, per_output(1))
                else:
                    out = fops.feature_multi_hash(bv, bl, bw, bf, feats, per_output(2), per_output(3), k)
                buffers.append((*out, len(feats) * (k or 1)))
                self._relocate(locs, members, len(buffers) - 1, k or 1)

        out_locs = [loc for chain_locs in locs for loc in chain_locs]
        passed = self.passed_keys(kjt.keys())
        index = {k: i for i, k in enumerate(kjt.keys())}
        out_locs += [(0, index[k]) for k in passed]
        return self._assemble(out_locs, buffers, batch, weights is not None, self._keys + passed)

    @staticmethod
    def _relocate(locs: List[List[Tuple[int, int]]], members: List[int], buf: int, k: int) -> None:
        """The members' outputs, in order, are now features 0.. of buffer `buf`, k per previous output."""
        first = 0
        for i in members:
            n = len(locs[i])
            locs[i] = [(buf, p * k + r) for p in range(first, first + n) for r in range(k)]
            first += n

    def _assemble(self, locs: List[Tuple[int, int]], buffers, batch: int, weighted: bool,
                  keys: List[str]) -> KeyedJaggedTensor:
        first = locs[0][0]
        if all(b == first for b, _ in locs) and [f for _, f in locs] == list(range(buffers[first][3])):
            v, l, w, _ = buffers[first]  # one buffer, already in order
            return KeyedJaggedTensor(keys, v, w if weighted else None, lengths=l, stride=batch)
        used = sorted({b for b, _ in locs})
        remap = {b: i for i, b in enumerate(used)}
        v, l, w = fops.feature_concat(
            [buffers[b][0] for b in used], [buffers[b][1] for b in used],
            [buffers[b][2] for b in used] if weighted else [], batch,
            [remap[b] for b, _ in locs], [f for _, f in locs],
        )
        return KeyedJaggedTensor(keys, v, w, lengths=l, stride=batch)

    def _dense(self, dense: DenseInput, dense_keys, batch: int):
        if not any(isinstance(s, Feature) and s.is_dense for s in self.specs):
            return None, None
        if dense is None:
            raise FeatureSpecError(
                f"FeatureEngine: features {self.dense_inputs()} bucketize dense columns, but no dense input was given"
            )
        if isinstance(dense, KeyedTensor):
            if any(d != 1 for d in dense.length_per_key()):
                raise FeatureSpecError("FeatureEngine: a KeyedTensor dense input must hold one column per key")
            keys, t = tuple(dense.keys()), dense.values()
        elif isinstance(dense, dict):
            keys = tuple(dense)
            t = torch.stack([dense[k].reshape(-1) for k in keys], 1) if keys else torch.empty(batch, 0)
        elif isinstance(dense, torch.Tensor):
            dk = dense_keys if dense_keys is not None else self.dense_keys
            if dk is None:
                raise FeatureSpecError("FeatureEngine: a dense tensor needs dense_keys (its columns' names)")
            keys, t = tuple(dk), dense
            if t.dim() != 2 or t.shape[1] != len(keys):
                raise FeatureSpecError(
                    f"FeatureEngine: dense has shape {tuple(t.shape)} but {len(keys)} dense_keys were given"
                )
        else:
            raise TypeError(f"FeatureEngine: dense must be a Tensor, KeyedTensor or dict, got {type(dense).__name__}")
        if t.shape[0] != batch:
            raise FeatureSpecError(f"FeatureEngine: dense has {t.shape[0]} rows but the KJT's batch size is {batch}")
        return t.float().contiguous(), keys


__all__ = ["FeatureEngine"]
