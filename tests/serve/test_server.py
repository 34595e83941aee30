# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The model server on localhost: concurrent clients batched, every answer equal to the Python
predictor's on the same input; malformed requests, a full queue and deadlines answered with their
status; health, readiness and Prometheus metrics."""

import json
import threading
import urllib.request

import pytest
import torch

from recis_torchrec import inference
from recis_torchrec.serve import Batcher, Client, ModelServer, Overloaded, Request, ServerError, from_json, to_json
from tests.inference.test_package import requests, trained


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    model, _ = trained("dlrm")
    return inference.export(model, str(tmp_path_factory.mktemp("serve") / "v1"), requests("bag", 1)[0])


@pytest.fixture(scope="module")
def predictor(package):
    return inference.load(package)


def test_json_requests_round_trip_to_the_same_inputs(package, predictor):
    for dense, kjt in requests("bag", 3):
        body = json.loads(json.dumps(to_json((dense, kjt))))
        r = from_json(body, predictor.manifest)
        assert r.batch_size == kjt.stride()
        assert torch.equal(predictor(*r.args), predictor(dense, kjt))


def test_eight_concurrent_clients_are_batched_and_answered_as_the_predictor_answers(package, predictor):
    server = ModelServer(package, port=0, max_batch=256, max_delay_ms=20.0, threads=1).start()
    try:
        client = Client(server.url)
        assert client.ready()
        reqs = requests("bag", 6)
        want = [predictor(*r) for r in reqs]
        got, errors = {}, []

        def work(c):
            try:
                for k in range(12):
                    i = (c + k) % len(reqs)
                    got[(c, k)] = (i, Client(server.url).predict(*reqs[i]))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(got) == 96
        for i, out in got.values():
            # A row's outputs in a batch of others can differ from a batch of its own in the last
            # bits (the dense layers' GEMM blocks by the batch's size); the lookups are exact.
            torch.testing.assert_close(out, want[i], atol=1e-6, rtol=1e-6)
        # Batching happened: some runs held several requests (8 clients, 20 ms window).
        hist = server.metrics.batch_requests
        runs = sum(s.value for s in hist.collect()[0].samples if s.name.endswith("_count"))
        assert 0 < runs < 96
        metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
        assert 'recis_requests_total{status="200"} 96.0' in metrics
        assert "recis_table_rows" in metrics and "recis_model_info" in metrics
        assert json.loads(urllib.request.urlopen(server.url + "/healthz").read())["status"] == "ok"
        info = client.model()
        assert info["version"] == "v1" and set(info["tables"]) == set(predictor.tables)
    finally:
        server.close()


def test_malformed_requests_are_named_with_400(package, predictor):
    server = ModelServer(package, port=0, threads=1).start()
    try:
        dense, kjt = requests("bag", 1)[0]
        good = to_json((dense, kjt))
        cases = [
            ({k: v for k, v in good.items() if k != "sparse"}, "sparse must map feature names"),
            (dict(good, sparse={k: v for k, v in good["sparse"].items() if k != "f1"}), "lacks features"),
            (dict(good, batch_size=-1), "batch_size must be an integer >= 0"),
            (dict(good, dense={}), "dense lacks argument 0"),
            (dict(good, extra=1), "unknown request fields"),
            (dict(good, sparse=dict(good["sparse"], f0={"lengths": [1], "values": [1, 2]})), "'f0' has 1 lengths"),
            (dict(good, deadline_ms=0), "deadline_ms must be a number > 0"),
        ]
        for body, message in cases:
            with pytest.raises(ServerError, match=message) as e:
                Client(server.url)._call("POST", "/v1/predict", body)
            assert e.value.status == 400, message
        req = urllib.request.Request(server.url + "/v1/predict", data=b"{not json", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 400
        # The server still answers well-formed requests after the bad ones.
        torch.testing.assert_close(Client(server.url).predict(dense, kjt), predictor(dense, kjt), atol=1e-6, rtol=1e-6)
    finally:
        server.close()


def test_a_full_queue_is_refused_and_a_late_request_is_not_run(predictor):
    release = threading.Event()
    ran = []

    def slow(*args):
        release.wait(10)
        ran.append(args)
        return predictor(*args)

    batcher = Batcher(slow, {0: True}, max_batch=1, max_delay_ms=0, max_queue=2)
    try:
        dense, kjt = requests("bag", 1)[0]
        first = batcher.submit(Request((dense, kjt), kjt.stride()))  # runs, and blocks the worker
        while batcher.queued():
            pass
        late = batcher.submit(Request((dense, kjt), kjt.stride(), deadline=1.0))
        queued = batcher.submit(Request((dense, kjt), kjt.stride()))
        with pytest.raises(Overloaded, match="queue is full"):
            batcher.submit(Request((dense, kjt), kjt.stride()))
        threading.Event().wait(0.05)  # the late request's 1 ms deadline passes while it waits
        release.set()
        want = predictor(dense, kjt)
        assert torch.equal(first.result(10)[0], want) and torch.equal(queued.result(10)[0], want)
        with pytest.raises(inference.InferenceError, match="past its deadline of 1 ms"):
            late.result(10)
        assert len(ran) == 2  # the late request never ran
    finally:
        release.set()
        batcher.close()


def test_bad_server_settings_raise(package):
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        ModelServer(package, port=0, max_batch=0)
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        ModelServer(package, port=0, threads=0)
    with pytest.raises(inference.InferenceError, match="not an inference package"):
        ModelServer(package + "-missing", port=0)
