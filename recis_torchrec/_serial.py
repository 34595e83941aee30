# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The one dict (JSON) form of the config dataclasses: ``HashTableOptions``, ``Schema``,
``TrainingArguments`` and a package's module entries. Standard library only, below every layer."""

import dataclasses
from typing import Any, Dict, Mapping


def _plain(value: Any) -> Any:
    """JSON's shapes: tuples as lists, mappings as dicts, recursively."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class DictConfig:
    """``to_dict``/``from_dict`` for a config dataclass. ``from_dict`` names unknown fields and, for
    a class with a ``version`` field, refuses a version it does not read (a missing one is the
    current): a dict written by a later format is an error, never a guess."""

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        name = cls.__name__
        if not isinstance(d, Mapping):
            raise ValueError(f"{name}.from_dict: expected a mapping of its fields, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"{name}.from_dict: unknown fields {unknown}")
        if "version" in fields:
            supported = fields["version"].default
            if d.get("version", supported) != supported:
                raise ValueError(f"{name}.from_dict: version {d['version']!r} is not supported (this code reads "
                                 f"version {supported})")
        return cls(**d)
