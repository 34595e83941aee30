# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``torch.distributed.checkpoint`` (DCP) for models with hash tables.

Saving needs nothing of ours: ``dcp.save({"model": dmp.state_dict(), "optim":
dmp.fused_optimizer.state_dict(), ...}, checkpoint_id=path)`` writes the dense parameters,
TorchRec-sharded tables and every rank's hash-table rows (each row group is a global tensor of
which each rank writes its shard; see ``recis_torchrec.tables.state_rows``).

A hash table's size is only known from the checkpoint, so loading needs :class:`DCPLoadPlanner`::

    state = {"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=path, planner=rt.checkpoint.DCPLoadPlanner())
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["optim"])

The planner replaces each hash row group of ``state`` (found by the ``_recis_rows`` mark its
tensors carry) with buffers sized from the checkpoint's metadata: the saved shards of every rank
that may hold ids this rank owns at the current world size (ownership is a monotone function of a
64-bit hash, so saved rank ``k`` of ``W`` shares ids with new rank ``r`` of ``W'`` exactly when
``k / W < (r + 1) / W'`` and ``r / W' < (k + 1) / W``), and every row for an unsharded module.
``load_state_dict`` then keeps this rank's ids. Everything else loads as DCP loads it. Without the
planner, DCP refuses a size mismatch; where sizes happen to agree, ``load_state_dict`` refuses
rows this rank does not own, so no row is dropped silently.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from recis_torchrec.checkpoint.files import CheckpointError
from recis_torchrec.tables.state_rows import LOADED_ATTR, ROWS_ATTR, SHARDS, Owner


def _walk(container: Any, path: Tuple[str, ...], out: List[Tuple[Any, Any, str]]) -> None:
    items = container.items() if isinstance(container, dict) else enumerate(container)
    for k, v in items:
        fqn = ".".join(path + (str(k),))
        if isinstance(v, (dict, list)):
            _walk(v, path + (str(k),), out)
        elif isinstance(v, torch.Tensor) and hasattr(v, ROWS_ATTR):
            out.append((container, k, fqn))


def _saved_layout(prefix: str, members: List[str], metadata: Metadata) -> Tuple[List[int], List[int]]:
    """(rows per saved rank, first row per saved rank) of a row group in the checkpoint."""
    md = metadata.state_dict_metadata
    marker = md.get(f"{prefix}.{SHARDS}")
    if marker is None:  # saved unsharded: one block of rows
        for m in members:
            entry = md.get(f"{prefix}.{m}")
            if isinstance(entry, TensorStorageMetadata):
                return [int(entry.size[0])], [0]
        return [], []
    if not isinstance(marker, TensorStorageMetadata):
        raise CheckpointError(f"checkpoint entry {prefix}.{SHARDS} is not a tensor")
    chunks = sorted(marker.chunks, key=lambda c: int(c.offsets[0]))
    counts, offsets, at, row = [], [], 0, 0
    for c in chunks:
        if int(c.offsets[0]) != at or int(c.sizes[0]) < 1:
            raise CheckpointError(
                f"checkpoint entry {prefix}.{SHARDS}: the saved ranks' shards do not tile it (a shard at "
                f"{int(c.offsets[0])} of size {int(c.sizes[0])}, expected one at {at}); a rank's shard is missing"
            )
        counts.append(int(c.sizes[0]) - 1)
        offsets.append(row)
        at += int(c.sizes[0])
        row += int(c.sizes[0]) - 1
    if at != int(marker.size[0]):
        raise CheckpointError(
            f"checkpoint entry {prefix}.{SHARDS}: shards cover {at} of {int(marker.size[0])} elements; "
            "a rank's shard is missing"
        )
    return counts, offsets


def _wanted(owner: Optional[Owner], saved_world: int) -> List[int]:
    """The saved ranks whose ids may be owned by ``owner`` (all of them for an unsharded module)."""
    if owner is None or saved_world <= 1 or owner.world_size <= 1:
        return list(range(saved_world))
    w, r = owner.world_size, owner.rank
    return [k for k in range(saved_world) if k * w < (r + 1) * saved_world and r * saved_world < (k + 1) * w]


def _buffer(
    fqn: str, entry: TensorStorageMetadata, picks: List[Tuple[int, int]], sharded_save: bool
) -> torch.Tensor:
    """The rows ``picks`` = [(first row, count)] of a saved member, as one local tensor DCP fills."""
    rest = tuple(int(s) for s in entry.size[1:])
    total = sum(n for _, n in picks)
    t = torch.empty((total,) + rest, dtype=entry.properties.dtype)
    zeros = (0,) * len(rest)
    if sharded_save:
        have = {(int(c.offsets[0]), int(c.sizes[0])) for c in entry.chunks}
        for first, n in picks:
            if n and (first, n) not in have:
                raise CheckpointError(
                    f"checkpoint entry {fqn}: rows [{first}, {first + n}) of a saved rank are missing"
                )
    picks = [(first, n) for first, n in picks if n]
    t.global_shape = tuple(int(s) for s in entry.size)
    t.global_offsets = tuple((first,) + zeros for first, _ in picks)
    local, at = [], 0
    for _, n in picks:
        local.append((at,) + zeros)
        at += n
    t.local_offsets = tuple(local)
    t.local_sizes = tuple((n,) + rest for _, n in picks)
    setattr(t, LOADED_ATTR, True)
    return t


def resize_hash_rows(state_dict: Dict[str, Any], metadata: Metadata) -> None:
    """Replaces, in place, every hash row group of ``state_dict`` with buffers for the saved rows
    this rank needs (see the module docstring)."""
    found: List[Tuple[Any, Any, str]] = []
    _walk(state_dict, (), found)
    groups: Dict[str, List[Tuple[Any, Any, str]]] = {}
    for container, key, fqn in found:
        groups.setdefault(fqn.rsplit(".", 1)[0], []).append((container, key, fqn))
    md = metadata.state_dict_metadata
    for prefix, entries in groups.items():
        owner = getattr(entries[0][0][entries[0][1]], ROWS_ATTR)
        members = [fqn.rsplit(".", 1)[1] for _, _, fqn in entries]
        counts, firsts = _saved_layout(prefix, [m for m in members if m != SHARDS], metadata)
        sharded_save = f"{prefix}.{SHARDS}" in md
        picks = [(firsts[k], counts[k]) for k in _wanted(owner, len(counts))]
        for (container, key, fqn), member in zip(entries, members):
            if member == SHARDS:
                del container[key]  # the layout is known; the marker's bytes are not needed
                continue
            entry = md.get(fqn)
            if entry is None:
                continue  # DCP reports the missing key
            if not isinstance(entry, TensorStorageMetadata) or int(entry.size[0]) != sum(counts):
                raise CheckpointError(
                    f"checkpoint entry {fqn}: expected a tensor of {sum(counts)} rows (the row group's), got {entry}"
                )
            new = _buffer(fqn, entry, picks, sharded_save)
            setattr(new, ROWS_ATTR, owner)
            container[key] = new


class DCPLoadPlanner(DefaultLoadPlanner):
    """DCP's ``DefaultLoadPlanner``, plus hash-table row groups sized from the checkpoint.

    Pass it to ``torch.distributed.checkpoint.load(state, checkpoint_id=..., planner=...)``,
    then give ``state``'s parts to ``load_state_dict`` as usual; see the module docstring.
    """

    def set_up_planner(
        self, state_dict: Dict[str, Any], metadata: Optional[Metadata] = None, is_coordinator: bool = False
    ) -> None:
        if metadata is None:
            raise CheckpointError("DCPLoadPlanner needs the checkpoint's metadata")
        resize_hash_rows(state_dict, metadata)
        super().set_up_planner(state_dict, metadata, is_coordinator)


__all__ = ["DCPLoadPlanner", "resize_hash_rows"]
