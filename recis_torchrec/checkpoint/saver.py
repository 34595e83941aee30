# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``save`` / ``load``: safetensors checkpoints of hash tables and dense state, with resharding.

A checkpoint is a directory ``{root}/step_{step:010d}-{time}``:

- ``index.json``: the format version, step, world size, every file with its size
  and XXH64 checksum, every table's config (dim, optimizer, options, update
  count) and the dense optimizer's non-tensor state;
- ``tables/{table}/rank{r}-part{k}.safetensors``: each rank's rows of each hash
  table (``ids``, ``weights``, one tensor per optimizer state slot, and the row
  metadata ``last_seen``, ``last_update``, ``freq``; part 0 also holds the ids
  still counted for admission), in files of at most ``max_file_bytes``;
- ``dense.safetensors`` and ``optimizer.safetensors``: dense parameters and
  buffers, and the dense optimizer's tensors (rank 0);
- ``loader-rank{r}.json``: each rank's loader position.

Ranks write in parallel into a temporary directory that rank 0 renames into
place once every file is written and the index is on disk, so a crash at any
point leaves the previous checkpoint as it was. ``load`` reads and verifies
every file it needs before it changes anything in the model, and each rank
keeps the ids it owns under the current world size, so a checkpoint loads at
any world size, sharded or not.
"""

import dataclasses
import fnmatch
import json
import os
import shutil
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from recis_torchrec import _exit, ops
from recis_torchrec._ext import C
from recis_torchrec.ops.constants import ROW_META_COLUMNS
from recis_torchrec.checkpoint.files import (
    CheckpointError,
    broadcast_object,
    gather_objects,
    TableRef,
    all_ok,
    barrier,
    check_supported,
    dense_state,
    feature_order,
    saved_name,
    checksum,
    fsync_dir,
    hash_tables,
    index_checksum,
    inside,
    rank_and_world,
    read_index,
    read_json_checked,
    read_tensors,
    write_json,
    write_tensors,
)
from recis_torchrec.optim.fused import STATE_SLOTS

FORMAT_VERSION = 1
META_COLUMNS = ("last_seen", "last_update", "freq")
assert len(META_COLUMNS) == ROW_META_COLUMNS, "csrc/hashtable/constants.h changed the row metadata"


def _step_dir(root: str, step: int) -> str:
    # The time suffix keeps a re-save of a step from ever replacing a
    # checkpoint in place: the new one appears complete, then the old goes.
    return os.path.join(root, f"step_{step:010d}-{time.time_ns():x}")


def safe_key(key: str) -> str:
    return key.replace("/", "__")


def checkpoints(root: str) -> List[Tuple[int, str]]:
    """Complete checkpoints under a root, as (step, directory), oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        d = os.path.join(root, name)
        if name.startswith("step_") and ".tmp-" not in name and os.path.exists(os.path.join(d, "index.json")):
            try:
                out.append((int(name[5:].split("-", 1)[0]), name, d))  # steps of any number of digits
            except ValueError:
                continue
    return [(step, d) for step, _, d in sorted(out)]


def resolve(path: str) -> str:
    """A checkpoint directory: `path` itself, or the latest complete one under it."""
    if os.path.exists(os.path.join(path, "index.json")):
        return path
    found = checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no complete checkpoint (no index.json) there")
    return found[-1][1]


def _slot_tensors(ref: TableRef, state: torch.Tensor) -> Dict[str, torch.Tensor]:
    dim = ref.table.dim
    out = {}
    for slot, offset, width in STATE_SLOTS[ref.optimizer_code]:
        if width is None:
            out[slot] = state[:, offset * dim]
        else:
            out[slot] = state[:, offset * dim : (offset + width) * dim]
    return out


def _state_from_slots(ref: TableRef, tensors: Dict[str, torch.Tensor], n: int) -> Optional[torch.Tensor]:
    if ref.table.state_dim == 0:
        return None
    dim = ref.table.dim
    state = torch.zeros(n, ref.table.state_dim)
    for slot, offset, width in STATE_SLOTS[ref.optimizer_code]:
        if width is None:
            state[:, offset * dim] = tensors[slot]
        else:
            state[:, offset * dim : (offset + width) * dim] = tensors[slot]
    return state


def write_table_files(
    directory: str, ref: TableRef, rank: int, max_file_bytes: int, since: int = -1, durable: bool = True,
    share: float = 1.0,
) -> List[Dict[str, Any]]:
    """Writes this rank's rows of a table (updated after `since`); returns the index entries."""
    table_dir = os.path.join(directory, "tables", safe_key(ref.key))
    os.makedirs(table_dir, exist_ok=True)
    # The table streams through buffers of one file's worth of rows, reused
    # for every file (no fresh allocation, and its page faults, per file).
    table = ref.table
    dtype = getattr(table, "dtype", torch.float32)
    row_bytes = 8 + dtype.itemsize * table.dim + 4 * table.state_dim + 8 * 3
    per_file = max(1, min(max_file_bytes // row_bytes, max(len(table), 1)))
    if not isinstance(table, _TableSnapshot):
        ids = torch.empty(per_file, dtype=torch.int64)
        weights = torch.empty(per_file, table.dim, dtype=dtype)
        state = torch.empty(per_file, table.state_dim)
        meta = torch.empty(per_file, 3, dtype=torch.int64)
    entries = []
    start, k = 0, 0
    while True:
        if isinstance(table, _TableSnapshot):  # its rows are read into memory: write views of them
            ids, weights, state, meta = table.views(start, per_file)
            n = ids.numel()
            start += n
        else:
            n, start = table.export_chunk(start, since, ids, weights, state, meta)
        if n == 0 and k > 0:
            break
        tensors = {"ids": ids[:n], "weights": weights[:n]}
        tensors.update(_slot_tensors(ref, state[:n]))
        for j, col in enumerate(META_COLUMNS):
            tensors[col] = meta[:n, j]
        if k == 0:
            pending_ids, pending_counts = table.export_pending()
            tensors["pending_ids"], tensors["pending_counts"] = pending_ids, pending_counts
        path = os.path.join(table_dir, f"rank{rank}-part{k}.safetensors")
        entry = write_tensors(path, tensors, {"table": ref.key, "rank": str(rank)}, durable=durable, share=share)
        entry.update({"file": os.path.relpath(path, directory), "rank": rank, "rows": n})
        entries.append(entry)
        k += 1
        if n < per_file:
            break
    return entries


def table_lineage(table: Any) -> str:
    """The table's training-run id, given now if it has none."""
    if getattr(table, "lineage", None) is None:
        table.lineage = uuid.uuid4().hex
    return table.lineage


def table_config(ref: TableRef) -> Dict[str, Any]:
    return {
        "lineage": table_lineage(getattr(ref.table, "_table", ref.table)),  # a snapshot: its live table
        "module": ref.module_path,
        "table": ref.table.name,
        "dim": ref.table.dim,
        "state_dim": ref.table.state_dim,
        "dtype": str(getattr(ref.table, "dtype", torch.float32)).replace("torch.", ""),
        "optimizer": ref.optimizer_code,
        "sharded": ref.sharded,
        "options": ref.table.options.to_dict(),
    }


def _flatten_optimizer(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors, rest = {}, {"param_groups": state.get("param_groups", []), "state": {}}
    for idx, slots in state.get("state", {}).items():
        for name, v in slots.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{name}"] = v.detach().cpu()
            else:
                rest["state"].setdefault(str(idx), {})[name] = v
    return tensors, rest


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], rest: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, slots in rest.get("state", {}).items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": rest["param_groups"]}


class _TableSnapshot:
    """A table as it was when a background save started: what :func:`write_table_files` reads
    instead of the live table. Starting one copies nothing: a CPU table keeps a copy-on-write
    snapshot (a write to a row the snapshot has not read yet first copies the row's old value aside;
    see csrc/hashtable/embedding_blocks.h). The background writer first reads it whole (:meth:`read`)
    into host buffers kept for the next background save (refilling memory already faulted in is
    several times faster than filling a fresh allocation), which ends the snapshot, then writes the
    files from them at its own pace. The rows of a CUDA table, or of a table with rows on disk
    (``storage="ssd"``: its cache and its disk rows), are copied to host memory at the start."""

    def __init__(self, table: Any, buffers: Optional[Dict[str, torch.Tensor]] = None) -> None:
        self.name, self.dim, self.state_dim = table.name, table.dim, table.state_dim
        self.dtype = getattr(table, "dtype", torch.float32)
        self.options = table.options
        self._pending = table.export_pending()
        self._table, self._buffers, self._rows, self._open = table, buffers, None, False
        if table.is_cuda or getattr(table, "on_disk", False):
            try:
                self._rows = table.export_rows()
            except MemoryError as e:  # a table on disk larger than half the memory available refuses the copy
                raise CheckpointError(
                    f"table {table.name!r}: a background save copies its rows into memory first: {e}; save it "
                    "with blocking=True, which streams the rows from disk") from e
            self._len = self._rows[0].numel()
        else:
            self._len = C.snapshot_begin(table.handle)
            self._open = True

    def __len__(self) -> int:
        return self._len

    def read(self) -> None:
        """Copies the snapshot's rows into host memory and ends the snapshot (once)."""
        if self._rows is not None:
            return
        n, b = self._len, self._buffers if self._buffers is not None else {}
        if b.get("ids") is None or b["ids"].numel() < n or b["weights"].shape[1:] != (self.dim,) \
                or b["weights"].dtype != self.dtype or b["state"].shape[1:] != (self.state_dim,):
            cap = n + n // 8 + 1024  # room for the table to grow before the next save
            b.update(ids=torch.empty(cap, dtype=torch.int64), weights=torch.empty(cap, self.dim, dtype=self.dtype),
                     state=torch.empty(cap, self.state_dim), meta=torch.empty(cap, 3, dtype=torch.int64))
        copied = 0
        while copied < n:
            got, _ = C.snapshot_read(self._table.handle, b["ids"][copied:n], b["weights"][copied:n],
                                     b["state"][copied:n], b["meta"][copied:n])
            if got == 0:
                break
            copied += got
        self.close()
        if copied != n:
            raise CheckpointError(f"table {self.name!r}: the snapshot held {n} rows but {copied} were read")
        self._rows = (b["ids"][:n], b["weights"][:n], b["state"][:n], b["meta"][:n])

    def views(self, start: int, n: int):
        """Rows [start, start + n) as views, no copy: (ids, weights, state, meta)."""
        self.read()
        end = min(start + n, self._len)
        return tuple(t[start:end] for t in self._rows)

    def export_pending(self):
        return self._pending

    def close(self) -> None:
        """Ends the snapshot: the table stops keeping old rows and frees the copies it kept."""
        if self._open:
            self._open = False
            C.snapshot_end(self._table.handle)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the table is gone already
            pass


# The share of a core a background save's writer takes by default (see save's write_share).
BACKGROUND_WRITE_SHARE = 0.25

# Host buffers background saves read their snapshots into, by table key (see reuse_buffers).
_snapshot_buffers: Dict[str, Dict[str, torch.Tensor]] = {}


def release_buffers() -> None:
    """Frees the host buffers background saves keep for the next one (after waiting for the save
    in progress)."""
    wait()
    _snapshot_buffers.clear()

# The background save in progress (one at a time per process), and its error, if it failed.
_background: Dict[str, Any] = {"thread": None, "error": None, "path": None}


def _background_running() -> bool:
    """Whether this process's background save is still writing."""
    thread = _background["thread"]
    return thread is not None and thread.is_alive()


def wait() -> Optional[str]:
    """Waits for this process's background save (``save(..., blocking=False)``) to finish; returns its
    checkpoint directory (None without one) and raises its error if it failed. Every rank calls it."""
    thread, _background["thread"] = _background["thread"], None
    if thread is not None:
        thread.join()
    error, _background["error"] = _background["error"], None
    if error is not None:
        raise CheckpointError(f"the background save to {_background['path']} failed: {error}") from error
    return _background["path"] if thread is not None else None


def _finish_at_exit() -> None:
    """At interpreter exit: the background save in progress is written out, not lost (its thread,
    killed inside a C++ call during finalization, would abort the process)."""
    path = wait()
    if path is not None:
        print(f"recis_torchrec: the background save to {path} finished at exit", file=sys.stderr, flush=True)



def _hyperparameters_of(ref: TableRef) -> Dict[str, float]:
    """The numbers of a table's param group (its hyperparameters, and what a scheduler added)."""
    group = ref.optimizer.param_group_of(ref.table.name)
    return {k: v for k, v in group.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

def save(
    path: str,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    dataloader: Optional[Any] = None,
    step: int = 0,
    keep_last: Optional[int] = None,
    max_file_bytes: int = 256 << 20,
    extra: Optional[Dict[str, Any]] = None,
    durable: bool = True,
    blocking: bool = True,
    timeout: float = 3600.0,
    reuse_buffers: bool = True,
    write_share: Optional[float] = None,
) -> str:
    """Saves a checkpoint of `model` under the root `path`; call it on every rank.

    Args:
        path: the checkpoint root; this save becomes ``{path}/step_{step:010d}-{time}``.
        model: an unsharded model, or a DistributedModelParallel one.
        optimizer: the dense optimizer (the sparse one lives in the tables).
        dataloader: anything with ``state_dict()`` (each rank's position); :func:`load` at another
            world size calls its ``load_resharded(states, rank, world_size)`` with every saved rank's
            state, if it has one.
        step: the training step, returned by :func:`load`.
        keep_last: keep only the newest K checkpoints under `path`.
        max_file_bytes: the largest table file; bigger tables are split.
        extra: JSON-serialisable data to keep in the index (e.g. RNG seeds).
        durable: fsync every file before the checkpoint is renamed into place,
            so that it survives a power loss, not only a process crash.
        blocking: False snapshots the tables (copy-on-write: nothing is copied now; until the
            background thread has read a row into host memory, a training step that writes it first
            copies its old value aside), copies the dense state and the positions to host memory
            and returns; a background thread writes the files while training goes on (no collective runs
            there: each rank leaves a manifest, rank 0 writes the index when every rank's is in and
            renames the checkpoint into place). The next save, or :func:`wait`, joins it. Until then
            the previous checkpoint is the newest complete one; a crash leaves it loadable.
        timeout: seconds rank 0's background writer waits for the other ranks' manifests.
        reuse_buffers: with ``blocking=False``, read the snapshot into host buffers kept from the
            last background save and keep them for the next (one copy of this rank's tables in host
            memory between saves, not counted by ``memory_bytes``; :func:`release_buffers` frees
            them). False reads into fresh memory, freed when the write ends.
        write_share: the largest fraction of one core's time the writer is busy, in (0, 1]; it
            sleeps between its 8 MiB writes for the rest. None: 1 for a blocking save, 0.25 for a
            background one, whose writer would otherwise take a core from the training step's
            threads for as long as it runs (on a 2-core machine, a 1.4-2.2x slower step); the
            background write then takes about four times as long.

    Returns:
        The checkpoint's directory (complete once this returns, or, with ``blocking=False``, once
        :func:`wait` returns).
    """
    check_supported(model)
    wait()  # one save at a time: the previous background one finishes (or fails) first
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last <= 0):
        raise CheckpointError(f"checkpoint.save: keep_last must be a positive int or None, got {keep_last!r}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint.save: step must be an int >= 0, got {step!r}")
    if not isinstance(reuse_buffers, bool):
        raise CheckpointError(f"checkpoint.save: reuse_buffers must be True or False, got {reuse_buffers!r}")
    if write_share is None:
        write_share = 1.0 if blocking else BACKGROUND_WRITE_SHARE
    if isinstance(write_share, bool) or not isinstance(write_share, (int, float)) or not 0 < write_share <= 1:
        raise CheckpointError(f"checkpoint.save: write_share must be a number in (0, 1], got {write_share!r}")
    rank, world = rank_and_world()
    t0 = time.perf_counter()
    final = broadcast_object(_step_dir(path, step) if rank == 0 else None)
    tmp = broadcast_object(f"{final}.tmp-{uuid.uuid4().hex[:8]}" if rank == 0 else None)
    if rank == 0:
        os.makedirs(tmp, exist_ok=True)
    barrier()

    refs = hash_tables(model)
    mine = [ref for ref in refs if ref.sharded or rank == 0]  # an unsharded table is the same on every rank
    configs = {ref.key: table_config(ref) for ref in refs}
    # Each table's own param group (tables with different optimizers have different groups).
    fused = {ref.key: _hyperparameters_of(ref) for ref in refs}
    steps = {ref.key: ref.optimizer.steps()[ref.table.name] for ref in mine}
    loader_state = json.loads(json.dumps(dataloader.state_dict())) if dataloader is not None else None
    dense = opt = None
    if rank == 0:
        dense = {name: t.detach().cpu() for name, t in dense_state(model)}
        if optimizer is not None:
            opt = _flatten_optimizer(optimizer.state_dict())
    spec = dict(path=path, final=final, tmp=tmp, rank=rank, world=world, step=step, keep_last=keep_last,
                features=feature_order(model),
                max_file_bytes=max_file_bytes, extra=extra, durable=durable, configs=configs, fused=fused,
                write_share=float(write_share),
                steps=steps, loader_state=loader_state, has_loader=dataloader is not None, dense=dense, opt=opt)
    if blocking:
        mine_written = _write_rank_files(spec, mine)
        gathered = gather_objects(mine_written)
        if rank == 0:
            _finish(spec, gathered)
        barrier()
        save.last_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
        save.last_bytes = mine_written[3]  # type: ignore[attr-defined]
        return final
    # Background: snapshot now (the only part training waits for), write later.
    snapshot: List[TableRef] = []
    try:
        for ref in mine:
            buffers = _snapshot_buffers.setdefault(ref.key, {}) if reuse_buffers else None
            snapshot.append(dataclasses.replace(ref, table=_TableSnapshot(ref.table, buffers)))
        if dense is not None:
            spec["dense"] = {k: v.clone() for k, v in dense.items()}
        if opt is not None:
            spec["opt"] = ({k: v.clone() for k, v in opt[0].items()}, json.loads(json.dumps(opt[1])))
    except BaseException:
        for ref in snapshot:
            ref.table.close()
        raise
    save.last_blocking_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]

    def run() -> None:
        try:
            for ref in snapshot:  # first read every snapshot whole: the shorter they live, the fewer rows
                ref.table.read()  # the training steps copy aside
            written = _write_rank_files(spec, snapshot)
            manifest = os.path.join(tmp, f"rank{rank}.manifest.json")
            write_json(manifest + ".part", list(written), durable)
            os.replace(manifest + ".part", manifest)
            if rank == 0:
                deadline = time.monotonic() + timeout
                names = [os.path.join(tmp, f"rank{r}.manifest.json") for r in range(world)]
                while not all(os.path.exists(n) for n in names):
                    if time.monotonic() > deadline:
                        raise CheckpointError(f"{tmp}: not every rank's files arrived within {timeout:.0f} s")
                    time.sleep(0.05)
                gathered = []
                for n in names:
                    with open(n) as f:
                        gathered.append(tuple(json.load(f)))
                for n in names:
                    os.remove(n)
                _finish(spec, gathered)
        except BaseException as e:  # noqa: B902 - handed to wait()
            _background["error"] = e
        finally:
            for ref in snapshot:
                try:
                    ref.table.close()
                except BaseException as e:  # noqa: B902 - handed to wait()
                    _background["error"] = _background["error"] or e

    thread = threading.Thread(target=run, name=f"checkpoint-save-{step}", daemon=True)
    _background.update(thread=thread, error=None, path=final)
    thread.start()
    _exit.finish_at_exit(_finish_at_exit)  # a script may end before the save does: finish it then
    return final


def _write_rank_files(spec: Dict[str, Any], refs: List[TableRef]) -> Tuple[Any, ...]:
    """This rank's files in the temporary directory: its tables' rows (``refs``: live tables, or
    snapshots), its loader position and, on rank 0, the dense state and optimizer. Returns what the
    index needs from it: (files, steps, loader file, bytes, loader checksum)."""
    tmp, rank, durable, share = spec["tmp"], spec["rank"], spec["durable"], spec["write_share"]
    files: List[Dict[str, Any]] = []
    for ref in refs:
        files += [dict(e, table=ref.key) for e in write_table_files(tmp, ref, rank, spec["max_file_bytes"],
                                                                      durable=durable, share=share)]
    loader_file = loader_digest = None
    if spec["has_loader"]:
        loader_file = f"loader-rank{rank}.json"
        write_json(os.path.join(tmp, loader_file), spec["loader_state"], durable)
        with open(os.path.join(tmp, loader_file), "rb") as f:
            loader_digest = checksum(f.read())
    if rank == 0:
        spec["dense_entry"] = write_tensors(os.path.join(tmp, "dense.safetensors"), spec["dense"], durable=durable,
                                            share=share)
        spec["opt_entry"] = None
        if spec["opt"] is not None:
            spec["opt_entry"] = write_tensors(os.path.join(tmp, "optimizer.safetensors"), spec["opt"][0],
                                              durable=durable, share=share)
    written = sum(e["bytes"] for e in files)
    return files, spec["steps"], loader_file, written, loader_digest


def _finish(spec: Dict[str, Any], gathered: List[Tuple[Any, ...]]) -> None:
    """Rank 0: the index over every rank's files, then the rename that makes the checkpoint complete."""
    tmp, final, path = spec["tmp"], spec["final"], spec["path"]
    tables: Dict[str, Any] = {key: dict(cfg, files=[], steps={}) for key, cfg in spec["configs"].items()}
    for r, (r_files, r_steps, _, _, _) in enumerate(gathered):
        for e in r_files:
            tables[e["table"]]["files"].append({k: v for k, v in e.items() if k != "table"})
        for key, st in r_steps.items():
            tables[key]["steps"][str(r)] = st
    dense_entry, opt_entry = spec.get("dense_entry"), spec.get("opt_entry")
    index = {
        "format": FORMAT_VERSION,
        "kind": "full",
        "step": spec["step"],
        "world_size": spec["world"],
        "tables": tables,
        "features": spec["features"],
        "fused_optimizer": spec["fused"],
        "dense": dense_entry,
        "optimizer": {"file": opt_entry, "rest": spec["opt"][1]} if opt_entry else None,
        "loader": [g[2] for g in gathered] if spec["has_loader"] else None,
        "loader_xxh64": [g[4] for g in gathered] if spec["has_loader"] else None,
        "extra": spec["extra"] or {},
        "bytes": sum(g[3] for g in gathered) + (dense_entry["bytes"] if dense_entry else 0),
    }
    index["xxh64"] = index_checksum(index)
    write_json(os.path.join(tmp, "index.json"), index, spec["durable"])
    if spec["durable"]:
        for root, _, _ in os.walk(tmp):
            fsync_dir(root)
    os.replace(tmp, final)
    fsync_dir(path)
    if spec["keep_last"] is not None:
        for _, old in checkpoints(path)[:-spec["keep_last"]]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(path):  # leftovers of interrupted saves
            if ".tmp-" in name and os.path.join(path, name) != tmp:
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)



def _selected(refs: List[TableRef], include: Optional[Iterable[str]], exclude: Optional[Iterable[str]]):
    inc, exc = list(include or []), list(exclude or [])
    out = []
    for ref in refs:
        if inc and not any(fnmatch.fnmatch(ref.key, p) or fnmatch.fnmatch(ref.table.name, p) for p in inc):
            continue
        if any(fnmatch.fnmatch(ref.key, p) or fnmatch.fnmatch(ref.table.name, p) for p in exc):
            continue
        out.append(ref)
    return out


def owned_mask(ref: TableRef, ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if not ref.sharded or world == 1:
        return torch.ones(ids.numel(), dtype=torch.bool)
    return ops.owner_of(ids, world) == rank


def stage_table(
    directory: str, ref: TableRef, entry: Dict[str, Any], rank: int, world: int, saved_world: Optional[int] = None
) -> Dict[str, List[torch.Tensor]]:
    """Reads and verifies the files of a table that hold rows this rank owns, and keeps those rows.

    At the world size the checkpoint was saved at, rank r's rows are exactly
    the saved rank r's, so only its files are read; otherwise every file is.
    """
    if entry["dim"] != ref.table.dim:
        raise CheckpointError(
            f"table {ref.key!r}: the checkpoint has dim {entry['dim']} but the model's table has dim {ref.table.dim}"
        )
    if entry["optimizer"] != ref.optimizer_code:
        raise CheckpointError(
            f"table {ref.key!r}: the checkpoint holds state of optimizer code {entry['optimizer']} but the model "
            f"trains it with code {ref.optimizer_code}"
        )
    parts: Dict[str, List[torch.Tensor]] = {}
    same_layout = ref.sharded and entry.get("sharded") and saved_world == world
    for f in entry["files"]:
        if same_layout and f["rank"] != rank:
            continue
        tensors = read_tensors(directory, f)
        if "ids" not in tensors or tensors["ids"].numel() != f["rows"]:
            raise CheckpointError(f"{os.path.join(directory, f['file'])}: holds no ids or not the {f['rows']} rows listed")
        _check_row_tensors(os.path.join(directory, f["file"]), ref, tensors)
        everything = not ref.sharded or world == 1 or same_layout
        keep = None if everything else owned_mask(ref, tensors["ids"], rank, world)
        for name, t in tensors.items():
            if name.startswith("pending_"):
                continue
            parts.setdefault(name, []).append(t if keep is None else t[keep])
        if "pending_ids" in tensors:
            pk = owned_mask(ref, tensors["pending_ids"], rank, world)
            parts.setdefault("pending_ids", []).append(tensors["pending_ids"][pk])
            parts.setdefault("pending_counts", []).append(tensors["pending_counts"][pk])
    # Parts stay separate (no concatenating copy); apply_table imports them one by one.
    return parts


def _check_row_tensors(where: str, ref: TableRef, tensors: Dict[str, torch.Tensor]) -> None:
    """Every tensor the table's import needs, with the table's shapes (a file that does not fit the
    model must fail here, before any table is cleared)."""
    n, dim = tensors["ids"].numel(), ref.table.dim
    want: Dict[str, Tuple[int, ...]] = {"ids": (n,), "weights": (n, dim)}
    for slot, _, width in STATE_SLOTS[ref.optimizer_code]:
        want[slot] = (n,) if width is None else (n, width * dim)
    for col in META_COLUMNS:
        want[col] = (n,)
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(
                f"{where}: table {ref.key!r} lacks {name!r}, which the model's table (dim {dim}, optimizer code "
                f"{ref.optimizer_code}) needs; the checkpoint does not match the model")
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where}: table {ref.key!r}: {name!r} has shape {tuple(t.shape)}, the model's table needs {shape}")


def apply_table(ref: TableRef, staged: Dict[str, List[torch.Tensor]], replace: bool = True) -> None:
    """Writes staged rows (file by file) into a table, after clearing it for a full restore."""
    if replace:
        ref.table.clear()
    for k, ids in enumerate(staged.get("ids", [])):
        n = ids.numel()
        if n == 0:
            continue
        part = {name: tensors[k] for name, tensors in staged.items() if not name.startswith("pending_")}
        meta = torch.stack([part[c].to(torch.int64) for c in META_COLUMNS], 1)
        ref.table.import_(ids, part["weights"], _state_from_slots(ref, part, n), meta)
    for ids, counts in zip(staged.get("pending_ids", []), staged.get("pending_counts", [])):
        if ids.numel():
            ref.table.import_pending(ids, counts)


def _check_features(directory: str, index: Dict[str, Any], model: nn.Module,
                    to_saved: Callable[[str], str] = lambda name: name) -> None:
    """The model's embedding modules give their features in the order the checkpoint was trained on
    (indexes from before the order was recorded cannot be checked)."""
    saved = index.get("features")
    if saved is None:
        return
    for path, order in feature_order(model).items():
        was = saved.get(to_saved(path) if path else path)
        if was is not None and was != order:
            name = path or "the model"
            if sorted(was) == sorted(order):
                raise CheckpointError(
                    f"{directory}: {name}'s features are in another order than when the checkpoint was saved "
                    f"(saved {was}, the model's {order}); the layers after it were trained on the saved "
                    "order, so the model would read its inputs permuted. Build the model with the saved order")
            raise CheckpointError(
                f"{directory}: {name}'s tables and features differ from the checkpoint's: missing "
                f"{sorted(set(was) - set(order))}, added {sorted(set(order) - set(was))}")


def _check_optimizer_state(directory: str, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """The saved dense optimizer state fits `optimizer` (its class's hyperparameters, its groups and
    their sizes): torch's load_state_dict takes another optimizer's state, and the first step fails."""
    what = f"{directory}/optimizer.safetensors"
    saved, have = state.get("param_groups", []), optimizer.param_groups
    if len(saved) != len(have):
        raise CheckpointError(f"{what}: holds {len(saved)} parameter groups, {type(optimizer).__name__} has {len(have)}")
    for k, (s, h) in enumerate(zip(saved, have)):
        s_keys, h_keys = set(s) - {"params"}, set(h) - {"params"}
        if s_keys != h_keys:
            raise CheckpointError(
                f"{what}: group {k} was saved by another optimizer than {type(optimizer).__name__} (hyperparameters "
                f"{sorted(s_keys)}, {type(optimizer).__name__}'s {sorted(h_keys)})")
        if len(s["params"]) != len(h["params"]):
            raise CheckpointError(
                f"{what}: group {k} holds {len(s['params'])} parameters, {type(optimizer).__name__}'s "
                f"{len(h['params'])}")
    params = [p for g in have for p in g["params"]]
    position = {i: k for k, i in enumerate(i for g in saved for i in g["params"])}  # saved id -> parameter
    for i, slots in state.get("state", {}).items():
        if i not in position:
            continue
        param = params[position[i]]
        for slot, v in slots.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != param.shape:
                raise CheckpointError(
                    f"{what}: the state {slot!r} of parameter {position[i]} has shape {tuple(v.shape)}, the "
                    f"parameter {tuple(param.shape)} (the optimizer was saved for other parameters)")


def load(
    path: str,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    dataloader: Optional[Any] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    strict: bool = True,
) -> int:
    """Loads a checkpoint into `model` (and the optimizer and loader); call it on every rank.

    Works at any world size: each rank keeps the ids it owns now. `include` /
    `exclude` are glob patterns over table keys (``"module.path/table"``) or
    names. Every needed file is read and verified before the model changes;
    any problem raises CheckpointError naming the file or table on every rank.

    Returns:
        The step the checkpoint was saved at.
    """
    check_supported(model)
    rank, world = rank_and_world()
    refs = _selected(hash_tables(model), include, exclude)
    staged: Dict[str, Dict[str, torch.Tensor]] = {}
    dense: Dict[str, torch.Tensor] = {}
    opt_state = None
    loader_state = None
    index: Dict[str, Any] = {}
    error = ""
    try:
        # Errors raised on one rank reach every rank through all_ok below, so
        # that no rank waits forever in a collective.
        directory = resolve(path)
        index = read_index(directory)
        if index.get("format") != FORMAT_VERSION or index.get("kind") != "full":
            raise CheckpointError(f"{directory}: not a full checkpoint of format {FORMAT_VERSION}")
        # The Trainer's checkpoints name the model inside its task wrapper ("model."): a model on its
        # own loads them, and the reverse (checkpoint/files.saved_name).
        to_saved = saved_name([r.key for r in refs], index.get("tables", {}))
        _check_features(directory, index, model, to_saved)
        for ref in refs:
            entry = index["tables"].get(to_saved(ref.key))
            if entry is None:
                if strict:
                    raise CheckpointError(f"table {ref.key!r} is not in the checkpoint {directory}")
                continue
            staged[ref.key] = stage_table(directory, ref, entry, rank, world, index.get("world_size"))
        if index.get("dense") is not None:
            dense = read_tensors(directory, index["dense"])
            have = {to_saved(n): t for n, t in dense_state(model)}
            missing = sorted(set(have) - set(dense))
            if missing and strict:
                raise CheckpointError(f"{directory}/dense.safetensors: lacks dense tensors {missing[:5]}")
            unexpected = sorted(set(dense) - set(have))
            if unexpected and strict:
                raise CheckpointError(
                    f"{directory}/dense.safetensors: holds dense tensors the model does not have {unexpected[:5]} "
                    "(the checkpoint is of another model; strict=False loads the tensors both have)")
            for name, t in dense.items():
                if name in have and have[name].shape != t.shape:
                    raise CheckpointError(
                        f"{directory}/dense.safetensors: {name!r} has shape {tuple(t.shape)}, the model's "
                        f"{tuple(have[name].shape)}"
                    )
        if optimizer is not None:
            if index.get("optimizer") is None:
                raise CheckpointError(f"{directory}: holds no dense optimizer state")
            opt_state = _unflatten_optimizer(read_tensors(directory, index["optimizer"]["file"]), index["optimizer"]["rest"])
            _check_optimizer_state(directory, optimizer, opt_state)
        if dataloader is not None:
            if index.get("loader") is None:
                raise CheckpointError(f"{directory}: holds no loader state")
            if index["world_size"] != world:
                if not hasattr(dataloader, "load_resharded"):
                    raise CheckpointError(
                        f"{directory}: the loader positions were saved at world size {index['world_size']}, not "
                        f"{world}, and {type(dataloader).__name__} has no load_resharded(states, rank, world_size) "
                        "to re-derive them; pass dataloader=None to load the model only"
                    )
                digests = index.get("loader_xxh64") or [None] * len(index["loader"])
                saved_states = [read_json_checked(inside(directory, name), d)
                                for name, d in zip(index["loader"], digests)]
                loader_state = ("resharded", saved_states)
            else:
                digests = index.get("loader_xxh64") or [None] * world
                loader_state = read_json_checked(inside(directory, index["loader"][rank]), digests[rank])
    except (CheckpointError, OSError, KeyError, ValueError) as e:
        error = str(e) if isinstance(e, CheckpointError) else f"{directory}: {type(e).__name__}: {e}"
    all_ok(not error, error)

    # Everything is read and verified: now change the model.
    for ref in refs:
        if ref.key not in staged:
            continue
        apply_table(ref, staged[ref.key])
        saved_steps = index["tables"][to_saved(ref.key)]["steps"].values()
        if saved_steps:
            ref.optimizer._steps[ref.table.name].fill_(max(saved_steps))
            ref.table.restart_eviction_log(max(saved_steps))
        hp = index.get("fused_optimizer", {}).get(to_saved(ref.key))
        if hp:
            ref.optimizer.param_group_of(ref.table.name).update(hp)
        ref.table.lineage = index["tables"][to_saved(ref.key)].get("lineage", ref.table.lineage)
    with torch.no_grad():
        have = {to_saved(n): t for n, t in dense_state(model)}
        for name, t in dense.items():
            if name in have:
                have[name].copy_(t)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    if isinstance(loader_state, tuple):  # saved at another world size: the loader re-derives its position
        dataloader.load_resharded(loader_state[1], rank, world)
    elif loader_state is not None:
        dataloader.load_state_dict(loader_state)
    barrier()
    return int(index["step"])
