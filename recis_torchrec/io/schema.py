# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``Schema``: which columns of a file become dense features, KJT keys, weights and labels."""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from recis_torchrec._serial import DictConfig

DENSE_TRANSFORMS = ("none", "log1p", "standardize")
# Internal column holding the weights of a delimited "id:weight" list column (no file has it).
WEIGHTS_SUFFIX = "\x00weights"

Columns = Union[str, Sequence[str]]


@dataclass(frozen=True)
class Schema(DictConfig):
    """The columns a :class:`ColumnarDataset` reads and what it makes of them.

    Attributes:
        dense: float (or integer) columns, stacked into ``dense_features`` (B, len(dense)).
        sparse: KJT key -> column, or a list of columns gathered into one bag
            (or sequence), in their order (``his_cate_1 .. his_cate_50``). A
            column named more than once in a CSV/TSV header (50 columns named
            ``his_cate``) is every column of that name, by position. A column
            may hold an int64 (or any integer) scalar, a string, ``list<int64>``
            or ``list<string>``, or in CSV/TSV a delimited list (``list_delimiter``).
            Strings are hashed to int64 with XXH64 (``hash_seed``), see
            :func:`recis_torchrec.io.hash_string`. A scalar is a bag of one id.
            In CSV/TSV files an id written as a decimal integer (no leading
            zero) is that integer, whatever else the column holds, so a column's
            ids do not depend on what the reader infers for one file or another.
        weights: KJT key -> ``list<float>`` column holding one weight per id
            of that key's column (per-sample weights). Keys without one get 1.0.
        labels: label columns; one gives ``labels`` (B,), several (B, n).
        defaults: column -> value used where the column is null. A null dense
            or label value becomes ``defaults.get(col, dense_default)``; a null
            sparse value becomes an empty bag, or a bag of the column's
            default id (an int, or a string that is hashed) when it has one.
            Null ids inside a list are dropped.
        dense_default: the value of null dense and label entries without a default.
        dense_transform: ``"none"``, ``"log1p"`` (``log(1 + max(x, 0))``, the usual
            treatment of Criteo's count features) or ``"standardize"`` (``(x - mean) / std``
            with ``dense_stats``), for every dense column, or a dict by column (columns it
            does not name: ``"none"``). It applies to ``dense_features`` only: a feature
            engine's ``bucketize`` reads the raw values.
        dense_stats: column -> ``(mean, std)`` for ``"standardize"`` (the training CLI
            computes them from the training files when they are not given).
        masks: KJT key -> mask column(s), aligned with its gathered columns: an id is
            kept where its mask is non-zero (padding positions of a fixed-width history).
        list_delimiter: CSV/TSV: the delimiter of list columns written as one field
            (``"170301^573514"``): a string for every sparse column, or a dict by column.
        weight_delimiter: CSV/TSV: in delimited lists, items ``id<delimiter>weight``
            (``"12:0.5"``) give the key per-sample weights (an item without one weighs 1).
        column_names: CSV/TSV without a header: the columns in order (every file of the
            dataset is then read as header-less).
        hash_seed: XXH64 seed for string ids.
        version: schema version, for ``to_dict``/``from_dict``.
    """

    dense: Tuple[str, ...] = ()
    sparse: Mapping[str, str] = field(default_factory=dict)
    weights: Mapping[str, str] = field(default_factory=dict)
    labels: Tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    dense_default: float = 0.0
    dense_transform: Any = "none"
    hash_seed: int = 0
    dense_stats: Mapping[str, Tuple[float, float]] = field(default_factory=dict)
    masks: Mapping[str, Columns] = field(default_factory=dict)
    list_delimiter: Any = None
    weight_delimiter: Optional[str] = None
    column_names: Tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense", tuple(self.dense))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "sparse", dict(self.sparse))
        object.__setattr__(self, "weights", dict(self.weights))
        object.__setattr__(self, "defaults", dict(self.defaults))
        object.__setattr__(self, "sparse", {k: _columns(v, f"Schema.sparse[{k!r}]") for k, v in self.sparse.items()})
        object.__setattr__(self, "masks", {k: _columns(v, f"Schema.masks[{k!r}]") for k, v in self.masks.items()})
        object.__setattr__(self, "dense_stats", {c: tuple(v) for c, v in dict(self.dense_stats).items()})
        for c, stat in self.dense_stats.items():
            ok = len(stat) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in stat)
            if not ok or not math.isfinite(stat[0]) or not math.isfinite(stat[1]) or stat[1] <= 0:
                raise ValueError(f"Schema.dense_stats[{c!r}] must be (mean, std) with a finite mean and a finite std > 0, "
                                 f"got {stat!r} (a constant column cannot be standardized)")
        object.__setattr__(self, "column_names", tuple(self.column_names))
        if not self.dense and not self.sparse:
            raise ValueError("Schema: declare at least one dense or sparse column")
        for k, m in self.masks.items():
            if k not in self.sparse:
                raise ValueError(f"Schema.masks names KJT key {k!r}, which is not in Schema.sparse")
            if _count(m) != _count(self.sparse[k]):
                raise ValueError(
                    f"Schema.masks[{k!r}] has {_count(m)} columns but Schema.sparse[{k!r}] has {_count(self.sparse[k])}"
                )
        if self.list_delimiter is not None:
            delims = self.list_delimiter if isinstance(self.list_delimiter, Mapping) else {"*": self.list_delimiter}
            for c, d in delims.items():
                if not isinstance(d, str) or not d:
                    raise ValueError(f"Schema.list_delimiter for {c!r} must be a non-empty string, got {d!r}")
            if isinstance(self.list_delimiter, Mapping):
                object.__setattr__(self, "list_delimiter", dict(self.list_delimiter))
                sparse_cols = set(self.sparse_columns())
                unknown = sorted(set(self.list_delimiter) - sparse_cols)
                if unknown:  # a typo would leave the column read as one id per row
                    raise ValueError(f"Schema.list_delimiter names columns {unknown} that are not sparse columns "
                                     f"({sorted(sparse_cols)})")
        if self.weight_delimiter is not None:
            if not isinstance(self.weight_delimiter, str) or not self.weight_delimiter:
                raise ValueError(f"Schema.weight_delimiter must be a non-empty string, got {self.weight_delimiter!r}")
            if self.list_delimiter is None:
                raise ValueError("Schema.weight_delimiter splits the items of delimited lists: set list_delimiter too")
            delims = self.list_delimiter.values() if isinstance(self.list_delimiter, Mapping) else [self.list_delimiter]
            if self.weight_delimiter in delims:
                raise ValueError(f"Schema.weight_delimiter {self.weight_delimiter!r} is also a list delimiter: an item "
                                 "could not be told from its weight")
        unknown = sorted(set(self.weights) - set(self.sparse))
        if unknown:
            raise ValueError(f"Schema.weights names KJT keys {unknown} that are not in Schema.sparse")
        transforms = self.dense_transform if isinstance(self.dense_transform, Mapping) else None
        if transforms is not None:
            object.__setattr__(self, "dense_transform", dict(transforms))
            unknown = sorted(set(transforms) - set(self.dense))
            if unknown:
                raise ValueError(f"Schema.dense_transform names columns {unknown} that are not dense columns")
        for c, t in (transforms or {"*": self.dense_transform}).items():
            if t not in DENSE_TRANSFORMS:
                raise ValueError(f"Schema.dense_transform{'' if c == '*' else f'[{c!r}]'} must be one of "
                                 f"{DENSE_TRANSFORMS}, got {t!r}")
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
        cols = list(self.dense) + list(self.labels)
        for spec in list(self.sparse.values()) + list(self.masks.values()):
            cols += [spec] if isinstance(spec, str) else list(spec)
        cols += list(self.weights.values())
        return tuple(dict.fromkeys(cols))

    def sparse_columns(self) -> Tuple[str, ...]:
        """The columns holding ids (every column of a gathered key)."""
        out: List[str] = []
        for spec in self.sparse.values():
            out += [spec] if isinstance(spec, str) else list(spec)
        return tuple(dict.fromkeys(out))

    def transform_of(self, column: str) -> str:
        """The dense transform of a dense column."""
        if isinstance(self.dense_transform, Mapping):
            return self.dense_transform.get(column, "none")
        return self.dense_transform

    def delimiter_of(self, column: str) -> Optional[str]:
        """The list delimiter of a CSV/TSV column, or None."""
        if self.list_delimiter is None:
            return None
        if isinstance(self.list_delimiter, Mapping):
            return self.list_delimiter.get(column)
        return self.list_delimiter

    def resolve(self, repeated: Mapping[str, Sequence[str]]) -> "Schema":
        """This schema with every sparse or mask column that names a repeated header (``repeated``:
        name -> the columns it became, by position) replaced by those columns."""
        if not repeated:
            return self

        def expand(spec):
            cols = [spec] if isinstance(spec, str) else list(spec)
            out = []
            for c in cols:
                out += list(repeated.get(c, [c]))
            return out[0] if len(out) == 1 else tuple(out)

        delim = self.list_delimiter
        if isinstance(delim, Mapping):
            delim = {c2: d for c, d in delim.items() for c2 in repeated.get(c, [c])}
        return dataclasses.replace(
            self,
            sparse={k: expand(v) for k, v in self.sparse.items()},
            masks={k: expand(v) for k, v in self.masks.items()},
            list_delimiter=delim,
        )



def _columns(spec: Any, where: str) -> Columns:
    """A column name, or a tuple of them (gathered in order)."""
    if isinstance(spec, str) and spec:
        return spec
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(c, str) and c for c in spec):
        return spec[0] if len(spec) == 1 else tuple(spec)
    raise ValueError(f"{where} must be a column name or a non-empty list of them, got {spec!r}")


def _count(spec: Columns) -> int:
    return 1 if isinstance(spec, str) else len(spec)


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
