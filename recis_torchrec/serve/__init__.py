# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Serving an inference package: ``python -m recis_torchrec.serve PACKAGE --port N [--grpc-port M]``
(HTTP/JSON and gRPC, requests batched, Prometheus metrics, versions swapped live) and its clients
(``Client`` over HTTP; ``grpc_service.GrpcClient``)."""

from recis_torchrec.serve.batcher import Batcher, DeadlineExceeded, Overloaded
from recis_torchrec.serve.client import Client, ServerError
from recis_torchrec.serve.request import Request, RequestError, from_json, to_json
from recis_torchrec.serve.server import ModelServer

__all__ = ["Batcher", "Client", "DeadlineExceeded", "ModelServer", "Overloaded", "Request", "RequestError",
           "ServerError", "from_json", "to_json"]
