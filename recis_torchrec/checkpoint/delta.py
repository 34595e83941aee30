# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Incremental export: the rows written, and the ids evicted, since a step.

Steps here are the tables' update counts (one per training backward), which
the full checkpoints record for every table; ``since`` may name such a
checkpoint instead of a number. A serving system applies a delta on top of the
checkpoint it was taken against: evicted ids are dropped first, then the rows
are written.
"""

import os
import uuid
from typing import Any, Dict, List, Union

import torch
from torch import nn

from recis_torchrec.checkpoint.files import (
    broadcast_object,
    gather_objects,
    CheckpointError,
    all_ok,
    barrier,
    check_supported,
    fsync_dir,
    hash_tables,
    index_checksum,
    rank_and_world,
    read_index,
    read_tensors,
    write_json,
    write_tensors,
)
from recis_torchrec.checkpoint.saver import (
    FORMAT_VERSION,
    owned_mask,
    safe_key,
    apply_table,
    resolve,
    stage_table,
    table_config,
    write_table_files,
)


def _since_per_table(since: Union[int, str]) -> Dict[str, int]:
    if isinstance(since, int):
        return {}
    index = read_index(resolve(since))
    return {key: max(t["steps"].values(), default=0) for key, t in index["tables"].items()}


def export_delta(
    path: str, model: nn.Module, since_step: Union[int, str], max_file_bytes: int = 256 << 20
) -> str:
    """Writes the rows updated or created after `since_step`, and the ids evicted
    since, into the directory `path` (atomically); call it on every rank.

    Args:
        path: the delta's directory (must not exist yet).
        model: the model whose tables to export.
        since_step: a table update count, or the path of a full checkpoint whose
            recorded counts to use.
    """
    check_supported(model)
    rank, world = rank_and_world()
    if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
        raise CheckpointError(f"export_delta: {path} exists and is not an empty directory; a delta is written "
                              "to a new path (nothing was deleted)")
    per_table = _since_per_table(since_step)
    tmp = broadcast_object(f"{path}.tmp-{uuid.uuid4().hex[:8]}" if rank == 0 else None)
    if rank == 0:
        os.makedirs(tmp)
    barrier()
    refs = hash_tables(model)
    files: List[Dict[str, Any]] = []
    for ref in refs:
        if not ref.sharded and rank != 0:
            continue
        since = per_table.get(ref.key, since_step if isinstance(since_step, int) else 0)
        entries = write_table_files(tmp, ref, rank, max_file_bytes, since=since)
        evicted, at = ref.table.evicted_since(since)
        table_dir = os.path.join(tmp, "tables", safe_key(ref.key))
        ev = write_tensors(os.path.join(table_dir, f"rank{rank}-evicted.safetensors"), {"ids": evicted, "steps": at})
        ev["file"] = os.path.relpath(os.path.join(table_dir, f"rank{rank}-evicted.safetensors"), tmp)
        files += [dict(e, table=ref.key) for e in entries] + [dict(ev, table=ref.key, evicted=True, rank=rank)]
    gathered = gather_objects(files)
    if rank == 0:
        steps = {ref.key: ref.optimizer.steps()[ref.table.name] for ref in refs}
        # "since"/"to": the update counts the delta goes from and to; a server applies it only to a
        # package at a version in between (deltas since one checkpoint are cumulative).
        tables = {ref.key: dict(table_config(ref), since=per_table.get(ref.key, since_step),
                                since_steps=per_table.get(ref.key, since_step if isinstance(since_step, int) else 0),
                                to=steps[ref.key], files=[], evicted=[])
                  for ref in refs}
        for r_files in gathered:
            for e in r_files:
                slot = "evicted" if e.get("evicted") else "files"
                tables[e["table"]][slot].append({k: v for k, v in e.items() if k not in ("table", "evicted")})
        index = {"format": FORMAT_VERSION, "kind": "delta", "tables": tables}
        index["xxh64"] = index_checksum(index)
        write_json(os.path.join(tmp, "index.json"), index)
        for root, _, _ in os.walk(tmp):
            fsync_dir(root)
        if os.path.isdir(path):
            os.rmdir(path)  # empty (checked above)
        os.replace(tmp, path)
    barrier()
    return path


def apply_delta(path: str, model: nn.Module) -> None:
    """Applies a delta written by :func:`export_delta` to `model`; call it on every rank."""
    rank, world = rank_and_world()
    error = ""
    staged, dropped = {}, {}
    refs = hash_tables(model)
    try:
        index = read_index(path)
        if index.get("kind") != "delta":
            raise CheckpointError(f"{path}: not a delta (kind {index.get('kind')!r})")
        for ref in refs:
            entry = index["tables"].get(ref.key)
            if entry is None:
                raise CheckpointError(f"table {ref.key!r} is not in the delta {path}")
            staged[ref.key] = stage_table(path, ref, entry, rank, world)
            ids = [read_tensors(path, e)["ids"] for e in entry["evicted"]]
            ids = torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64)
            dropped[ref.key] = ids[owned_mask(ref, ids, rank, world)]
    except (CheckpointError, OSError, KeyError, ValueError) as e:
        error = str(e) if isinstance(e, CheckpointError) else f"{path}: {type(e).__name__}: {e}"
    all_ok(not error, error)
    for ref in refs:
        if dropped[ref.key].numel():
            ref.table.erase(dropped[ref.key])
        apply_table(ref, staged[ref.key], replace=False)
    barrier()
