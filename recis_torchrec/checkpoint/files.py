# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Checksummed safetensors files, the model's hash tables, and the process group."""

import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from recis_torchrec import ops
from recis_torchrec.modules.hash_table import HashTable


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt or does not fit the model; names the file or table."""


# Checksums read file bytes in place (read-only); torch's warning about that does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def checksum(data: bytes) -> str:
    """XXH64 of the bytes, as 16 hex digits (C++, ~10 GB/s)."""
    buf = torch.from_numpy(np.frombuffer(data, dtype=np.uint8)) if data else torch.empty(0, dtype=torch.uint8)
    h = int(ops.hash_strings(buf, torch.tensor([0, len(data)], dtype=torch.int64))[0])
    return f"{h & (2**64 - 1):016x}"


def write_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> dict:
    """Writes a safetensors file; returns its index entry (name, bytes, checksum)."""
    data = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # on disk before the checkpoint's directory is renamed into place
    return {"file": os.path.basename(path), "bytes": len(data), "xxh64": checksum(data)}


def read_tensors(directory: str, entry: dict) -> Dict[str, torch.Tensor]:
    """Reads and verifies a file listed in the index."""
    path = os.path.join(directory, entry["file"])
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing (the index lists it)")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != entry["bytes"]:
        raise CheckpointError(f"{path}: {len(data)} bytes but the index says {entry['bytes']} (truncated?)")
    if checksum(data) != entry["xxh64"]:
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt)")
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from e


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Makes a directory's entries (new files, renames) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the model's hash tables ---------------------------------------------------


@dataclass
class TableRef:
    """One hash table of a model, as the checkpoint sees it."""

    key: str  # "{module path}/{table name}"
    module_path: str
    table: HashTable
    optimizer: object  # HashFusedOptimizer
    sharded: bool
    optimizer_code: int


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedModelParallel / DDP wrappers."""
    inner = getattr(model, "module", None)
    if inner is not None and type(model).__name__ in ("DistributedModelParallel", "DistributedDataParallel"):
        return unwrap(inner)
    return model


def hash_tables(model: nn.Module) -> List[TableRef]:
    """Every hash table in the model, in module order."""
    from recis_torchrec.distributed.embeddingbag import ShardedHashEmbeddingBagCollection
    from recis_torchrec.modules.hash_embedding_bag import HashEmbeddingBagCollection

    refs = []
    for path, m in unwrap(model).named_modules():
        if isinstance(m, (HashEmbeddingBagCollection, ShardedHashEmbeddingBagCollection)):
            optim = m._optim
            for name, table in m.tables().items():
                refs.append(
                    TableRef(
                        key=f"{path}/{name}" if path else name,
                        module_path=path,
                        table=table,
                        optimizer=optim,
                        sharded=isinstance(m, ShardedHashEmbeddingBagCollection),
                        optimizer_code=optim.config.code,
                    )
                )
    return refs


def check_supported(model: nn.Module) -> None:
    """TorchRec-sharded tables are not ours to checkpoint: say so instead of skipping them."""
    from torchrec.distributed.types import ShardedModule

    from recis_torchrec.distributed.embeddingbag import ShardedHashEmbeddingBagCollection

    for path, m in unwrap(model).named_modules():
        if isinstance(m, ShardedHashEmbeddingBagCollection):
            if m.torchrec is not None:
                raise CheckpointError(
                    f"{path}: tables sharded by TorchRec sit beside hash tables here; recis_torchrec.checkpoint "
                    "saves hash tables and dense state only (use torch.distributed.checkpoint for TorchRec's)"
                )
        elif isinstance(m, ShardedModule):
            raise CheckpointError(
                f"{path}: {type(m).__name__} is sharded by TorchRec; recis_torchrec.checkpoint saves hash tables "
                "and dense state only (use torch.distributed.checkpoint for TorchRec's)"
            )


def dense_state(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """Dense parameters and buffers by name (DDP/DMP prefixes stripped)."""
    from torchrec.distributed.types import ShardedModule

    def walk(m: nn.Module, prefix: str):
        m = unwrap(m)
        if isinstance(m, ShardedModule):
            return
        for n, p in m.named_parameters(recurse=False):
            yield prefix + n, p
        for n, b in m.named_buffers(recurse=False):
            yield prefix + n, b
        for n, child in m.named_children():
            yield from walk(child, f"{prefix}{n}.")

    yield from walk(model, "")


def rank_and_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ok(ok: bool, message: str) -> None:
    """Raises on every rank if any rank failed, so that no rank is left waiting."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, (ok, message))
        bad = [(r, m) for r, (o, m) in enumerate(flags) if not o]
        if bad:
            raise CheckpointError("; ".join(f"rank {r}: {m}" for r, m in bad))
    elif not ok:
        raise CheckpointError(message)
