# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The model server: an inference package behind an HTTP/JSON endpoint, requests batched.

Endpoints:

- ``POST /v1/predict``: a request (``recis_torchrec.serve.request``'s JSON form); answers
  ``{"outputs": [...], "version": ...}``; 400 for a request that does not fit the model (the message
  names the field), 429 when the queue is full, 504 past the request's deadline;
- ``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded and serving);
- ``GET /metrics``: Prometheus metrics (``prometheus_client``): requests by status, batch sizes in
  requests and rows, latency, queue length, the model's version and its tables' rows;
- ``GET /v1/model``: the served package (path, version, deltas, the previous version, the versions
  in the model directory, recent load errors, tables);
- ``POST /v1/rollback``: serve the version served before the last swap again.

Lookups and the dense program run in torch ops (the GIL is released inside them); ``threads`` sets
torch's intra-op threads."""

import json
import os
import threading
import time
from concurrent.futures import TimeoutError as FuturesTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from recis_torchrec.inference.package import InferenceError, Predictor, load
from recis_torchrec.serve.batcher import Batcher, DeadlineExceeded, Overloaded
from recis_torchrec.serve.request import ModelError, Request, RequestError, arity, from_json

_STATUS = {RequestError: 400, ModelError: 500, Overloaded: 429, DeadlineExceeded: 504}
MAX_BODY_BYTES = 256 << 20


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers in one process
    keep apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("recis_requests", "Requests answered, by status", ["status"], registry=r)
        self.batch_requests = Histogram("recis_batch_requests", "Requests per batch run", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_rows = Histogram("recis_batch_rows", "Rows (samples) per batch run", registry=r,
                                    buckets=(1, 8, 32, 128, 512, 2048, 8192, 32768))
        self.batch_seconds = Histogram("recis_batch_seconds", "Time to run one batch", registry=r)
        self.latency = Histogram("recis_request_latency_seconds", "Time from receipt to answer", registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.queue = Gauge("recis_queue_requests", "Requests waiting", registry=r)
        self.model = Gauge("recis_model_info", "The served model (1)", ["path", "version"], registry=r)
        self.table_rows = Gauge("recis_table_rows", "Rows of each served table", ["table"], registry=r)
        self.loads = Counter("recis_model_loads", "Versions loaded, by result", ["result"], registry=r)
        self.deltas = Counter("recis_deltas_applied", "Deltas applied, by result", ["result"], registry=r)

    def on_batch(self, requests: int, rows: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)


class _Served:
    """One loaded version: its predictor, its name, and the deltas applied to it."""

    def __init__(self, path: str, version: str, dense: str) -> None:
        self.path = path
        self.version = version
        self.predictor: Predictor = load(path, dense=dense)
        self.deltas: List[str] = []  # applied, in order
        self.refused: set = set()  # deltas that failed: not tried again

    def tag_of(self, deltas: int) -> str:
        return self.version + (f"+{deltas}" if deltas else "")

    @property
    def tag(self) -> str:
        return self.tag_of(self.predictor.deltas_applied)


def is_package(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json"))


def _ordered(names: List[str]) -> List[str]:
    """Version (or delta) directory names, oldest first: numeric names by value, before others by name;
    directories being written (``*.tmp-*``, as export and export_delta write them) are left out."""
    names = [n for n in names if ".tmp-" not in n and not n.startswith(".")]
    return sorted(names, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))


class ModelServer:
    """Serves an inference package (``inference.load``) over HTTP with dynamic batching.

    ``path`` is a package, or a model directory whose subdirectories are versions of one model
    (packages; numeric names in order of their value). From a model directory the newest version
    that loads is served, and ``poll()`` (every ``poll_s`` seconds in a background thread once
    ``start()``ed, or when called) loads a newer version beside the served one and swaps it in once
    it has loaded and verified, and applies the served version's new deltas (``VERSION/deltas/*``,
    ``checkpoint.export_delta``'s directories, in name order). A version or delta that fails keeps
    the current model serving; the error is in ``/v1/model`` and the metrics. ``rollback()`` (``POST
    /v1/rollback``) serves the version served before the last swap again; a version rolled back from
    is not loaded again.

    ``grpc_port`` also serves the gRPC service of ``predictor.proto`` (``grpc_service.py``; 0: a free
    port, ``server.grpc_port``). It serves at most ``grpc_threads`` RPCs at once (default
    min(max_queue, 64)): each holds a thread while it waits for its batch, and one more is answered
    RESOURCE_EXHAUSTED at once. ``port=0`` picks a free port (``server.port``). ``start()`` serves in a background thread;
    ``serve_forever()`` in this one; ``close()`` stops."""

    def __init__(self, path: str, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 512,
                 max_delay_ms: float = 2.0, max_queue: int = 1024, workers: int = 1, threads: Optional[int] = None,
                 dense: str = "export", poll_s: float = 2.0, grpc_port: Optional[int] = None,
                 grpc_threads: Optional[int] = None) -> None:
        self._threads_before: Optional[int] = None
        for name, value in (("threads", threads), ("grpc_threads", grpc_threads)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ModelServer: {name} must be an integer >= 1, got {value!r}")
        if grpc_threads is not None and grpc_port is None:
            raise ValueError("ModelServer: grpc_threads is set but grpc_port is not: no gRPC endpoint to size")
        if not isinstance(poll_s, (int, float)) or isinstance(poll_s, bool) or poll_s <= 0:
            raise ValueError(f"ModelServer: poll_s must be a number > 0, got {poll_s!r}")
        self.metrics = Metrics()
        self.dense = dense
        self.poll_s = float(poll_s)
        self.errors: List[str] = []  # the last load and delta failures, newest last
        self._swap = threading.Lock()
        self._tried: set = set()  # versions loaded or refused: never loaded again
        self.previous: Optional[_Served] = None
        if is_package(path) or not os.path.isdir(path):
            self.root = None
            self.current = _Served(path, os.path.basename(os.path.normpath(path)), dense)
        else:
            self.root = path
            self.current = self._newest()
        self._describe()
        _, _, specs = arity(self.current.predictor.manifest)
        self._specs = specs
        self.batcher = Batcher(self._run, {int(k): bool(v["batch"]) for k, v in specs.items()}, max_batch=max_batch,
                               max_delay_ms=max_delay_ms, max_queue=max_queue, workers=workers,
                               on_batch=self.metrics.on_batch)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: Optional[threading.Thread] = None
        self._serving = False
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self.grpc = None
        self.grpc_threads: Optional[int] = None
        self.grpc_port: Optional[int] = None
        if grpc_port is not None:
            from recis_torchrec.serve.grpc_service import serve_grpc

            try:
                self.grpc_threads = grpc_threads or min(max_queue, 64)
                self.grpc, self.grpc_port = serve_grpc(self, host, grpc_port, max_workers=self.grpc_threads)
            except BaseException:
                self.httpd.server_close()  # nothing of this server stays behind
                self.batcher.close()
                raise
        if threads is not None:
            # Process-wide (torch has one intra-op pool), once the server is built; close() puts the
            # previous count back.
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)

    @property
    def predictor(self) -> Predictor:
        return self.current.predictor

    @property
    def version(self) -> str:
        return self.current.tag

    def _error(self, message: str) -> None:
        self.errors = (self.errors + [message])[-20:]

    def _versions(self) -> List[str]:
        return [n for n in _ordered(os.listdir(self.root)) if is_package(os.path.join(self.root, n))]

    def _newest(self) -> _Served:
        """The newest version of the model directory that loads (older ones are tried in turn)."""
        names = self._versions()
        if not names:
            raise InferenceError(f"{self.root}: neither an inference package (no manifest.json) nor a model "
                                 "directory holding one (VERSION/manifest.json)")
        failures = []
        for name in reversed(names):
            self._tried.add(name)
            try:
                served = _Served(os.path.join(self.root, name), name, self.dense)
            except InferenceError as e:
                failures.append(f"version {name}: {e}")
                self.metrics.loads.labels(result="failed").inc()
                continue
            self.metrics.loads.labels(result="ok").inc()
            for f in failures:
                self._error(f)
            return served
        raise InferenceError(f"{self.root}: no version loads: " + "; ".join(failures))

    def _describe(self) -> None:
        served = self.current
        self.metrics.model.clear()
        self.metrics.model.labels(path=served.path, version=served.tag).set(1)
        for key, table in served.predictor.tables.items():
            self.metrics.table_rows.labels(table=key).set(len(table))

    def _run(self, *args: Any) -> Any:
        served = self.current  # one version for the whole batch
        out, deltas = served.predictor.predict_versioned(*args)  # its tables and their delta count, together
        return out, served.tag_of(deltas)

    # -- versions and deltas ------------------------------------------------------------

    def poll(self) -> None:
        """Loads a newer version (swapping it in once it has loaded and verified) and applies the
        served version's new deltas. Failures keep the current model and are recorded."""
        if self.root is None:
            self._apply_deltas(self.current)
            return
        with self._swap:
            # The newest new version that loads; newer ones that fail are reported and not tried again
            # (a version must be put in place whole: written elsewhere, then renamed into the directory).
            for name in reversed([n for n in self._versions() if n not in self._tried]):
                self._tried.add(name)
                try:
                    served = _Served(os.path.join(self.root, name), name, self.dense)
                    _, _, specs = arity(served.predictor.manifest)
                    if specs != self._specs:
                        raise InferenceError(
                            f"it takes other tensor arguments ({specs}) than the served model ({self._specs}); "
                            "a server serves one model's versions: start another for a model of another shape")
                except InferenceError as e:
                    self.metrics.loads.labels(result="failed").inc()
                    self._error(f"version {name}: {e} (version {self.current.tag} keeps serving)")
                    continue
                self.metrics.loads.labels(result="ok").inc()
                self.previous, self.current = self.current, served
                self._describe()
                break
        self._apply_deltas(self.current)

    def _apply_deltas(self, served: _Served) -> None:
        folder = os.path.join(served.path, "deltas")
        if not os.path.isdir(folder):
            return
        with self._swap:
            for name in _ordered(os.listdir(folder)):
                if name in served.deltas or name in served.refused:
                    continue
                try:
                    served.predictor.apply_delta(os.path.join(folder, name))
                except InferenceError as e:
                    served.refused.add(name)  # not tried again
                    self.metrics.deltas.labels(result="failed").inc()
                    self._error(f"delta {name} of version {served.version}: {e}")
                    continue
                served.deltas.append(name)
                self.metrics.deltas.labels(result="ok").inc()
            if served is self.current:
                self._describe()

    def rollback(self) -> str:
        """Serves the version served before the last swap again; returns its tag. Once: a second
        rollback (a retried request) is refused rather than bringing back the version rolled from."""
        with self._swap:
            if self.previous is None:
                raise InferenceError("no earlier version to roll back to")
            self.current, self.previous = self.previous, None
            self._describe()
            return self.current.tag

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - the watcher keeps running; the error is reported
                self._error(f"polling {self.root or self.current.path}: {e}")

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def predict(self, request: Request) -> Tuple[List[torch.Tensor], str]:
        """Runs one request through the batcher: (its outputs, the version that computed them)."""
        if request.batch_size > self.batcher.max_batch:
            raise RequestError(f"batch_size {request.batch_size} is more than the server's max_batch "
                               f"{self.batcher.max_batch}: split the request, or start the server with a larger "
                               "--max-batch")
        t0 = time.monotonic()
        future = self.batcher.submit(request)
        self.metrics.queue.set(self.batcher.queued())
        wait = None if request.deadline is None else request.deadline / 1000.0 + 1.0
        try:
            outputs, tag = future.result(timeout=wait)
        except FuturesTimeout:
            raise DeadlineExceeded(f"no answer within the request's deadline of {request.deadline:g} ms") from None
        self.metrics.latency.observe(time.monotonic() - t0)
        return outputs, tag

    def predict_json(self, body: Any) -> Dict[str, Any]:
        """Answers one JSON request (what ``POST /v1/predict`` does); raises the request's error."""
        outputs, tag = self.predict(from_json(body, self.current.predictor.manifest))
        return {"outputs": [t.tolist() for t in outputs], "dtypes": [str(t.dtype).replace("torch.", "")
                                                                     for t in outputs], "version": tag}

    def info(self) -> Dict[str, Any]:
        served = self.current
        m = served.predictor.manifest
        return {"path": served.path, "version": served.tag, "features": m.get("features"),
                "request": m.get("request"), "deltas": list(served.deltas), "refused_deltas": sorted(served.refused),
                "previous": self.previous.tag if self.previous else None,
                "versions": self._versions() if self.root else [served.version], "errors": list(self.errors),
                "tables": {k: {"rows": len(t), "dim": t.dim} for k, t in served.predictor.tables.items()}}

    def start(self) -> "ModelServer":
        """Serves in a background thread, and polls for versions and deltas in another."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="recis-http", daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self._watch, name="recis-watch", daemon=True)
        self._watcher.start()
        return self

    def serve_forever(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="recis-watch", daemon=True)
        self._watcher.start()
        self._serving = True
        self.httpd.serve_forever()

    def close(self) -> None:
        if self.grpc is not None:
            self.grpc.stop(grace=None)
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        if self._thread is not None or self._serving:
            self.httpd.shutdown()  # waits for serve_forever, which must have been started
        self.httpd.server_close()
        self.batcher.close()
        if self._thread is not None:
            self._thread.join()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None


def _handler(server: ModelServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # requests are counted in /metrics, not logged line by line

        def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj).encode())

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/healthz":
                self._json(200, {"status": "ok"})
            elif self.path == "/readyz":
                self._json(200, {"status": "ready", "version": server.version})
            elif self.path == "/metrics":
                server.metrics.queue.set(server.batcher.queued())
                self._send(200, generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/v1/model":
                self._json(200, server.info())
            else:
                self._json(404, {"error": f"no endpoint {self.path}"})

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True
                self._json(400 if length < 0 else 413, {"error": f"Content-Length must be a number of bytes in "
                                                                 f"[0, {MAX_BODY_BYTES}]"})
                return
            raw = self.rfile.read(length)
            if self.path == "/v1/rollback":
                try:
                    self._json(200, {"version": server.rollback()})
                except InferenceError as e:
                    self._json(409, {"error": str(e)})
                return
            if self.path != "/v1/predict":
                self._json(404, {"error": f"no endpoint {self.path}"})
                return
            try:
                body = json.loads(raw)
            except ValueError as e:
                server.metrics.requests.labels(status="400").inc()
                self._json(400, {"error": f"the request is not JSON: {e}"})
                return
            try:
                answer = server.predict_json(body)
            except Exception as e:  # noqa: BLE001 - every failure is answered, with its status
                code = next((c for cls, c in _STATUS.items() if isinstance(e, cls)),
                            400 if isinstance(e, (InferenceError, ValueError, TypeError)) else 500)
                server.metrics.requests.labels(status=str(code)).inc()
                self._json(code, {"error": str(e)})
                return
            server.metrics.requests.labels(status="200").inc()
            self._json(200, answer)

    return Handler
