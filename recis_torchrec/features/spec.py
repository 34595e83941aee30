# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Declarative feature specs: how each of the model's KJT keys is made from raw columns.

    Feature("user_id").hash(salt=True).mod(2**40)        # hashed, salted by its name, then modded
    Feature("price").bucketize([1.0, 5.0, 20.0])          # a dense column -> bucket ids
    Cross("user_id", "item_id").mod(2**20)                # every pair of the two bags, hashed
    Feature("clicks").truncate(50, side="last")           # the 50 most recent ids
    Feature("item_id").multi_hash(2).mod(2**16)           # keys item_id_0, item_id_1

Specs are frozen dataclasses; ``to_dict``/``from_dict`` round-trip them, so a
checkpoint can record how its ids were made.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

from recis_torchrec.ops import hash_string

MAX_INT = 2**63 - 1


class FeatureSpecError(ValueError):
    """A feature spec that cannot be built or run; names the feature."""


def _salt_of(name: str) -> int:
    """The salt `hash(salt=True)` derives from a feature's name: its XXH64, in [0, 2**63)."""
    return hash_string(name) & MAX_INT


@dataclass(frozen=True)
class Hash:
    """XXH64 of the id's 8 bytes, seeded with ``salt``."""

    salt: int = 0


@dataclass(frozen=True)
class Mod:
    """The id, read as unsigned, modulo ``modulus``."""

    modulus: int


@dataclass(frozen=True)
class MultiHash:
    """``num_hashes`` independent hashes of every id, as keys ``{name}_0 .. {name}_{k-1}``."""

    num_hashes: int
    salt: int = 0


@dataclass(frozen=True)
class Truncate:
    """The first or last ``max_length`` ids of every bag."""

    max_length: int
    side: str = "first"


@dataclass(frozen=True)
class Bucketize:
    """A dense column -> one bucket id per sample: the number of boundaries <= x (NaN: len + 1)."""

    boundaries: Tuple[float, ...]


Op = Union[Hash, Mod, MultiHash, Truncate, Bucketize]
_OPS = {"hash": Hash, "mod": Mod, "multi_hash": MultiHash, "truncate": Truncate, "bucketize": Bucketize}
_NAMES = {cls: name for name, cls in _OPS.items()}


def _check_op(op: Op, where: str) -> None:
    if isinstance(op, Hash):
        if isinstance(op.salt, bool) or not isinstance(op.salt, int) or not 0 <= op.salt <= MAX_INT:
            raise FeatureSpecError(f"{where}: hash salt must be an integer in [0, 2**63), got {op.salt!r}")
    elif isinstance(op, Mod):
        if isinstance(op.modulus, bool) or not isinstance(op.modulus, int) or not 0 < op.modulus <= MAX_INT:
            raise FeatureSpecError(f"{where}: mod modulus must be an integer in [1, 2**63), got {op.modulus!r}")
    elif isinstance(op, MultiHash):
        if not isinstance(op.num_hashes, int) or op.num_hashes < 1:
            raise FeatureSpecError(f"{where}: multi_hash num_hashes must be >= 1, got {op.num_hashes!r}")
        if not isinstance(op.salt, int) or not 0 <= op.salt <= MAX_INT:
            raise FeatureSpecError(f"{where}: multi_hash salt must be an integer in [0, 2**63), got {op.salt!r}")
    elif isinstance(op, Truncate):
        if isinstance(op.max_length, bool) or not isinstance(op.max_length, int) or op.max_length <= 0:
            raise FeatureSpecError(f"{where}: truncate length must be an integer > 0, got {op.max_length!r}")
        if op.side not in ("first", "last"):
            raise FeatureSpecError(f"{where}: truncate side must be 'first' or 'last', got {op.side!r}")
    elif isinstance(op, Bucketize):
        b = op.boundaries
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in b):
            raise FeatureSpecError(f"{where}: bucketize boundaries must be finite numbers, got {list(b)}")
        bad = [i for i in range(1, len(b)) if b[i] < b[i - 1]]
        if bad:
            raise FeatureSpecError(
                f"{where}: bucketize boundaries must be sorted (non-decreasing); "
                f"{b[bad[0]]} follows {b[bad[0] - 1]} at position {bad[0]}"
            )
    else:
        raise FeatureSpecError(f"{where}: unknown op {op!r}")


class _Chain:
    """The chaining methods shared by Feature and Cross."""

    ops: Tuple[Op, ...]

    def _then(self, op: Op):
        return dataclasses.replace(self, ops=self.ops + (op,))

    def hash(self, salt: Union[int, bool] = 0):
        """XXH64 of each id; ``salt=True`` salts with the feature's name, so equal raw values in
        different features differ; an int salts with that value."""
        if salt is True:
            salt = _salt_of(self.output_name)
        elif salt is False:
            salt = 0
        return self._then(Hash(salt))

    def mod(self, modulus: int):
        return self._then(Mod(modulus))

    def multi_hash(self, num_hashes: int, salt: Union[int, bool] = 0):
        if salt is True:
            salt = _salt_of(self.output_name)
        elif salt is False:
            salt = 0
        return self._then(MultiHash(num_hashes, salt))

    def truncate(self, max_length: int, side: str = "first"):
        return self._then(Truncate(max_length, side))

    def output_names(self) -> List[str]:
        """The KJT keys this spec produces."""
        k = 1
        for op in self.ops:
            if isinstance(op, MultiHash):
                k *= op.num_hashes
        return [self.output_name] if k == 1 else [f"{self.output_name}_{r}" for r in range(k)]

    def _ops_dict(self) -> List[Dict[str, Any]]:
        out = []
        for op in self.ops:
            d = {"op": _NAMES[type(op)], **dataclasses.asdict(op)}
            if isinstance(op, Bucketize):
                d["boundaries"] = list(op.boundaries)
            out.append(d)
        return out


@dataclass(frozen=True)
class Feature(_Chain):
    """An output KJT key made from the input key (or dense column, for bucketize) ``source``.

    Args:
        source: the input KJT key, or the dense column ``bucketize`` reads.
        name: the output key (default: ``source``).
        ops: the chain, applied in order (built with the methods).
    """

    source: str
    name: str = ""
    ops: Tuple[Op, ...] = ()

    @property
    def output_name(self) -> str:
        return self.name or self.source

    def bucketize(self, boundaries: Sequence[float]):
        try:
            values = tuple(float(x) for x in boundaries)
        except (TypeError, ValueError):
            raise FeatureSpecError(
                f"feature {self.output_name!r}: bucketize boundaries must be numbers, got {boundaries!r}"
            ) from None
        return self._then(Bucketize(values))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        where = f"feature {self.output_name!r}"
        if not isinstance(self.source, str) or not self.source:
            raise FeatureSpecError(f"feature spec: source must be a non-empty column name, got {self.source!r}")
        for i, op in enumerate(self.ops):
            _check_op(op, where)
            if isinstance(op, Bucketize) and i != 0:
                raise FeatureSpecError(f"{where}: bucketize reads a dense column, so it must come first")

    @property
    def is_dense(self) -> bool:
        return bool(self.ops) and isinstance(self.ops[0], Bucketize)

    def to_dict(self) -> Dict[str, Any]:
        return {"type": "feature", "source": self.source, "name": self.name, "ops": self._ops_dict()}


@dataclass(frozen=True)
class Cross(_Chain):
    """Every pair (a, b) of a sample's bags ``left`` x ``right``, hashed to one id (weights multiply).

    Args:
        left, right: input KJT keys.
        name: the output key (default ``"{left}_x_{right}"``).
        salt: the cross hash's seed.
        ops: what follows the cross (mod, truncate, hash, multi_hash).
    """

    left: str
    right: str
    name: str = ""
    salt: int = 0
    ops: Tuple[Op, ...] = ()

    @property
    def output_name(self) -> str:
        return self.name or f"{self.left}_x_{self.right}"

    def validate(self) -> None:
        where = f"cross {self.output_name!r}"
        for side in (self.left, self.right):
            if not isinstance(side, str) or not side:
                raise FeatureSpecError(f"{where}: left and right must be input key names, got {side!r}")
        if not isinstance(self.salt, int) or not 0 <= self.salt <= MAX_INT:
            raise FeatureSpecError(f"{where}: salt must be an integer in [0, 2**63), got {self.salt!r}")
        for op in self.ops:
            _check_op(op, where)
            if isinstance(op, Bucketize):
                raise FeatureSpecError(f"{where}: bucketize reads a dense column; it cannot follow a cross")

    is_dense = False

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> Dict[str, Any]:
        return {"type": "cross", "left": self.left, "right": self.right, "name": self.name, "salt": self.salt,
                "ops": self._ops_dict()}


Spec = Union[Feature, Cross]


def spec_from_dict(d: Dict[str, Any]) -> Spec:
    """The inverse of ``spec.to_dict()``."""
    if isinstance(d, dict) and "type" not in d:
        d = dict(d, type="cross" if "left" in d else "feature")
    if not isinstance(d, dict) or d.get("type") not in ("feature", "cross"):
        raise FeatureSpecError(f"feature spec: expected a dict with type 'feature' or 'cross', got {d!r}")
    ops = []
    for o in d.get("ops", []):
        o = dict(o)
        kind = o.pop("op", None)
        if kind not in _OPS:
            raise FeatureSpecError(f"feature spec {d.get('name') or d.get('source')}: unknown op {kind!r}")
        if kind == "bucketize":
            o["boundaries"] = tuple(float(x) for x in o.get("boundaries", ()))
        if kind in ("hash", "multi_hash") and o.get("salt") is True:  # salted by the output name
            o["salt"] = _salt_of(d.get("name") or d.get("source") or f"{d.get('left')}_x_{d.get('right')}")
        elif kind in ("hash", "multi_hash") and o.get("salt") is False:
            o["salt"] = 0
        try:
            ops.append(_OPS[kind](**o))
        except TypeError as e:
            raise FeatureSpecError(f"feature spec: op {kind}: {e}") from None
    unknown = sorted(set(d) - ({"type", "source", "name", "ops"} if d["type"] == "feature"
                               else {"type", "left", "right", "name", "salt", "ops"}))
    if unknown:
        raise FeatureSpecError(f"feature spec {d.get('name') or d.get('source') or d.get('left')}: unknown keys {unknown}")
    try:
        if d["type"] == "feature":
            spec: Spec = Feature(d["source"], d.get("name", ""), tuple(ops))
        else:
            spec = Cross(d["left"], d["right"], d.get("name", ""), int(d.get("salt", 0)), tuple(ops))
    except KeyError as e:
        raise FeatureSpecError(f"feature spec {d!r}: missing {e}") from None
    return spec


__all__ = ["Bucketize", "Cross", "Feature", "FeatureSpecError", "Hash", "Mod", "MultiHash", "Spec", "Truncate",
           "spec_from_dict"]
