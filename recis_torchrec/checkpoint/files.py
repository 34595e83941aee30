# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Checksummed safetensors files, the model's hash tables, and the process group."""

import json
import mmap
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recis_torchrec import ops
from recis_torchrec.modules.hash_module import HashTablesMixin
from recis_torchrec.tables.hash_table import HashTable


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt or does not fit the model; names the file or table."""


def checksum(data) -> str:
    """XXH64 of a bytes-like object, as 16 hex digits (C++, in place)."""
    n = memoryview(data).nbytes
    if n:
        with warnings.catch_warnings():  # the bytes are read in place, never written: torch's warning does not apply
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            buf = torch.from_numpy(np.frombuffer(data, dtype=np.uint8))
    else:
        buf = torch.empty(0, dtype=torch.uint8)
    h = int(ops.hash_strings(buf, torch.tensor([0, n], dtype=torch.int64))[0])
    return f"{h & (2**64 - 1):016x}"


def _combine(header: bytes, digests: List[str]) -> str:
    """The checksum of files written before whole-file checksums: XXH64 of the header followed by
    every tensor's XXH64 (still read, so older checkpoints load)."""
    return checksum(header + "".join(digests).encode())


# The safetensors dtype names, in the order the library lays tensors out (widest first; then by name).
_DTYPES = {
    torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_ORDER = {dtype: i for i, dtype in enumerate(_DTYPES)}


def _layout(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """The tensors' names in file order, as ``safetensors.torch.save_file`` lays them out: widest
    dtype first, then by name."""
    return sorted(tensors, key=lambda k: (_ORDER[tensors[k].dtype], k))


def safetensors_header(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The safetensors header (8-byte length, JSON padded with spaces to 8 bytes) for ``tensors``
    in :func:`_layout` order."""
    body: Dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in _layout(tensors):
        t = tensors[name]
        body[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(body, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_tensors(
    path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None, durable: bool = True,
    share: float = 1.0,
) -> dict:
    """Writes a safetensors file (the layout ``safetensors.torch.save_file`` writes, byte for byte
    where metadata has at most one key; read back with ``safetensors.safe_open``) from the tensors'
    memory, hashing it on the way out; returns its index entry (name, bytes, XXH64 of the whole
    file, header included). The bytes go to disk with ``O_DIRECT`` where the file system takes it:
    a buffered write costs a core of kernel time for as long as it runs, which a save in the
    background takes from training. With `durable`, the file is fsync'd before returning; `share`
    caps the writer's busy time (see :func:`recis_torchrec.ops.write_file`)."""
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, which checkpoints do not store")
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    header = safetensors_header(tensors, metadata)
    order = _layout(tensors)
    # Strided columns (a state slot, a metadata column) are gathered by the writer, not copied here.
    digest = ops.write_file(path, header, [tensors[k] for k in order], durable=durable, share=share)
    size = len(header) + sum(t.nbytes for t in tensors.values())
    return {"file": os.path.basename(path), "bytes": size, "xxh64_file": f"{digest:016x}"}


def inside(directory: str, name: Any) -> str:
    """``directory/name`` for a file an index lists, refused if it would lie outside the checkpoint."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or os.path.normpath(name).startswith(".."):
        raise CheckpointError(f"{directory}: the index lists a file {name!r} outside the checkpoint directory")
    return os.path.join(directory, name)


def file_checksum(path: str) -> str:
    """XXH64 of a file's bytes, read memory-mapped."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return checksum(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return checksum(data)


def verified_path(directory: str, entry: dict) -> str:
    """The path of a file an index lists, checked: inside `directory`, present, of the size the
    entry gives and, when the entry records one, of its whole-file XXH64."""
    path = inside(directory, entry.get("file"))
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing (the index lists it)")
    size = os.path.getsize(path)
    if size != entry.get("bytes"):
        raise CheckpointError(f"{path}: {size} bytes but the index says {entry.get('bytes')} (truncated?)")
    if "xxh64_file" in entry and file_checksum(path) != entry["xxh64_file"]:
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt)")
    return path


def read_tensors(directory: str, entry: dict) -> Dict[str, torch.Tensor]:
    """Reads and verifies a file listed in the index: its size and XXH64 over the memory-mapped file,
    then its tensors through ``safetensors.safe_open``."""
    from safetensors import SafetensorError, safe_open

    path = verified_path(directory, entry)
    if "xxh64_file" in entry:
        try:
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, ValueError, RuntimeError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return _read_combined(path, os.path.getsize(path), entry)


def _read_combined(path: str, size: int, entry: dict) -> Dict[str, torch.Tensor]:
    """A file of a checkpoint written before whole-file checksums (see _combine)."""
    dtypes = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    storage = torch.empty(size, dtype=torch.uint8)
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
        try:
            lo, hi = spec["data_offsets"]
            dtype = dtypes[spec["dtype"]]
            digests.append(checksum(buf[base + lo : base + hi]))
            raw = storage[base + lo : base + hi].clone()
            out[name] = raw.view(dtype).reshape(spec["shape"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from e
    if _combine(bytes(buf[:base]), digests) != entry.get("xxh64"):
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt)")
    return out


def index_checksum(index: dict) -> str:
    """XXH64 of an index's canonical JSON, without its own ``xxh64`` field."""
    body = {k: v for k, v in index.items() if k != "xxh64"}
    return checksum(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def read_index(directory: str) -> dict:
    """A checkpoint's (or delta's) ``index.json``, verified against the checksum it carries (an edited
    step, loader position or file entry is caught; an index without one is refused)."""
    path = os.path.join(directory, "index.json")
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if not isinstance(index, dict):
        raise CheckpointError(f"{path}: not an index (a JSON object)")
    if "xxh64" not in index:
        raise CheckpointError(f"{path}: has no checksum (xxh64); every index this library writes has one, so it "
                              "was edited or written by something else")
    if index["xxh64"] != index_checksum(index):
        raise CheckpointError(f"{path}: checksum mismatch (the index was edited or is corrupt)")
    return index


def read_json_checked(path: str, digest: Optional[str]) -> Any:
    """A JSON file the index lists, verified against its XXH64 when the index records one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if digest is not None and checksum(data) != digest:
        raise CheckpointError(f"{path}: checksum mismatch (the file was edited or is corrupt)")
    try:
        return json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def write_json(path: str, obj, durable: bool = True) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)  # in the order given: a stored config keeps the order its user wrote
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
                        sharded=m.holds_a_shard,
                        optimizer_code=optim.config_of(name).code,
                    )
                )
    return refs


def saved_name(model_keys: Iterable[str], saved_keys: Iterable[str]) -> Callable[[str], str]:
    """How the model's table keys (and with them its module paths and dense names) are named in a
    checkpoint or delta: as they are, or under one module prefix added or removed throughout. The
    Trainer saves the model inside its task wrapper (keys ``model.sparse_arch...``), while a model
    exported or served on its own has ``sparse_arch...``; either loads into the other. The prefix
    must account for every model key at once (never one key at a time), else the names are kept
    and the caller's "not in the checkpoint" error stands."""
    model_keys, saved = list(model_keys), set(saved_keys)
    if not model_keys or all(k in saved for k in model_keys):
        return lambda name: name
    first = model_keys[0]
    candidates = {s[: len(s) - len(first)] for s in saved if s.endswith(first) and len(s) > len(first)}
    for prefix in sorted(candidates):  # the saved names carry a prefix the model's lack
        if prefix.endswith(".") and all(prefix + k in saved for k in model_keys):
            return lambda name, p=prefix: p + name
    for s in saved:  # the model's names carry a prefix the saved ones lack
        if first.endswith(s) and len(first) > len(s):
            prefix = first[: len(first) - len(s)]
            if prefix.endswith(".") and all(k.startswith(prefix) and k[len(prefix):] in saved for k in model_keys):
                return lambda name, p=prefix: name[len(p):] if name.startswith(p) else name
    return lambda name: name


def feature_order(model: nn.Module) -> Dict[str, List[str]]:
    """Each of our embedding modules' outputs in their order, as ``"table:feature"`` (the order of the
    module's tables and of their features). The dense layers after a module are trained on this
    order: a model built with the same features in another order reads permuted inputs."""
    out: Dict[str, List[str]] = {}
    for path, m in unwrap(model).named_modules():
        if isinstance(m, HashTablesMixin):
            configs = m.embedding_bag_configs() if hasattr(m, "embedding_bag_configs") else m.embedding_configs()
            out[path] = [f"{c.name}:{f}" for c in configs for f in c.feature_names]
    return out


def check_supported(model: nn.Module) -> None:
    """TorchRec-sharded tables are not ours to checkpoint: say so instead of skipping them."""
    from torchrec.distributed.types import ShardedModule

    for path, m in unwrap(model).named_modules():
        if isinstance(m, HashTablesMixin) and m.holds_a_shard:
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
