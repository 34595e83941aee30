# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""A client of the model server: ``Client(url).predict(*inputs)`` takes the model's positional
arguments (tensors and one KeyedJaggedTensor), as ``inference.load(...)(*inputs)`` does, and
returns the outputs as tensors (a tensor, or a tuple where the model returns several)."""

import json
import urllib.error
import urllib.request
from typing import Any, Dict, Optional

import torch

from recis_torchrec.inference.package import InferenceError
from recis_torchrec.serve.request import to_json


class ServerError(InferenceError):
    """The server refused or failed a request: ``status`` is its HTTP status, the message its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", "")
            except ValueError:
                message = e.reason
            raise ServerError(e.code, message) from None

    def predict(self, *inputs: Any, deadline_ms: Optional[float] = None) -> Any:
        answer = self._call("POST", "/v1/predict", to_json(inputs, deadline_ms))
        from recis_torchrec.serve.request import _DTYPES

        dtypes = answer.get("dtypes") or ["float32"] * len(answer["outputs"])
        outs = [torch.tensor(o, dtype=_DTYPES[d]) for o, d in zip(answer["outputs"], dtypes)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def model(self) -> Dict[str, Any]:
        return self._call("GET", "/v1/model")

    def ready(self) -> bool:
        try:
            return self._call("GET", "/readyz").get("status") == "ready"
        except (ServerError, urllib.error.URLError, OSError):
            return False
