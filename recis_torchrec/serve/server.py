# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The model server: an inference package behind an HTTP/JSON endpoint, requests batched.

Endpoints:

- ``POST /v1/predict``: a request (``recis_torchrec.serve.request``'s JSON form); answers
  ``{"outputs": [...], "version": ...}``; 400 for a request that does not fit the model (the message
  names the field), 429 when the queue is full, 504 past the request's deadline;
- ``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded and serving);
- ``GET /metrics``: Prometheus metrics (``prometheus_client``): requests by status, batch sizes in
  requests and rows, latency, queue length, the model's version and its tables' rows;
- ``GET /v1/model``: the served package (path, version, features, tables).

Lookups and the dense program run in torch ops (the GIL is released inside them); ``threads`` sets
torch's intra-op threads."""

import json
import os
import threading
import time
from concurrent.futures import TimeoutError as FuturesTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from recis_torchrec.inference.package import InferenceError, Predictor, load
from recis_torchrec.serve.batcher import Batcher, DeadlineExceeded, Overloaded
from recis_torchrec.serve.request import RequestError, arity, from_json

_STATUS = {RequestError: 400, Overloaded: 429, DeadlineExceeded: 504}


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

    def on_batch(self, requests: int, rows: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)


class ModelServer:
    """Serves a package (``inference.load``) over HTTP with dynamic batching.

    ``port=0`` picks a free port (``server.port``). ``start()`` serves in a background thread;
    ``serve_forever()`` in this one; ``close()`` stops."""

    def __init__(self, package: str, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 512,
                 max_delay_ms: float = 2.0, max_queue: int = 1024, workers: int = 1, threads: Optional[int] = None,
                 dense: str = "export") -> None:
        if threads is not None:
            if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
                raise ValueError(f"ModelServer: threads must be an integer >= 1, got {threads!r}")
            torch.set_num_threads(threads)
        self.metrics = Metrics()
        self.predictor: Predictor = load(package, dense=dense)
        self.version = os.path.basename(os.path.normpath(package))
        self._describe()
        _, _, specs = arity(self.predictor.manifest)
        self.batcher = Batcher(self._run, {int(k): bool(v["batch"]) for k, v in specs.items()}, max_batch=max_batch,
                               max_delay_ms=max_delay_ms, max_queue=max_queue, workers=workers,
                               on_batch=self.metrics.on_batch)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: Optional[threading.Thread] = None

    def _describe(self) -> None:
        self.metrics.model.clear()
        self.metrics.model.labels(path=self.predictor.path, version=self.version).set(1)
        for key, table in self.predictor.tables.items():
            self.metrics.table_rows.labels(table=key).set(len(table))

    def _run(self, *args: Any) -> Any:
        return self.predictor(*args)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def predict_json(self, body: Any) -> Dict[str, Any]:
        """Answers one JSON request (what ``POST /v1/predict`` does); raises the request's error."""
        t0 = time.monotonic()
        request = from_json(body, self.predictor.manifest)
        future = self.batcher.submit(request)
        self.metrics.queue.set(self.batcher.queued())
        wait = None if request.deadline is None else request.deadline / 1000.0 + 1.0
        try:
            outputs = future.result(timeout=wait)
        except FuturesTimeout:
            raise DeadlineExceeded(f"no answer within the request's deadline of {request.deadline:g} ms") from None
        self.metrics.latency.observe(time.monotonic() - t0)
        return {"outputs": [t.tolist() for t in outputs], "version": self.version}

    def info(self) -> Dict[str, Any]:
        m = self.predictor.manifest
        return {"path": self.predictor.path, "version": self.version, "features": m.get("features"),
                "request": m.get("request"), "deltas_applied": self.predictor.deltas_applied,
                "tables": {k: {"rows": len(t), "dim": t.dim} for k, t in self.predictor.tables.items()}}

    def start(self) -> "ModelServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="recis-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()
        if self._thread is not None:
            self._thread.join()


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
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
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
