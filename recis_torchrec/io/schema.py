# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``Schema``: which columns of a file become dense features, KJT keys, weights and labels."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

DENSE_TRANSFORMS = ("none", "log1p")


@dataclass(frozen=True)
class Schema:
    """The columns a :class:`ColumnarDataset` reads and what it makes of them.

    Attributes:
        dense: float (or integer) columns, stacked into ``dense_features`` (B, len(dense)).
        sparse: KJT key -> column. A column may hold an int64 (or any
            integer) scalar, a string, ``list<int64>`` or ``list<string>``.
            Strings are hashed to int64 with XXH64 (``hash_seed``), see
            :func:`recis_torchrec.io.hash_string`. A scalar is a bag of one id.
        weights: KJT key -> ``list<float>`` column holding one weight per id
            of that key's column (per-sample weights). Keys without one get 1.0.
        labels: label columns; one gives ``labels`` (B,), several (B, n).
        defaults: column -> value used where the column is null. A null dense
            or label value becomes ``defaults.get(col, dense_default)``; a null
            sparse value becomes an empty bag, or a bag of the column's
            default id (an int, or a string that is hashed) when it has one.
            Null ids inside a list are dropped.
        dense_default: the value of null dense and label entries without a default.
        dense_transform: ``"none"`` or ``"log1p"`` (``log(1 + max(x, 0))``,
            the usual treatment of Criteo's count features).
        hash_seed: XXH64 seed for string ids.
        version: schema version, for ``to_dict``/``from_dict``.
    """

    dense: Tuple[str, ...] = ()
    sparse: Mapping[str, str] = field(default_factory=dict)
    weights: Mapping[str, str] = field(default_factory=dict)
    labels: Tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    dense_default: float = 0.0
    dense_transform: str = "none"
    hash_seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense", tuple(self.dense))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "sparse", dict(self.sparse))
        object.__setattr__(self, "weights", dict(self.weights))
        object.__setattr__(self, "defaults", dict(self.defaults))
        if not self.dense and not self.sparse:
            raise ValueError("Schema: declare at least one dense or sparse column")
        unknown = sorted(set(self.weights) - set(self.sparse))
        if unknown:
            raise ValueError(f"Schema.weights names KJT keys {unknown} that are not in Schema.sparse")
        if self.dense_transform not in DENSE_TRANSFORMS:
            raise ValueError(f"Schema.dense_transform must be one of {DENSE_TRANSFORMS}, got {self.dense_transform!r}")
        if not 0 <= self.hash_seed < 2**64:
            raise ValueError(f"Schema.hash_seed must be in [0, 2**64), got {self.hash_seed}")
        if self.version != 1:
            raise ValueError(f"Schema.version {self.version} is not supported (this release writes 1)")
        seen: Dict[str, str] = {}
        for role, cols in (("dense", self.dense), ("label", self.labels)):
            for c in cols:
                if c in seen:
                    raise ValueError(f"Schema: column {c!r} is declared twice ({seen[c]} and {role})")
                seen[c] = role

    def columns(self) -> Tuple[str, ...]:
        """Every column the schema reads, each once."""
        cols = list(self.dense) + list(self.labels) + list(self.sparse.values()) + list(self.weights.values())
        return tuple(dict.fromkeys(cols))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dense"], d["labels"] = list(self.dense), list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Schema":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Schema.from_dict: unknown fields {unknown}")
        return cls(**d)


CRITEO_LABEL = "label"
CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))


def criteo_schema(dense_transform: str = "log1p") -> Schema:
    """The Criteo Display Advertising layout: label, I1..I13, C1..C26.

    KJT keys are TorchRec's Criteo names (``cat_0``..``cat_25``, see
    ``torchrec.datasets.criteo.DEFAULT_CAT_NAMES``); the hex categorical
    strings are hashed with XXH64; empty fields are null: a missing count is 0
    (before ``log1p``) and a missing category an empty bag.
    """
    return Schema(
        dense=CRITEO_DENSE,
        sparse={f"cat_{i}": c for i, c in enumerate(CRITEO_SPARSE)},
        labels=(CRITEO_LABEL,),
        dense_transform=dense_transform,
    )
