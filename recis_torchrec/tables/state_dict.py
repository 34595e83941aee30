# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The hash tables in a module's state dict: saving, loading (rows replaced, a shard's ids kept)
and TorchRec weights imported as ids ``0..n-1``."""

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.tables.state_rows import SHARDS, Owner, RowShards, gather_counts, is_partial, put_rows

# Each table appears in a state dict as "embedding_bags.{table}.weight" (rows, ordered by id) plus
# "embedding_bags.{table}.ids"; tables with TTL or a capacity cap add ".meta" (last_seen,
# last_update, freq per row), tables with admission ".pending.ids"/".pending.counts". Sharded,
# each is this rank's shard of a global tensor (state_rows.py). A TorchRec EBC state dict
# (weight only) loads too: its row i becomes id i.


def _row_groups(tables: Mapping[str, HashTable], prefix: str, section: str):
    """(key prefix, members) of every row group of the tables, in a fixed order."""
    groups = []
    for name, table in tables.items():
        ids, weights, _, meta = table.export_rows()
        order = torch.argsort(ids)
        members = {"weight": weights[order], "ids": ids[order]}
        options = table.options
        if options.ttl_steps or options.max_capacity:
            members["meta"] = meta[order]
        groups.append((f"{prefix}{section}.{name}", members))
        if options.admit_threshold > 1:
            pids, pcounts = table.export_pending()
            order = torch.argsort(pids)
            groups.append((f"{prefix}{section}.{name}.pending", {"ids": pids[order], "counts": pcounts[order]}))
    return groups


def save_tables(
    tables: Mapping[str, HashTable],
    destination: Dict[str, Any],
    prefix: str,
    section: str = "embedding_bags",
    sharding: Optional[Tuple[Any, Owner, torch.device]] = None,
) -> None:
    """Writes every table's row groups into a state dict. ``sharding`` = (process group, this
    rank, device for the collective): the rows are this rank's shards (collective)."""
    groups = _row_groups(tables, prefix, section)
    counts = None
    if sharding is not None:
        pg, owner, device = sharding
        counts = gather_counts(pg, [next(iter(m.values())).shape[0] for _, m in groups], device)
    for g, (key, members) in enumerate(groups):
        put_rows(destination, key, members, RowShards(sharding[1], tuple(counts[g])) if counts else None)


def load_tables(
    tables: Mapping[str, HashTable],
    state_dict: Mapping[str, Any],
    prefix: str,
    missing_keys: List[str],
    error_msgs: List[str],
    keep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    section: str = "embedding_bags",
) -> set:
    """Replaces each table's rows with those of a state dict; returns the keys used.

    ``keep(ids) -> bool mask`` selects the rows to import (a shard's own ids). A table whose
    weight is not in the state dict is left as it is (and reported missing)."""
    used = set()
    for name, table in tables.items():
        key = f"{prefix}{section}.{name}"
        pkey = f"{key}.pending"
        used.update(f"{key}.{m}" for m in ("weight", "ids", "meta", SHARDS))
        used.update(f"{pkey}.{m}" for m in ("ids", "counts", SHARDS))
        wkey = f"{key}.weight"
        if wkey not in state_dict:
            missing_keys.append(wkey)
            continue
        weight = state_dict[wkey]
        ids = state_dict.get(f"{key}.ids")
        if ids is None:
            ids = torch.arange(weight.shape[0], dtype=torch.int64)
        meta = state_dict.get(f"{key}.meta")
        if weight.dim() != 2 or weight.shape[1] != table.dim or ids.shape != (weight.shape[0],):
            error_msgs.append(
                f"table {name!r}: expected weight (n, {table.dim}) and ids (n,), got weight "
                f"{tuple(weight.shape)} and ids {tuple(ids.shape)}"
            )
            continue
        if meta is not None and tuple(meta.shape) != (weight.shape[0], 3):
            error_msgs.append(f"table {name!r}: expected meta ({weight.shape[0]}, 3), got {tuple(meta.shape)}")
            continue
        if weight.is_meta:
            continue
        ids = ids.to(torch.int64).cpu()
        weight = weight.detach().cpu()
        pending = (state_dict.get(f"{pkey}.ids"), state_dict.get(f"{pkey}.counts"))
        if keep is not None:
            mask = keep(ids)
            if is_partial(state_dict[wkey]) and not bool(mask.all()):
                error_msgs.append(
                    f"table {name!r}: the state dict holds one rank's shard of the table with rows this rank "
                    "does not own; load a torch.distributed.checkpoint with "
                    "planner=recis_torchrec.checkpoint.DCPLoadPlanner()"
                )
                continue
            ids, weight = ids[mask], weight[mask]
            meta = meta[mask] if meta is not None else None
            if pending[0] is not None:
                pmask = keep(pending[0].to(torch.int64).cpu())
                pending = (pending[0][pmask], pending[1][pmask])
        table.clear()
        table.import_(ids, weight.contiguous(), None, meta.to(torch.int64).cpu().contiguous() if meta is not None else None)
        if pending[0] is not None and pending[0].numel():
            table.import_pending(pending[0].cpu(), pending[1].cpu())
    return used


def import_rows(
    tables: Mapping[str, Any],
    weights: Mapping[str, Optional[torch.Tensor]],
    keep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> None:
    """Row i of each TorchRec weight becomes id i of the table of the same name (only the ids
    ``keep(ids)`` selects, when given). Missing or meta weights import nothing."""
    for name, weight in weights.items():
        if weight is None or weight.is_meta:
            continue
        ids = torch.arange(weight.shape[0], dtype=torch.int64)
        weight = weight.detach().to(device="cpu")
        if keep is not None:
            mask = keep(ids)
            ids, weight = ids[mask], weight[mask]
        tables[name].import_(ids, weight.contiguous(), None)
