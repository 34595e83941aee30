# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Inference packages: a trained model's dense part as a ``torch.export`` program and its hash
tables as read-only, optionally quantized safetensors shards, with a manifest and checksums.

``export(model, path, example_inputs)`` writes the package; ``load(path)`` returns a
:class:`Predictor` that looks ids up in the served tables (no inserts; unseen ids read the
manifest's default), feeds the embeddings to the dense program and returns the model's eval
output. ``Predictor.apply_delta`` applies a training delta while requests are served.
"""

import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from recis_torchrec import __version__ as _version
from recis_torchrec._serial import DictConfig
from recis_torchrec.checkpoint.files import (
    CheckpointError,
    checksum,
    file_checksum,
    index_checksum,
    read_index,
    read_tensors,
    saved_name,
    verified_path,
    write_json,
    write_tensors,
)
from recis_torchrec.checkpoint.saver import safe_key
from recis_torchrec.inference.tables import FORMATS, ServingTable, quantize_rows
from recis_torchrec.modules.hash_embedding_bag import HashEmbeddingBagCollection
from recis_torchrec.modules.hash_embedding_collection import HashEmbeddingCollection
from recis_torchrec.tables.hash_table import table_parameters

FORMAT_VERSION = 1
PROGRAM_FILE = "dense.pt2"
AOTI_FILE = "dense.aoti.pt2"
UNSEEN = ("init", "zero")
# The largest |package - eval model| export accepts on its example batch, per row format (about ten
# times what the package tests measure on DLRM, DeepFM and DIN; FP32 packages are exact there).
EXPORT_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2, "int8": 1e-2}


class InferenceError(CheckpointError):
    """A package that is corrupt, incomplete or does not fit the request; names the file, table or feature."""


# -- the model's embedding modules ------------------------------------------------


@dataclass
class _ModuleSpec(DictConfig):
    path: str
    kind: str  # "ebc" or "ec"
    # ebc: (feature, table key, pooling mode, dim) in output order; ec: (feature, embedding name, table key, dim)
    features: List[Tuple[Any, ...]]
    weighted: bool
    need_indices: bool = False

    def __post_init__(self) -> None:
        self.features = [tuple(f) for f in self.features]  # (JSON gives lists)


def _hash_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    from torchrec.distributed.types import ShardedModule

    found = []
    for path, m in model.named_modules():
        if isinstance(m, ShardedModule) or type(m).__name__ == "DistributedModelParallel":
            raise InferenceError(
                f"inference.export: {path or 'the model'} is sharded ({type(m).__name__}); save a checkpoint "
                "(recis_torchrec.checkpoint.save), load it into the unsharded model (checkpoint.load reshards to "
                "one process) and export that, or pass checkpoint= to export"
            )
        if isinstance(m, (HashEmbeddingBagCollection, HashEmbeddingCollection)):
            found.append((path, m))
    if not found:
        raise InferenceError("inference.export: the model holds no HashEmbeddingBagCollection or "
                             "HashEmbeddingCollection (convert it with recis_torchrec.convert first)")
    return found


def _module_tables(m: nn.Module) -> Dict[str, Any]:
    tables = dict(m.tables())
    for name, (table, _) in getattr(m, "_borrowed", {}).items():
        tables[name] = table
    return tables


def _specs(modules: List[Tuple[str, nn.Module]]) -> Tuple[List[_ModuleSpec], Dict[str, Any]]:
    """The modules' layouts and every distinct table by key (a shared table once)."""
    keys: Dict[int, str] = {}
    tables: Dict[str, Any] = {}

    def key_of(path: str, table) -> str:
        if id(table) not in keys:
            keys[id(table)] = f"{path}/{table.name}" if path else table.name
            tables[keys[id(table)]] = table
        return keys[id(table)]

    specs = []
    for path, m in modules:
        by_name = _module_tables(m)
        if isinstance(m, HashEmbeddingBagCollection):
            configs = m.embedding_bag_configs()
            feats = []
            for (t, _, _), name in zip(m._outputs, m._embedding_names):
                c = configs[t]
                feats.append((name, key_of(path, by_name[c.name]), int(m._table_modes[t]), c.embedding_dim))
            specs.append(_ModuleSpec(path, "ebc", feats, bool(m._is_weighted)))
        else:
            feats = []
            for c, pairs in zip(m.embedding_configs(), m._table_features):
                for feature, emb_name in pairs:
                    feats.append((feature, emb_name, key_of(path, by_name[c.name]), c.embedding_dim))
            specs.append(_ModuleSpec(path, "ec", feats, False, bool(m._need_indices)))
    return specs, tables


# -- the dense program: the model with its embedding modules fed from outside ---------


def _feed_key(path: str) -> str:
    """The dense program's input name for the embedding module at `path`."""
    return path.replace(".", "__")


class _Slot:
    """Holds the lookup output of the call in progress (a plain object: a tensor set as a module
    attribute or in a list during torch.export makes it warn that it should be a buffer, and it is an
    input here, not state)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any = None


class _Feed(nn.Module):
    """Stands in for an embedding module while the dense part is exported: returns what the
    serving lookup computed, in the module's output type."""

    def __init__(self, spec: _ModuleSpec) -> None:
        super().__init__()
        self.spec = spec
        self.slot = _Slot()

    def forward(self, features: KeyedJaggedTensor, *args: Any, **kwargs: Any) -> Any:
        if self.spec.kind == "ebc":
            return KeyedTensor(keys=[f[0] for f in self.spec.features],
                               length_per_key=[f[3] for f in self.spec.features], values=self.slot.value)
        return dict(self.slot.value)


class _Dense(nn.Module):
    """The model, its embedding modules replaced by feeds: forward(*model inputs, feeds)."""

    def __init__(self, model: nn.Module, feeds: Dict[str, _Feed]) -> None:
        super().__init__()
        self.model = model
        self.feeds = feeds  # not submodules: they sit inside the model already

    def forward(self, args: Tuple[Any, ...], feeds: Dict[str, Any]) -> Any:
        for path, feed in self.feeds.items():
            feed.slot.value = feeds[_feed_key(path)]
        return self.model(*args)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, module)
    return old


def _dynamic(x: Any) -> Any:
    """A dynamic_shapes spec with every tensor's first dimension free (batch and id counts)."""
    from torch.utils._pytree import SUPPORTED_NODES

    if isinstance(x, torch.Tensor):
        return {0: torch.export.Dim.AUTO} if x.dim() >= 1 else None
    if isinstance(x, dict):
        return {k: _dynamic(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and type(x) in (list, tuple):
        return type(x)(_dynamic(v) for v in x)
    if type(x) in SUPPORTED_NODES:
        children, _ = SUPPORTED_NODES[type(x)].flatten_fn(x)
        return [_dynamic(c) for c in children]
    return None


# -- the lookups a request needs ------------------------------------------------------


def _find_kjt(args: Sequence[Any]) -> KeyedJaggedTensor:
    kjts = [a for a in args if isinstance(a, KeyedJaggedTensor)]
    if len(kjts) != 1:
        raise InferenceError(f"the model's inputs must hold exactly one KeyedJaggedTensor, got {len(kjts)}")
    return kjts[0]


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _request_spec(args: Tuple[Any, ...], kjt: KeyedJaggedTensor) -> Dict[str, Any]:
    """What a request must look like, from the example export took: the KJT's keys in the program's
    order, and for each tensor argument its dtype, its shape past the first dimension and whether
    the first dimension is the batch."""
    batch = kjt.stride()
    tensors = {}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            tensors[str(i)] = {"dtype": _dtype_name(a), "shape": list(a.shape[1:]),
                               "batch": bool(a.dim() >= 1 and a.shape[0] == batch)}
    return {"kjt_keys": list(kjt.keys()), "tensors": tensors}


def _trace_dense(model: nn.Module, specs: List[_ModuleSpec], example_inputs: Tuple[Any, ...],
                 feeds: Dict[str, Any]):
    """The model's dense part as a torch.export program: its embedding modules replaced by inputs
    (the lookups' outputs, `feeds`), every batch dimension free."""
    placeholders = {s.path: _Feed(s) for s in specs}
    if "" in placeholders:
        raise InferenceError("inference.export: the model is itself an embedding module; export the model that "
                             "holds it")
    originals = {p: _set_submodule(model, p, f) for p, f in placeholders.items() if p}
    try:
        with torch.no_grad():
            return torch.export.export(_Dense(model, placeholders), (example_inputs, feeds),
                                       dynamic_shapes=(_dynamic(example_inputs), _dynamic(feeds)), strict=False)
    finally:
        for p, m in originals.items():
            _set_submodule(model, p, m)


DENSE_DIR = "dense"  # a delta's dense part: DELTA/dense/{dense.pt2, dense.json}


def export_dense(model: nn.Module, path: str, example_inputs: Tuple[Any, ...]) -> str:
    """Writes the model's dense part alone (``dense.pt2`` and ``dense.json``: its embedding layout,
    request spec and checksum) to ``path``, for a delta: put it at ``DELTA/dense`` of a delta
    written by ``checkpoint.export_delta`` (before the delta is moved where a server reads it), and
    :meth:`Predictor.apply_delta` swaps it in with the delta's rows, so a model whose dense layers
    train too is served fresh. Written to a temporary directory and renamed into place."""
    if not isinstance(example_inputs, tuple):
        raise InferenceError("inference.export_dense: example_inputs must be a tuple of the model's forward arguments")
    if os.path.exists(path):
        raise InferenceError(f"inference.export_dense: {path} exists")
    modules = _hash_modules(model)
    specs, tables = _specs(modules)
    example_inputs, kjt = _canonical(example_inputs)
    # Lookups of empty tables of the model's dims: the trace needs the feeds' shapes, not their rows.
    empty = {key: ServingTable.build(key, t.dim, "fp32", torch.empty(0, dtype=torch.int64), torch.empty(0, t.dim),
                                     None) for key, t in tables.items()}
    was_training = model.training
    model.eval()
    try:
        program = _trace_dense(model, specs, example_inputs, _lookups(specs, empty, kjt))
    finally:
        model.train(was_training)
    tmp = f"{path.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        program._example_inputs = None
        torch.export.save(program, os.path.join(tmp, PROGRAM_FILE))
        meta = {"format": FORMAT_VERSION, "kind": "dense", "versions": {"torch": torch.__version__},
                "modules": [sp.to_dict() for sp in specs], "request": _request_spec(example_inputs, kjt),
                "program": {"file": PROGRAM_FILE, "bytes": os.path.getsize(os.path.join(tmp, PROGRAM_FILE)),
                            "xxh64_file": file_checksum(os.path.join(tmp, PROGRAM_FILE))}}
        write_json(os.path.join(tmp, "dense.json"), meta)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _dense_of_delta(delta_dir: str, manifest: Dict[str, Any]):
    """The module of a delta's dense part (``export_dense``), checked against the package: the same
    embedding modules and request. None when the delta has none."""
    folder = os.path.join(delta_dir, DENSE_DIR)
    if not os.path.isdir(folder):
        return None
    file = os.path.join(folder, "dense.json")
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InferenceError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != "dense" or meta.get("format") != FORMAT_VERSION:
        raise InferenceError(f"{file}: not a dense part written by inference.export_dense")
    if meta.get("modules") != manifest["modules"] or meta.get("request") != manifest.get("request"):
        raise InferenceError(f"{delta_dir}: its dense part was exported from a model with other embedding modules or "
                             "inputs than the package's; export a new version instead")
    program_file = _verified(folder, meta["program"])
    try:
        return torch.export.load(program_file).module()
    except Exception as e:  # noqa: BLE001 - a corrupt program raises many kinds
        raise InferenceError(f"{program_file}: cannot load the dense program ({type(e).__name__}: {e})") from e


def _check_request(args: Tuple[Any, ...], kjt: KeyedJaggedTensor, spec: Dict[str, Any]) -> KeyedJaggedTensor:
    """Refuses a request the program would misread, naming the culprit, and returns its KJT with the
    program's keys in the program's order (a request may list features in any order, and more)."""
    keys = spec["kjt_keys"]
    have = kjt.keys()
    if len(set(have)) != len(have):
        raise InferenceError(f"the KeyedJaggedTensor names a feature twice: {have}")
    missing = [k for k in keys if k not in have]
    if missing:
        raise InferenceError(f"the KeyedJaggedTensor lacks features {missing} (it has {have})")
    lengths, n = kjt.lengths(), kjt.values().numel()
    batch = kjt.stride()
    if lengths.numel() != len(have) * batch:
        raise InferenceError(f"the KeyedJaggedTensor has {lengths.numel()} lengths for {len(have)} features and "
                             f"batch size {batch}")
    # Two reductions: no negative length and a sum equal to the ids means every length is in range.
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.sum()) != n):
        bad = (lengths < 0) | (lengths > n)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0, 0])
            raise InferenceError(f"feature {have[first // batch]!r}: length {int(lengths[first])} at batch index "
                                 f"{first % batch} is negative or more than the {n} ids given")
        raise InferenceError(f"the KeyedJaggedTensor's lengths sum to {int(lengths.sum())} but it holds {n} ids")
    for i, want in spec["tensors"].items():
        a = args[int(i)] if int(i) < len(args) else None
        if not isinstance(a, torch.Tensor):
            raise InferenceError(f"input {i}: the model takes a tensor there, got {type(a).__name__}")
        if _dtype_name(a) != want["dtype"] or list(a.shape[1:]) != want["shape"]:
            raise InferenceError(
                f"input {i}: the model takes {want['dtype']} of shape (batch, {', '.join(map(str, want['shape']))}), "
                f"got {_dtype_name(a)} of shape {tuple(a.shape)}")
        if want["batch"] and a.shape[0] != batch:
            raise InferenceError(f"input {i} has {a.shape[0]} rows but the KeyedJaggedTensor a batch of {batch}: "
                                 "every input of a request must have the same batch size")
    if list(have) == keys:
        return kjt
    from recis_torchrec.modules.kjt import permute_keys_by_torch

    return permute_keys_by_torch(kjt, [have.index(k) for k in keys])


def _canonical(args: Tuple[Any, ...], spec: Optional[Dict[str, Any]] = None) -> Tuple[Tuple[Any, ...],
                                                                                      KeyedJaggedTensor]:
    """The inputs with their KJT rebuilt from keys, values, weights and lengths only (the form the
    dense program was exported with: no cached offsets or splits, whatever the caller's KJT holds);
    with the package's request `spec`, checked against it and its features put in its order."""
    kjt = original = _find_kjt(args)
    if kjt.variable_stride_per_key():
        raise InferenceError("variable batch size per feature (VBE) KJTs are not served; give every feature "
                             "the same batch")
    values, lengths = kjt.values(), kjt.lengths()
    for what, t in (("ids (values)", values), ("lengths", lengths)):
        if t.dtype not in (torch.int32, torch.int64):
            raise InferenceError(f"the KeyedJaggedTensor's {what} must be int64 or int32 (as training takes them), "
                                 f"got {t.dtype}")
    # int32 ids and lengths are served as the training modules take them: widened to int64, the
    # dtype the dense program was exported with.
    fresh = KeyedJaggedTensor(keys=kjt.keys(), values=values.long(), weights=kjt.weights_or_none(),
                              lengths=lengths.long())
    if spec is not None:
        checked = _check_request(args, fresh, spec)
        if checked is not fresh:  # reordered: again from keys, values, weights and lengths only
            fresh = KeyedJaggedTensor(keys=checked.keys(), values=checked.values(), weights=checked.weights_or_none(),
                                      lengths=checked.lengths())
    return tuple(fresh if a is original else a for a in args), fresh


def _lookups(specs: List[_ModuleSpec], tables: Dict[str, ServingTable], kjt: KeyedJaggedTensor) -> Dict[str, Any]:
    """Every embedding module's output values, from the served tables."""
    needed = sorted({f[0] for s in specs for f in s.features})
    have = set(kjt.keys())
    missing = [f for f in needed if f not in have]
    if missing:
        raise InferenceError(f"the KeyedJaggedTensor lacks features {missing} (it has {kjt.keys()})")
    if len(have) != len(kjt.keys()):
        raise InferenceError(f"the KeyedJaggedTensor names a feature twice: {kjt.keys()}")
    per = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), weights=kjt.weights_or_none(),
                            lengths=kjt.lengths()).to_dict()
    feeds: Dict[str, Any] = {}
    for s in specs:
        if s.kind == "ebc":
            cols = []
            for feature, key, mode, _ in s.features:
                jt = per[feature]
                w = jt.weights_or_none() if s.weighted else None
                if s.weighted and w is None:
                    raise InferenceError(f"{s.path or 'the model'}: feature {feature!r} needs per-id weights")
                cols.append(tables[key].pooled(jt.values(), jt.offsets(), w, mode))
            feeds[_feed_key(s.path)] = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
        else:
            out = {}
            for feature, emb_name, key, _ in s.features:
                jt = per[feature]
                out[emb_name] = JaggedTensor(values=tables[key].rows_of(jt.values()), lengths=jt.lengths(),
                                             weights=jt.values() if s.need_indices else None)
            feeds[_feed_key(s.path)] = out
    return feeds


def _serving_inputs(specs: List[_ModuleSpec], args: Tuple[Any, ...], kjt: KeyedJaggedTensor,
                    feeds: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Where each flat tensor input of the compiled dense program comes from, in its order (the
    tensors of the pytree-flattened ``(args, feeds)``, as AOTInductor's runner takes them): a
    tensor argument, a field of the input KJT, an EBC's pooled output or a field of an EC's
    JaggedTensor. The C++ runner builds its inputs from this list."""
    from torch.utils import _pytree as pytree

    source: Dict[int, Dict[str, Any]] = {}

    def add(holder: Any, **where: Any) -> None:
        for field in ("values", "lengths", "weights"):
            t = getattr(holder, f"_{field}")
            if t is not None:
                source[id(t)] = dict(where, field=field)

    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            source[id(a)] = {"src": "arg", "arg": i}
    add(kjt, src="kjt")
    for s in specs:
        feed = feeds[_feed_key(s.path)]
        if s.kind == "ebc":
            source[id(feed)] = {"src": "ebc", "module": s.path}
            continue
        for emb_name, jt in feed.items():
            add(jt, src="ec", module=s.path, embedding=emb_name)
    plan = []
    for leaf in pytree.tree_flatten((args, feeds))[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        if id(leaf) not in source:
            raise InferenceError(f"inference.export: an input of the dense program ({tuple(leaf.shape)} {leaf.dtype}) "
                                 "is neither a tensor argument, a field of the KJT nor an embedding output; the C++ "
                                 "runner could not build it")
        plan.append(source[id(leaf)])
    return plan


def write_batch(path: str, *inputs: Any) -> str:
    """Writes one request (the model's positional arguments: tensors and one KJT) as a safetensors
    file the C++ runner reads: tensor ``arg{i}`` for argument i, ``arg{i}.values``, ``.lengths``
    and ``.weights`` for the KJT, and their layout in the ``recis_inputs`` metadata."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    layout = []
    for i, a in enumerate(inputs):
        if isinstance(a, KeyedJaggedTensor):
            if a.variable_stride_per_key():
                raise InferenceError(f"write_batch: argument {i}: variable batch size per feature (VBE) KJTs are "
                                     "not served")
            w = a.weights_or_none()
            tensors[f"arg{i}.values"] = a.values().to(torch.int64).contiguous()
            tensors[f"arg{i}.lengths"] = a.lengths().to(torch.int64).contiguous()
            if w is not None:
                tensors[f"arg{i}.weights"] = w.contiguous()
            layout.append({"kind": "kjt", "keys": list(a.keys()), "values": f"arg{i}.values",
                           "lengths": f"arg{i}.lengths", "weights": f"arg{i}.weights" if w is not None else None})
        elif isinstance(a, torch.Tensor):
            tensors[f"arg{i}"] = a.contiguous()
            layout.append({"kind": "tensor", "name": f"arg{i}"})
        else:
            raise InferenceError(f"write_batch: argument {i} is a {type(a).__name__}; a batch file holds tensors "
                                 "and one KeyedJaggedTensor")
    save_file(tensors, path, metadata={"recis_inputs": json.dumps(layout)})
    return path


# -- export -----------------------------------------------------------------------------


def _check_finite(key: str, ids: torch.Tensor, weights: torch.Tensor, what: str, option: str) -> None:
    """Rows holding NaN or infinity would make every prediction that reads them NaN: refused."""
    bad = ~torch.isfinite(weights).all(1) if weights.numel() else torch.zeros(0, dtype=torch.bool)
    if bool(bad.any()):
        raise InferenceError(
            f"table {key!r}: {int(bad.sum())} of {ids.numel()} rows in {what} hold NaN or infinite values (ids "
            f"{ids[bad][:5].tolist()}); every prediction reading them would be NaN. {option}=True takes them anyway")


def _write_table(directory: str, key: str, table, quantize: str, max_file_bytes: int,
                 allow_nonfinite: bool = False, version: int = 0) -> Dict[str, Any]:
    ids, weights, _, _ = table.export_rows()
    if not allow_nonfinite:
        _check_finite(key, ids, weights, "the model", "export(..., allow_nonfinite")
    order = torch.argsort(ids)
    ids, weights = ids[order], weights[order]
    rows = quantize_rows(weights.float(), quantize)
    kind, a, b, seed, _ = table_parameters(table.name, table.options, table.num_embeddings, table.init_range)
    folder = os.path.join("tables", safe_key(key))
    os.makedirs(os.path.join(directory, folder), exist_ok=True)
    row_bytes = 8 + rows.shape[1] * rows.element_size()
    per_file = max(1, max_file_bytes // row_bytes)
    entries = []
    for k, lo in enumerate(range(0, max(ids.numel(), 1), per_file)):
        name = os.path.join(folder, f"part{k}.safetensors")
        entry = write_tensors(os.path.join(directory, name), {"ids": ids[lo:lo + per_file],
                                                              "rows": rows[lo:lo + per_file]}, {"table": key})
        entry["file"] = name
        entries.append(entry)
    from recis_torchrec.checkpoint.saver import table_lineage

    return {"name": table.name, "dim": table.dim, "rows": int(ids.numel()), "quantization": quantize,
            "lineage": table_lineage(table), "version": version,
            "init": {"kind": int(kind), "a": float(a), "b": float(b), "seed": int(seed)}, "files": entries}


def export(
    model: nn.Module,
    path: str,
    example_inputs: Tuple[Any, ...],
    quantize: str = "fp32",
    unseen: str = "init",
    checkpoint: Optional[str] = None,
    max_file_bytes: int = 256 << 20,
    metadata: Optional[Dict[str, Any]] = None,
    aot_inductor: bool = False,
    allow_nonfinite: bool = False,
) -> str:
    """Writes an inference package of `model` to the new directory `path`.

    Args:
        model: an unsharded model holding our embedding modules (a DistributedModelParallel one is
            refused: load its checkpoint into the unsharded model, or pass `checkpoint`).
        example_inputs: the model's forward arguments for one batch (one of them a KJT); the dense
            program is exported on them with every batch dimension free.
        quantize: the tables' rows: ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"int8"`` (row-wise: a
            float scale and bias per row, FBGEMM's fused 8-bit layout).
        unseen: what an id the tables do not hold reads: ``"init"`` (its deterministic initial row,
            what the training model's eval forward reads) or ``"zero"``.
        checkpoint: a training checkpoint (``checkpoint.save``; any world size) to load into
            `model` first.
        max_file_bytes: the largest table shard.
        metadata: JSON kept in the manifest (the CLI stores the training config there, for
            ``predict`` to read data files with its schema).
        aot_inductor: also compile the dense program ahead of time with AOTInductor
            (``torch._inductor.aoti_compile_and_package``) into ``dense.aoti.pt2``, which
            ``load(path, dense="aoti")`` runs. Takes a C++ compiler and tens of seconds.
        allow_nonfinite: write tables holding NaN or infinite rows (refused by default, naming the
            table and how many rows).

    Returns:
        `path`. The package holds no optimizer state and no row metadata.
    """
    if quantize not in FORMATS:
        raise InferenceError(f"inference.export: quantize must be one of {sorted(FORMATS)}, got {quantize!r}")
    if unseen not in UNSEEN:
        raise InferenceError(f"inference.export: unseen must be one of {UNSEEN}, got {unseen!r}")
    if not isinstance(example_inputs, tuple):
        raise InferenceError("inference.export: example_inputs must be a tuple of the model's forward arguments")
    if isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int) or max_file_bytes <= 0:
        raise InferenceError(f"inference.export: max_file_bytes must be a positive int, got {max_file_bytes!r}")
    if not isinstance(aot_inductor, bool):
        raise InferenceError(f"inference.export: aot_inductor must be True or False, got {aot_inductor!r}")
    if not isinstance(allow_nonfinite, bool):
        raise InferenceError(f"inference.export: allow_nonfinite must be True or False, got {allow_nonfinite!r}")
    if os.path.exists(path) and os.listdir(path):
        raise InferenceError(f"inference.export: {path} exists and is not empty")
    if checkpoint is not None:
        from recis_torchrec import checkpoint as ckpt

        ckpt.load(checkpoint, model)
    modules = _hash_modules(model)
    specs, tables = _specs(modules)
    example_inputs, kjt = _canonical(example_inputs)
    seen: Dict[str, bool] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, p=p: seen.__setitem__(p, bool(a) and a[0] is kjt))
             for p, m in modules]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    bad = [p for p, _ in modules if not seen.get(p)]
    if bad:
        model.train(was_training)
        raise InferenceError(
            f"inference.export: {bad} do not read the model's input KeyedJaggedTensor as it is (they are not "
            "called, or called with a KJT computed inside the model); the package looks ids up before the dense "
            "program runs, so each embedding module must take the input KJT"
        )
    tmp = f"{path.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        # Each table's update count: the version a delta must follow.
        versions: Dict[int, int] = {}
        for _, m in modules:
            steps = m.hash_optimizer.steps()
            for name, t in _module_tables(m).items():
                if name in steps:  # a borrowed (shared) table counts in its owner's optimizer
                    versions.setdefault(id(t), steps[name])
        manifest_tables = {key: _write_table(tmp, key, t, quantize, max_file_bytes, allow_nonfinite,
                                             versions.get(id(t), 0)) for key, t in tables.items()}
        served = {key: _table_from_files(tmp, key, entry, unseen) for key, entry in manifest_tables.items()}
        example_inputs, kjt = _canonical(example_inputs)  # a KJT without the offsets the eager run cached
        try:
            program = _trace_dense(model, specs, example_inputs, _lookups(specs, served, kjt))
        finally:
            model.train(was_training)
        aoti = serving_inputs = None
        if aot_inductor:
            aoti = os.path.join(tmp, AOTI_FILE)
            torch._inductor.aoti_compile_and_package(program, package_path=aoti)
            # The plan maps the program's flat inputs by tensor identity, and the export's run left
            # cached offsets on the KJT (extra leaves the program does not take): a fresh canonical
            # KJT and fresh lookups give exactly the leaves the program was traced with.
            example_inputs, kjt = _canonical(example_inputs)
            serving_inputs = _serving_inputs(specs, example_inputs, kjt, _lookups(specs, served, kjt))
        program._example_inputs = None  # the KJT of the example would need unpickling on load
        torch.export.save(program, os.path.join(tmp, PROGRAM_FILE))
        manifest = {
            "format": FORMAT_VERSION,
            "kind": "inference",
            "versions": {"recis_torchrec": _version, "torch": torch.__version__},
            "quantization": quantize,
            "unseen": unseen,
            "modules": [s.to_dict() for s in specs],
            "features": sorted({f[0] for s in specs for f in s.features}),
            "request": _request_spec(example_inputs, kjt),
            "tables": manifest_tables,
            "program": {"file": PROGRAM_FILE, "bytes": os.path.getsize(os.path.join(tmp, PROGRAM_FILE)),
                        "xxh64_file": file_checksum(os.path.join(tmp, PROGRAM_FILE))},
            "metadata": metadata or {},
        }
        if aoti is not None:
            manifest["aoti_program"] = {"file": AOTI_FILE, "bytes": os.path.getsize(aoti),
                                        "xxh64_file": file_checksum(aoti)}
            manifest["serving_inputs"] = serving_inputs
        write_manifest(tmp, manifest)
        _check_package(tmp, manifest, specs, example_inputs, reference, quantize, aoti is not None,
                       served if unseen == "init" else None)
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_package(directory: str, manifest: Dict[str, Any], specs: List["_ModuleSpec"], example_inputs: Tuple[Any, ...],
                   reference: Any, quantize: str, aoti: bool, tables: Optional[Dict[str, ServingTable]]) -> None:
    """The written package, read back as a server reads it, predicts the eval model's outputs on the
    example batch (within the row format's bound; unseen ids read their initial rows, as the eval
    model does): a package that would serve other predictions is never written. `tables`: the
    package's tables already read from its files with unseen ids reading their initial rows (read
    here otherwise)."""
    from torch.utils import _pytree as pytree

    if tables is None:
        tables = {key: _table_from_files(directory, key, entry, "init") for key, entry in manifest["tables"].items()}
    bound = EXPORT_TOLERANCE[quantize]
    runs = [("the exported program", torch.export.load(os.path.join(directory, manifest["program"]["file"])).module(),
             bound)]
    if aoti:  # compiled kernels may round differently from eager (measured within 1e-5)
        runs.append(("the AOTInductor program",
                     torch._inductor.aoti_load_package(os.path.join(directory, manifest["aoti_program"]["file"])),
                     max(bound, 1e-4)))
    want, want_spec = pytree.tree_flatten(reference)
    for what, module, bound in runs:
        inputs, kjt = _canonical(example_inputs)
        with torch.no_grad():
            got, got_spec = pytree.tree_flatten(module(inputs, _lookups(specs, tables, kjt)))
        if len(got) != len(want):
            raise InferenceError(f"inference.export: {what} returns {len(got)} outputs, the model {len(want)} "
                                 f"({got_spec} against {want_spec}); no package written")
        for i, (g, w) in enumerate(zip(got, want)):
            if not isinstance(w, torch.Tensor):
                continue
            if g.shape != w.shape:
                raise InferenceError(f"inference.export: output {i} of {what} has shape {tuple(g.shape)}, the "
                                     f"model's {tuple(w.shape)}; no package written")
            err = (g.float() - w.float()).abs().max().item() if w.numel() else 0.0
            if not err <= bound:  # NaN fails too
                raise InferenceError(
                    f"inference.export: output {i} of {what} differs from the model's eval output on the example "
                    f"batch by {err:.3g} (the bound for {quantize} rows is {bound:g}); no package written")


# -- load ---------------------------------------------------------------------------------


def _table_from_files(directory: str, key: str, entry: Dict[str, Any], unseen: str) -> ServingTable:
    parts = []
    for e in entry["files"]:
        try:
            parts.append(read_tensors(directory, e))
        except CheckpointError as err:
            raise InferenceError(f"table {key!r}: {err}") from None
        if set(parts[-1]) != {"ids", "rows"}:
            raise InferenceError(f"table {key!r}: {e['file']} holds {sorted(parts[-1])}, not ids and rows")
    ids = torch.cat([p["ids"] for p in parts])
    rows = torch.cat([p["rows"] for p in parts])
    if ids.numel() != entry["rows"]:
        raise InferenceError(f"table {key!r}: {ids.numel()} rows in its files, the manifest says {entry['rows']}")
    fmt, dim = entry.get("quantization"), entry.get("dim")
    if fmt not in FORMATS or not isinstance(dim, int) or dim <= 0:
        raise InferenceError(f"table {key!r}: the manifest names the row format {fmt!r} of dim {dim!r} (formats: "
                             f"{sorted(FORMATS)})")
    want = quantize_rows(torch.empty(0, dim), fmt)  # the format's dtype and row width
    if rows.dtype != want.dtype or rows.dim() != 2 or rows.shape[1] != want.shape[1]:
        raise InferenceError(
            f"table {key!r}: the manifest says {fmt} rows of dim {dim} ({want.dtype}, width {want.shape[1]}), its files "
            f"hold {rows.dtype} rows of shape {tuple(rows.shape)}")
    init = entry["init"] if unseen == "init" else None
    if init is not None and init.get("kind") not in (0, 1, 2, 3):  # csrc/hashtable/initializer.h's InitKind
        raise InferenceError(f"table {key!r}: unknown initializer kind {init.get('kind')!r}")
    return ServingTable.build(key, dim, fmt, ids, rows, init)


MANIFEST_FILE = "manifest.json"
# The XXH64 of manifest.json's bytes, as 16 hex digits: a reader checks the bytes it parses, so no
# reader (the C++ runner included) needs to re-serialise the document the way Python's json does.
MANIFEST_CHECKSUM_FILE = "manifest.xxh64"


def write_manifest(path: str, manifest: Dict[str, Any]) -> None:
    """``manifest.json`` and its checksum sidecar, both fsync'd."""
    write_json(os.path.join(path, MANIFEST_FILE), manifest)
    digest = file_checksum(os.path.join(path, MANIFEST_FILE))
    with open(os.path.join(path, MANIFEST_CHECKSUM_FILE), "w") as f:
        f.write(digest + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path: str) -> Dict[str, Any]:
    """A package's manifest, verified against its checksum (``manifest.xxh64``, the XXH64 of the
    file's bytes; a package from before that sidecar carries the checksum of its canonical JSON in its
    ``xxh64`` field, which is checked instead)."""
    file = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(file):
        raise InferenceError(f"{path}: not an inference package (no manifest.json)")
    sidecar = os.path.join(path, MANIFEST_CHECKSUM_FILE)
    try:
        with open(file, "rb") as f:
            data = f.read()
        manifest = json.loads(data)
        want = open(sidecar).read().strip() if os.path.exists(sidecar) else None
    except (OSError, ValueError) as e:
        raise InferenceError(f"{file}: unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != "inference":
        raise InferenceError(f"{file}: not an inference manifest")
    if want is not None:
        ok = checksum(data) == want
    else:
        ok = "xxh64" in manifest and manifest["xxh64"] == index_checksum(manifest)
    if not ok:
        raise InferenceError(f"{file}: checksum mismatch (the manifest was edited or is corrupt)")
    if manifest.get("format") != FORMAT_VERSION:
        raise InferenceError(f"{file}: package format {manifest.get('format')} is not supported")
    return manifest


class Predictor:
    """A loaded inference package: ``predictor(*inputs)`` is the model's eval output.

    Read-only (lookups insert nothing) and safe to call from many threads at once: each request
    reads one immutable version of the tables, and :meth:`apply_delta` swaps in the next."""

    def __init__(self, path: str, manifest: Dict[str, Any], tables: Dict[str, ServingTable], program) -> None:
        self.path = path
        self.manifest = manifest
        self.specs = [_ModuleSpec.from_dict(d) for d in manifest["modules"]]
        self._program = program
        self.dense_from_delta = False  # the dense module came with a delta
        self._aoti = False  # the dense module is the AOTInductor one (load(dense="aoti"))
        # (tables, deltas applied to them, the dense module): the one state a request reads, replaced
        # whole by one assignment per delta (the tables are never mutated).
        self._versioned = (tables, 0, program.module())
        self._delta_lock = threading.Lock()
        # Each table's update count (the package's, then the last delta's): a delta must follow it.
        self.versions = {k: e.get("version") for k, e in manifest["tables"].items()}

    @property
    def tables(self) -> Dict[str, ServingTable]:
        return self._versioned[0]

    @property
    def deltas_applied(self) -> int:
        return self._versioned[1]

    def __call__(self, *inputs: Any) -> Any:
        return self.predict_versioned(*inputs)[0]

    def predict_versioned(self, *inputs: Any) -> Tuple[Any, int]:
        """The outputs and the number of deltas applied to the tables that computed them (read with
        the tables, in one step: a delta applied meanwhile is in neither or both)."""
        tables, deltas, module = self._versioned  # one version for the whole request
        inputs, kjt = _canonical(inputs, self.manifest.get("request"))
        feeds = _lookups(self.specs, tables, kjt)
        with torch.no_grad():
            return module(inputs, feeds), deltas

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes held per table (index, ids, rows)."""
        return {k: t.nbytes for k, t in self.tables.items()}

    def apply_delta(self, delta_dir: str, allow_nonfinite: bool = False) -> None:
        """Applies a training delta (``checkpoint.export_delta``): its rows (quantized as the package's)
        and its evicted ids. Requests in flight finish on the tables they started with; later ones
        see every table of the delta at once. A delta holding NaN or infinite rows is refused (naming
        the table) unless `allow_nonfinite`; a refused delta changes nothing."""
        if not isinstance(allow_nonfinite, bool):
            raise InferenceError(f"apply_delta: allow_nonfinite must be True or False, got {allow_nonfinite!r}")
        with self._delta_lock:
            try:
                index = read_index(delta_dir)
            except CheckpointError as e:
                raise InferenceError(str(e)) from None
            if index.get("kind") != "delta":
                raise InferenceError(f"{delta_dir}: not a delta (kind {index.get('kind')!r})")
            tables, deltas, module = self._versioned
            new = dict(tables)
            versions = dict(self.versions)
            # A Trainer's deltas name its tables inside the task wrapper ("model."): they apply here too.
            to_saved = saved_name(list(tables), index.get("tables", {}))
            for key, table in tables.items():
                entry = index["tables"].get(to_saved(key))
                if entry is None:
                    raise InferenceError(f"table {key!r} is not in the delta {delta_dir}")
                mine = self.manifest["tables"][key].get("lineage")
                if mine is not None and entry.get("lineage") is not None and entry["lineage"] != mine:
                    raise InferenceError(
                        f"table {key!r}: the delta {delta_dir} is of another training run (lineage "
                        f"{entry['lineage'][:12]}, the package's {mine[:12]}): its rows would overwrite unrelated ones")
                have, since, to = versions.get(key), entry.get("since_steps"), entry.get("to")
                if have is not None and isinstance(since, int) and isinstance(to, int) and not since <= have <= to:
                    raise InferenceError(
                        f"table {key!r}: the delta {delta_dir} holds the updates after {since} up to {to}, but the "
                        f"package is at {have}; it does not follow it (apply the deltas in order, each taken since the "
                        "checkpoint the package came from or a later one it has seen)")
                if isinstance(to, int):
                    versions[key] = to
                try:
                    parts = [read_tensors(delta_dir, e) for e in entry["files"]]
                    evicted = [read_tensors(delta_dir, e)["ids"] for e in entry["evicted"]]
                except (CheckpointError, KeyError) as e:
                    raise InferenceError(f"table {key!r}: {e}") from None
                ids = torch.cat([p["ids"] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
                weights = torch.cat([p["weights"] for p in parts]) if parts else torch.empty(0, table.dim)
                if weights.shape[1:] != (table.dim,):
                    raise InferenceError(f"table {key!r}: the delta's rows are {tuple(weights.shape)}, "
                                         f"the package's dim is {table.dim}")
                if not allow_nonfinite:
                    _check_finite(key, ids, weights, f"the delta {delta_dir}", "apply_delta(..., allow_nonfinite")
                gone = torch.cat(evicted) if evicted else torch.empty(0, dtype=torch.int64)
                new[key] = table.updated(ids, quantize_rows(weights.float(), table.quantization), gone)
            dense = _dense_of_delta(delta_dir, self.manifest)
            if dense is not None:
                if self._aoti:
                    raise InferenceError(f"{delta_dir}: its dense part is an exported program, and this predictor "
                                         "runs the AOTInductor one (load(dense='export') to take dense deltas)")
                module = dense
                self.dense_from_delta = True
            self._versioned = (new, deltas + 1, module)  # one assignment: the swap requests see
            self.versions = versions


def _verified(path: str, entry: Dict[str, Any]) -> str:
    try:
        return verified_path(path, entry)
    except CheckpointError as e:
        raise InferenceError(str(e)) from None


def load(path: str, dense: str = "export") -> Predictor:
    """Loads a package written by :func:`export` and verifies every file against the manifest.
    ``dense="aoti"`` runs the AOTInductor-compiled dense program (``export(..., aot_inductor=True)``)
    instead of the exported one."""
    if dense not in ("export", "aoti"):
        raise InferenceError(f"inference.load: dense must be 'export' or 'aoti', got {dense!r}")
    manifest = read_manifest(path)
    tables = {}
    for key, entry in manifest["tables"].items():
        tables[key] = _table_from_files(path, key, entry, manifest["unseen"])
    for d in manifest["modules"]:
        spec = _ModuleSpec.from_dict(d)
        for f in spec.features:
            key = f[1] if spec.kind == "ebc" else f[2]
            if key not in tables:
                raise InferenceError(f"{path}: module {spec.path or 'the model'!r} looks feature {f[0]!r} up in table "
                                     f"{key!r}, which the manifest does not list")
    made_with = str((manifest.get("versions") or {}).get("torch", ""))
    if made_with.split(".")[:2] != torch.__version__.split(".")[:2]:
        import warnings

        warnings.warn(f"{path}: the package was exported with torch {made_with or '(unknown)'}, this is torch "
                      f"{torch.__version__}; its dense program may not load or may run differently", UserWarning,
                      stacklevel=2)
    file = _verified(path, manifest["program"])
    try:
        program = torch.export.load(file)
    except Exception as e:  # noqa: BLE001 - a corrupt program raises many kinds
        raise InferenceError(f"{file}: cannot load the dense program ({type(e).__name__}: {e})") from e
    predictor = Predictor(path, manifest, tables, program)
    if dense == "aoti":
        if "aoti_program" not in manifest:
            raise InferenceError(f"{path}: the package has no AOTInductor program (export with aot_inductor=True)")
        predictor._aoti = True
        predictor._versioned = (tables, 0, torch._inductor.aoti_load_package(_verified(path, manifest["aoti_program"])))
    return predictor
