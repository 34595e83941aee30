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
from torch import nn

from recis_torchrec import ops
from recis_torchrec.distributed.embeddingbag import ShardedTablesMixin
from recis_torchrec.modules.hash_module import HashTablesMixin
from recis_torchrec.modules.hash_table import HashTable


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt or does not fit the model; names the file or table."""


# Checksums read file bytes in place (read-only); torch's warning about that does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def checksum(data) -> str:
    """XXH64 of a bytes-like object, as 16 hex digits (C++, in place)."""
    n = memoryview(data).nbytes
    buf = torch.from_numpy(np.frombuffer(data, dtype=np.uint8)) if n else torch.empty(0, dtype=torch.uint8)
    h = int(ops.hash_strings(buf, torch.tensor([0, n], dtype=torch.int64))[0])
    return f"{h & (2**64 - 1):016x}"


_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().reshape(-1)
    if t.numel() and t.stride(0) != 1:
        # A one-element slice of a column (meta[:1, j]) counts as contiguous but keeps its stride.
        t = t.new_empty(t.shape).copy_(t)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _combine(header: bytes, digests: List[str]) -> str:
    """The file checksum: XXH64 of the header followed by every tensor's XXH64."""
    return checksum(header + "".join(digests).encode())


def write_tensors(
    path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None, durable: bool = True
) -> dict:
    """Writes a safetensors file straight from the tensors' memory (no copy);
    returns its index entry (name, bytes, checksum). With `durable`, the file
    is fsync'd before returning."""
    header: Dict[str, object] = {}
    offset = 0
    views = []
    # Widest elements first (as safetensors itself orders them), so that every
    # tensor starts aligned to its element size and loads as a zero-copy view.
    ordered = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    for name, t in ordered:
        v = _tensor_bytes(t)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
        views.append(v)
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    prefix = len(head).to_bytes(8, "little") + head
    digests = [checksum(v) for v in views]
    with open(path, "wb") as f:
        f.write(prefix)
        for v in views:
            f.write(v)
        if durable:
            f.flush()
            os.fsync(f.fileno())  # on disk before the checkpoint's directory is renamed into place
    return {"file": os.path.basename(path), "bytes": len(prefix) + offset, "xxh64": _combine(prefix, digests)}


def read_tensors(directory: str, entry: dict) -> Dict[str, torch.Tensor]:
    """Reads and verifies a file listed in the index; tensors share the read buffer."""
    path = os.path.join(directory, entry["file"])
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing (the index lists it)")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise CheckpointError(f"{path}: {size} bytes but the index says {entry['bytes']} (truncated?)")
    storage = torch.empty(size, dtype=torch.uint8)  # not zero-filled, unlike bytearray
    data = storage.numpy()
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(memoryview(data))
    if got != size:
        raise CheckpointError(f"{path}: read {got} of {size} bytes")
    try:
        n = int.from_bytes(data[:8].tobytes(), "little")
        header = json.loads(data[8 : 8 + n].tobytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
    buf = memoryview(data)
    base = 8 + n
    out, digests = {}, []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        lo, hi = spec["data_offsets"]
        view = buf[base + lo : base + hi]
        digests.append(checksum(view))
        dtype = _FROM_NAME[spec["dtype"]]
        raw = storage[base + lo : base + hi]
        if (base + lo) % torch.empty(0, dtype=dtype).element_size():
            raw = raw.clone()  # a file from another writer, with an unaligned tensor
        out[name] = raw.view(dtype).reshape(spec["shape"])
    if _combine(bytes(buf[:base]), digests) != entry["xxh64"]:
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt)")
    return out


def write_json(path: str, obj, durable: bool = True) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        if durable:
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
    """Every hash table in the model, in module order (a table shared by an EBC and an EC once, under the EBC)."""
    refs = []
    for path, m in unwrap(model).named_modules():
        if isinstance(m, HashTablesMixin):
            optim = m.hash_optimizer
            for name, table in m.tables().items():
                refs.append(
                    TableRef(
                        key=f"{path}/{name}" if path else name,
                        module_path=path,
                        table=table,
                        optimizer=optim,
                        sharded=isinstance(m, ShardedTablesMixin),
                        optimizer_code=optim.config_of(name).code,
                    )
                )
    return refs


def check_supported(model: nn.Module) -> None:
    """TorchRec-sharded tables are not ours to checkpoint: say so instead of skipping them."""
    from torchrec.distributed.types import ShardedModule

    for path, m in unwrap(model).named_modules():
        if isinstance(m, ShardedTablesMixin):
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


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (itself when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def gather_objects(obj) -> List:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
