# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""A served request: the model's positional arguments (its tensors and one KeyedJaggedTensor), read
from and written to JSON, and several requests merged into one batch and split back.

JSON form (modelled on TorchRec's predictor request: dense features, per-feature ids, lengths and
weights, a batch size)::

    {"batch_size": 2,
     "dense": {"0": [[0.1, 0.2], [0.3, 0.4]]},     # tensor arguments by position (a list: argument 0)
     "sparse": {"f0": {"lengths": [1, 2], "values": [11, 12, 13]},
                "f1": {"lengths": [0, 1], "values": [7], "weights": [0.5]}},
     "deadline_ms": 50}                              # optional

The package's manifest (its ``request`` spec) says where the KJT and each tensor argument go and
their dtypes; anything that does not fit is refused with a message naming it."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recis_torchrec.inference.package import InferenceError

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


class RequestError(InferenceError):
    """A request that does not fit the served model (HTTP 400, gRPC INVALID_ARGUMENT)."""


class ModelError(InferenceError):
    """The served model misbehaved (an output without the batch as its first dimension, ...): HTTP
    500, gRPC INTERNAL; not the request's fault."""


# The longest deadline a request may ask for: an unbounded one overflows the wait's clock.
MAX_DEADLINE_MS = 3_600_000.0


@dataclass
class Request:
    """One request: the model's positional arguments, its batch size and an optional deadline
    (``time.monotonic()`` seconds)."""

    args: Tuple[Any, ...]
    batch_size: int
    deadline: Optional[float] = None
    received: float = 0.0
    future: Any = field(default=None, repr=False)

    @property
    def kjt(self) -> KeyedJaggedTensor:
        return next(a for a in self.args if isinstance(a, KeyedJaggedTensor))


def arity(manifest: Dict[str, Any]) -> Tuple[int, int, Dict[str, Any]]:
    """(number of positional arguments, position of the KJT, tensor specs by position) of a package."""
    spec = manifest.get("request") or {}
    tensors = spec.get("tensors", {})
    n = len(tensors) + 1
    kjt_at = next(i for i in range(n) if str(i) not in tensors)
    return n, kjt_at, tensors


def from_json(body: Any, manifest: Dict[str, Any]) -> Request:
    """A request from its JSON form, checked against the package's request spec."""
    if not isinstance(body, dict):
        raise RequestError(f"a request is a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"batch_size", "dense", "sparse", "deadline_ms"})
    if unknown:
        raise RequestError(f"unknown request fields {unknown} (a request has batch_size, dense, sparse, deadline_ms)")
    batch = body.get("batch_size")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
        raise RequestError(f"batch_size must be an integer >= 0, got {batch!r}")
    dense = body.get("dense", {})
    _, _, specs = arity(manifest)
    if isinstance(dense, list):
        dense = {str(next(iter(specs))) if len(specs) == 1 else "0": dense}
    if not isinstance(dense, dict):
        raise RequestError("dense must map argument positions to nested lists of numbers")
    tensors = {}
    for pos, value in dense.items():
        spec = specs.get(pos)
        tensors[pos] = _dense_from_json(value, spec["dtype"] if spec else "float32", f"dense argument {pos}")
    return from_parts(batch, tensors, _kjt_from_json(body.get("sparse"), batch), body.get("deadline_ms"), manifest)


def _dense_from_json(value: Any, dtype_name: str, what: str) -> torch.Tensor:
    """A nested JSON list as a tensor of the argument's dtype, refusing what the conversion would change
    without a word: a fraction or a bool into an integer dtype, a number out of the dtype's range, a
    finite number that becomes infinite."""
    import numpy as np

    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise RequestError(f"{what}: not a nested list of numbers ({e})") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise RequestError(f"{what}: not a nested list of numbers (ragged, or holding {arr.dtype.kind!r} values)")
    dtype = _DTYPES[dtype_name]
    if dtype == torch.bool:
        if arr.size and arr.dtype.kind != "b":
            raise RequestError(f"{what}: the model takes bool; give true or false")
    elif not dtype.is_floating_point:
        if arr.size and arr.dtype.kind not in "iu":
            raise RequestError(f"{what}: the model takes {dtype_name}; give integers (a fraction or a bool would "
                               "be changed)")
        info = torch.iinfo(dtype)
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise RequestError(f"{what}: values outside {dtype_name}'s range [{info.min}, {info.max}]")
    elif arr.dtype.kind == "b":
        raise RequestError(f"{what}: the model takes {dtype_name}; give numbers, not true or false")
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
    if dtype.is_floating_point and arr.size and arr.dtype.kind == "f":
        overflow = torch.isinf(t) & torch.from_numpy(np.isfinite(arr))
        if bool(overflow.any()):
            raise RequestError(f"{what}: values too large for {dtype_name} (they would become infinite)")
    return t


def from_parts(batch: int, dense: Dict[str, torch.Tensor], kjt: KeyedJaggedTensor, deadline_ms: Any,
               manifest: Dict[str, Any]) -> Request:
    """A request from its parts (the JSON and gRPC forms both end here): the tensor arguments by
    position, the KJT, the deadline; checked against the package's request spec."""
    n, kjt_at, specs = arity(manifest)
    extra = sorted(set(dense) - set(specs))
    if extra:
        raise RequestError(f"dense gives arguments {extra}; the model takes tensors at positions {sorted(specs)}")
    args: List[Any] = [None] * n
    for pos, spec in specs.items():
        if pos not in dense:
            raise RequestError(f"dense lacks argument {pos} ({spec['dtype']} of shape (batch, "
                               f"{', '.join(map(str, spec['shape']))}))")
        t = dense[pos]
        if t.dtype != _DTYPES[spec["dtype"]]:
            raise RequestError(f"dense argument {pos} is {str(t.dtype).replace('torch.', '')}, the model takes "
                               f"{spec['dtype']}")
        if t.numel() == 0:  # [] has no shape of its own
            t = t.reshape(0, *spec["shape"])
        # Checked here, per request: in a merged batch the rows of two wrong requests can add up.
        if t.dim() < 1 or list(t.shape[1:]) != list(spec["shape"]) or (spec["batch"] and t.shape[0] != batch):
            dims = ", ".join(map(str, spec["shape"]))
            raise RequestError(f"dense argument {pos} has shape {tuple(t.shape)}; the model takes ("
                               f"{'batch_size ' + str(batch) if spec['batch'] else 'n'}{', ' + dims if dims else ''})")
        args[int(pos)] = t
    args[kjt_at] = kjt
    if deadline_ms is not None and (not isinstance(deadline_ms, (int, float)) or isinstance(deadline_ms, bool)
                                    or not 0 < deadline_ms <= MAX_DEADLINE_MS):
        raise RequestError(f"deadline_ms must be a number in (0, {MAX_DEADLINE_MS:g}], got {deadline_ms!r}")
    return Request(tuple(args), batch, None if deadline_ms is None else float(deadline_ms))


def _kjt_from_json(sparse: Any, batch: int) -> KeyedJaggedTensor:
    if not isinstance(sparse, dict) or not sparse:
        raise RequestError("sparse must map feature names to {lengths, values[, weights]}")
    parts = {}
    for name, f in sparse.items():
        if not isinstance(f, dict) or not {"lengths", "values"} <= set(f) or set(f) - {"lengths", "values", "weights"}:
            raise RequestError(f"sparse feature '{name}' must be {{lengths, values[, weights]}}")
        ln = _int64_list(f["lengths"], f"sparse feature '{name}': lengths")
        v = _int64_list(f["values"], f"sparse feature '{name}': values (ids)")
        w = None
        if "weights" in f:
            try:
                w = torch.tensor(f["weights"], dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as e:
                raise RequestError(f"sparse feature '{name}': weights must be a list of numbers ({e})") from None
        parts[name] = (ln, v, w)
    return kjt_from_parts(parts, batch)


def _int64_list(value: Any, what: str) -> torch.Tensor:
    """A JSON list of integers as int64; anything else (a float, which int64 would truncate to
    another id without a word, a bool, a string, a number past int64) is refused."""
    # set(map(type, ...)) walks the list in C: a third of a request's decoding time went to a Python-level
    # all(isinstance(...)). bool is its own type, so True is refused as before.
    if not isinstance(value, list) or not set(map(type, value)) <= {int}:
        bad = next((x for x in value if not isinstance(x, int) or isinstance(x, bool)), value) \
            if isinstance(value, list) else value
        raise RequestError(f"{what} must be a list of integers, got {bad!r}")
    try:
        return torch.tensor(value, dtype=torch.int64)
    except (OverflowError, RuntimeError, ValueError) as e:
        raise RequestError(f"{what}: not int64 ({e})") from None


def kjt_from_parts(parts: Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
                   batch: int) -> KeyedJaggedTensor:
    """The request's KJT from (lengths, values, weights or None) per feature, checked."""
    if not parts:
        raise RequestError("sparse must map feature names to {lengths, values[, weights]}")
    keys, values, lengths, weights = [], [], [], []
    weighted = None
    for name, (ln, v, w) in parts.items():
        if ln.dim() != 1 or ln.numel() != batch:
            raise RequestError(f"sparse feature '{name}' has {ln.numel()} lengths for batch_size {batch}")
        if v.dim() != 1 or (ln < 0).any() or int(ln.sum()) != v.numel():
            raise RequestError(f"sparse feature '{name}': lengths must be >= 0 and add up to its {v.numel()} values")
        if weighted is not None and (w is not None) != weighted:
            raise RequestError("either every sparse feature has weights or none has")
        weighted = w is not None
        if w is not None:
            if w.shape != v.shape:
                raise RequestError(f"sparse feature '{name}' has {w.numel()} weights for {v.numel()} values")
            weights.append(w)
        keys.append(name)
        values.append(v)
        lengths.append(ln)
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths),
                             weights=torch.cat(weights) if weighted else None)


def to_json(args: Sequence[Any], deadline_ms: Optional[float] = None) -> Dict[str, Any]:
    """The JSON form of the model's positional arguments (tensors and one KJT)."""
    kjts = [a for a in args if isinstance(a, KeyedJaggedTensor)]
    if len(kjts) != 1:
        raise RequestError(f"a request holds exactly one KeyedJaggedTensor, got {len(kjts)}")
    kjt = kjts[0]
    out: Dict[str, Any] = {"batch_size": kjt.stride(), "dense": {}, "sparse": {}}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            out["dense"][str(i)] = a.tolist()
        elif not isinstance(a, KeyedJaggedTensor):
            raise RequestError(f"argument {i} is a {type(a).__name__}; a request holds tensors and one KJT")
    for name, jt in kjt.to_dict().items():
        f = {"lengths": jt.lengths().tolist(), "values": jt.values().tolist()}
        if jt.weights_or_none() is not None:
            f["weights"] = jt.weights().tolist()
        out["sparse"][name] = f
    if deadline_ms is not None:
        out["deadline_ms"] = deadline_ms
    return out


def outputs_to_json(out: Any) -> List[Any]:
    """A model's output (a tensor, or a tuple or list of tensors) as a list of nested lists."""
    return [t.tolist() for t in _tensors(out)]


def _tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise ModelError(f"the served model returns a {type(out).__name__}; the server serves models that return "
                     "a tensor or a tuple of tensors")


# -- batching ------------------------------------------------------------------------------


def mergeable(a: Request, b: Request, batch_args: Dict[int, bool]) -> bool:
    """Whether two requests can run as one batch: the same features (weighted alike) and the same
    non-batch tensor arguments."""
    ka, kb = a.kjt, b.kjt
    if ka.keys() != kb.keys() or (ka.weights_or_none() is None) != (kb.weights_or_none() is None):
        return False
    for i, (x, y) in enumerate(zip(a.args, b.args)):
        if isinstance(x, torch.Tensor) and not batch_args.get(i, True):
            if x.shape != y.shape or not torch.equal(x, y):
                return False
    return True


def merge(requests: Sequence[Request], batch_args: Dict[int, bool]) -> Tuple[Any, ...]:
    """One batch of the requests' rows, in request order."""
    if len(requests) == 1:
        return requests[0].args
    first = requests[0]
    out: List[Any] = []
    for i, a in enumerate(first.args):
        if isinstance(a, KeyedJaggedTensor):
            per_key = [r.args[i].to_dict() for r in requests]
            keys = a.keys()
            weighted = a.weights_or_none() is not None
            values = [d[k].values() for k in keys for d in per_key]
            lengths = [d[k].lengths() for k in keys for d in per_key]
            weights = [d[k].weights() for k in keys for d in per_key] if weighted else None
            out.append(KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths),
                                         weights=torch.cat(weights) if weighted else None))
        elif batch_args.get(i, True):
            for r in requests:  # from_parts checks this; a request built otherwise must not shift rows
                if r.args[i].shape[0] != r.batch_size:
                    raise RequestError(f"argument {i} has {r.args[i].shape[0]} rows for batch_size {r.batch_size}")
            out.append(torch.cat([r.args[i] for r in requests]))
        else:
            out.append(a)
    return tuple(out)


def split(out: Any, sizes: Sequence[int]) -> List[List[torch.Tensor]]:
    """A batch's outputs cut back into each request's rows."""
    tensors = _tensors(out)
    total = sum(sizes)
    for t in tensors:
        if t.dim() == 0 or t.shape[0] != total:
            raise ModelError(f"the served model returned an output of shape {tuple(t.shape)} for a batch of "
                             f"{total}: outputs must have the batch as their first dimension to be batched")
    parts = [t.split(list(sizes)) for t in tensors]
    return [[p[k] for p in parts] for k in range(len(sizes))]
