# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The model server's gRPC endpoint (``predictor.proto``, loaded at run time with
``grpc.protos_and_services``: no generated files) and its client.

Status codes: INVALID_ARGUMENT for a request that does not fit the model (the message names the field
or feature), RESOURCE_EXHAUSTED when the queue is full, DEADLINE_EXCEEDED past the request's
deadline, FAILED_PRECONDITION for a rollback with no earlier version."""

import functools
import json
import os
import sys
from concurrent import futures
from typing import TYPE_CHECKING, Any, Dict, Optional

import grpc
import torch

from recis_torchrec.inference.package import InferenceError
from recis_torchrec.serve.batcher import DeadlineExceeded, Overloaded
from recis_torchrec.serve.request import _DTYPES, ModelError, RequestError, from_parts, kjt_from_parts

if TYPE_CHECKING:
    from recis_torchrec.serve.server import ModelServer

_PROTO = "recis_torchrec/serve/predictor.proto"


@functools.lru_cache(maxsize=None)
def protos_and_services():
    """The messages and service stubs of ``predictor.proto`` (compiled by grpc_tools in memory)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)  # protos_and_services finds the file through sys.path
    try:
        return grpc.protos_and_services(_PROTO)
    finally:
        if added:
            sys.path.remove(root)


def tensor_to_proto(t: torch.Tensor):
    protos, _ = protos_and_services()
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise InferenceError(f"a tensor of dtype {t.dtype} cannot be sent (dtypes: {sorted(_DTYPES)})")
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return protos.Tensor(shape=list(t.shape), dtype=name, data=data)


def tensor_from_proto(m, what: str) -> torch.Tensor:
    if m.dtype not in _DTYPES:
        raise RequestError(f"{what}: unknown dtype {m.dtype!r} (dtypes: {sorted(_DTYPES)})")
    dtype = _DTYPES[m.dtype]
    shape = list(m.shape)
    n = 1
    for d in shape:
        if d < 0:
            raise RequestError(f"{what}: negative dimension in shape {shape}")
        n *= d
    size = torch.empty(0, dtype=dtype).element_size()
    if len(m.data) != n * size:
        raise RequestError(f"{what}: {len(m.data)} bytes for shape {shape} of {m.dtype} ({n * size} bytes)")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(m.data), dtype=dtype).reshape(shape)


def _array(data: bytes, dtype: torch.dtype, what: str) -> torch.Tensor:
    size = torch.empty(0, dtype=dtype).element_size()
    if len(data) % size:
        raise RequestError(f"{what}: {len(data)} bytes is not a whole number of {str(dtype).replace('torch.', '')}")
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def request_from_proto(msg, manifest: Dict[str, Any]):
    if msg.batch_size < 0:
        raise RequestError(f"batch_size must be >= 0, got {msg.batch_size}")
    dense = {str(pos): tensor_from_proto(t, f"dense argument {pos}") for pos, t in msg.dense.items()}
    parts = {}
    for name, f in msg.sparse.items():
        what = f"sparse feature '{name}'"
        w = _array(f.weights, torch.float32, f"{what}: weights") if f.has_weights else None
        parts[name] = (_array(f.lengths, torch.int64, f"{what}: lengths"),
                       _array(f.values, torch.int64, f"{what}: values (ids)"), w)
    deadline = msg.deadline_ms if msg.deadline_ms > 0 else None
    if msg.deadline_ms < 0:
        raise RequestError(f"deadline_ms must be > 0 (or 0: none), got {msg.deadline_ms}")
    return from_parts(int(msg.batch_size), dense, kjt_from_parts(parts, int(msg.batch_size)), deadline, manifest)


def request_to_proto(args, deadline_ms: Optional[float] = None):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    protos, _ = protos_and_services()
    kjts = [a for a in args if isinstance(a, KeyedJaggedTensor)]
    if len(kjts) != 1:
        raise RequestError(f"a request holds exactly one KeyedJaggedTensor, got {len(kjts)}")
    msg = protos.PredictRequest(batch_size=kjts[0].stride(), deadline_ms=deadline_ms or 0.0)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            msg.dense[i].CopyFrom(tensor_to_proto(a))
    for name, jt in kjts[0].to_dict().items():
        f = msg.sparse[name]
        f.lengths = jt.lengths().to(torch.int64).contiguous().numpy().tobytes()
        f.values = jt.values().to(torch.int64).contiguous().numpy().tobytes()
        if jt.weights_or_none() is not None:
            f.weights = jt.weights().to(torch.float32).contiguous().numpy().tobytes()
            f.has_weights = True
    return msg


_CODES = ((RequestError, grpc.StatusCode.INVALID_ARGUMENT), (ModelError, grpc.StatusCode.INTERNAL),
          (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
          (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED), (InferenceError, grpc.StatusCode.INVALID_ARGUMENT))


def serve_grpc(server: "ModelServer", host: str, port: int, max_workers: int = 16):
    """Starts the gRPC endpoint of a ModelServer; returns (the grpc server, its port).

    Each RPC holds one of ``max_workers`` threads while it waits for its batch, and grpc admits at
    most that many RPCs at once (``maximum_concurrent_rpcs``): one more is answered
    RESOURCE_EXHAUSTED at once, as a full queue is, instead of waiting unseen inside grpc."""
    protos, services = protos_and_services()

    class Servicer(services.PredictorServicer):
        def Predict(self, request, context):  # noqa: N802 - the proto's name
            try:
                parsed = request_from_proto(request, server.current.predictor.manifest)
                left = context.time_remaining()  # the caller's deadline, where it set one
                if left is not None and parsed.deadline is None and 0 < left < 3600:
                    parsed.deadline = 1000.0 * left
                outputs, tag = server.predict(parsed)
            except Exception as e:  # noqa: BLE001 - every failure is answered, with its status
                code = next((c for cls, c in _CODES if isinstance(e, cls)), grpc.StatusCode.INTERNAL)
                server.metrics.requests.labels(status=code.name).inc()
                context.abort(code, str(e))
            server.metrics.requests.labels(status="OK").inc()
            return protos.PredictResponse(outputs=[tensor_to_proto(t) for t in outputs], version=tag)

        def Model(self, request, context):  # noqa: N802 - the proto's name
            return protos.ModelResponse(json=json.dumps(server.info()))

        def Rollback(self, request, context):  # noqa: N802 - the proto's name
            try:
                return protos.RollbackResponse(version=server.rollback())
            except InferenceError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    g = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), maximum_concurrent_rpcs=max_workers)
    services.add_PredictorServicer_to_server(Servicer(), g)
    try:
        bound = g.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpcio raises where older versions returned 0
        raise OSError(f"gRPC: cannot listen on {host}:{port} ({e})") from None
    if bound == 0:
        raise OSError(f"gRPC: cannot listen on {host}:{port}")
    g.start()
    return g, bound


class GrpcClient:
    """``GrpcClient("host:port").predict(*inputs)``: the model's positional arguments in, its outputs
    (a tensor, or a tuple) out; errors raise ``grpc.RpcError`` with the server's status and message."""

    def __init__(self, target: str, timeout: float = 30.0) -> None:
        _, services = protos_and_services()
        self.channel = grpc.insecure_channel(target)
        self.stub = services.PredictorStub(self.channel)
        self.timeout = timeout

    def predict(self, *inputs: Any, deadline_ms: Optional[float] = None) -> Any:
        return self.predict_with_version(*inputs, deadline_ms=deadline_ms)[0]

    def predict_with_version(self, *inputs: Any, deadline_ms: Optional[float] = None):
        reply = self.stub.Predict(request_to_proto(inputs, deadline_ms), timeout=self.timeout)
        outs = [tensor_from_proto(t, "output") for t in reply.outputs]
        return (outs[0] if len(outs) == 1 else tuple(outs)), reply.version

    def model(self) -> Dict[str, Any]:
        protos, _ = protos_and_services()
        return json.loads(self.stub.Model(protos.ModelRequest(), timeout=self.timeout).json)

    def rollback(self) -> str:
        protos, _ = protos_and_services()
        return self.stub.Rollback(protos.RollbackRequest(), timeout=self.timeout).version

    def close(self) -> None:
        self.channel.close()
