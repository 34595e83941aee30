# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The model server on localhost: concurrent clients batched, every answer equal to the Python
predictor's on the same input; malformed requests, a full queue and deadlines answered with their
status; health, readiness and Prometheus metrics."""

import json
import shutil
import threading
import time
import urllib.request

import pytest
import torch

from recis_torchrec import inference
from recis_torchrec.serve import Batcher, Client, ModelServer, Overloaded, Request, ServerError, from_json, to_json
from tests.inference.test_package import requests, trained


def concurrently(n, work):
    """work(c) for c in range(n), each in its own thread; the first exception any raised is raised."""
    errors = []

    def run(c):
        try:
            work(c)
        except Exception as e:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


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
        got = {}

        def work(c):
            for k in range(12):
                i = (c + k) % len(reqs)
                got[(c, k)] = (i, Client(server.url).predict(*reqs[i]))

        concurrently(8, work)
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


def _scaled(body, k):
    """The request repeated k times over (k times its batch)."""
    out = dict(body, batch_size=body["batch_size"] * k, dense={p: v * k for p, v in body["dense"].items()})
    out["sparse"] = {n: {key: val * k for key, val in f.items()} for n, f in body["sparse"].items()}
    return out


def test_malformed_requests_are_named_with_400(package, predictor):
    server = ModelServer(package, port=0, threads=1, max_batch=40).start()
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
            (dict(good, deadline_ms=0), "deadline_ms must be a number in"),
            # Ids of the wrong type: a float would have been truncated to another id.
            (dict(good, sparse=dict(good["sparse"], f0=dict(good["sparse"]["f0"], values=[1.5] * len(
                good["sparse"]["f0"]["values"])))), "'f0': values \\(ids\\) must be a list of integers, got 1.5"),
            (dict(good, sparse=dict(good["sparse"], f0=dict(good["sparse"]["f0"], values=["7"] * len(
                good["sparse"]["f0"]["values"])))), "must be a list of integers, got '7'"),
            (dict(good, sparse=dict(good["sparse"], f0=dict(good["sparse"]["f0"], values=[2**64] * len(
                good["sparse"]["f0"]["values"])))), "not int64"),
            # true is not the id 1, nor a length.
            (dict(good, sparse=dict(good["sparse"], f0=dict(good["sparse"]["f0"], values=[1] * (len(
                good["sparse"]["f0"]["values"]) - 1) + [True]))), "'f0': values \\(ids\\) must be a list of integers, got True"),
            (dict(good, sparse=dict(good["sparse"], f0=dict(good["sparse"]["f0"], lengths=[True] + good["sparse"]["f0"][
                "lengths"][1:]))), "'f0': lengths must be a list of integers, got True"),
            # The wrong dense width, and a batch larger than the server takes.
            (dict(good, dense={"0": [row + [0.0] for row in good["dense"]["0"]]}),
             r"dense argument 0 has shape \(5, 5\); the model takes \(batch_size 5, 4\)"),
            # Rows that do not match batch_size: in a merged batch they would shift other requests' rows.
            (dict(good, dense={"0": good["dense"]["0"] + good["dense"]["0"][:1]}), r"has shape \(6, 4\)"),
            (dict(good, deadline_ms=float("inf")), "deadline_ms must be a number in"),
            (dict(good, dense={"0": [[True] * 13] * 5}), "give numbers, not true or false"),
            (_scaled(good, 9), "batch_size 45 is more than the server's max_batch 40"),
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
        return predictor(*args), "v"

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
        assert first.result(10)[1] == "v"
        assert torch.equal(first.result(10)[0][0], want) and torch.equal(queued.result(10)[0][0], want)
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


def _train_step(model, seed, dense_lr=0.0):
    from tests.inference.test_package import bag_batch

    model.train()
    d, k, labels = bag_batch(seed)
    torch.nn.functional.binary_cross_entropy_with_logits(model(d, k).reshape(-1), labels).backward()
    if dense_lr:
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= dense_lr * p.grad
                    p.grad = None
    model.eval()


def _corrupt_copy(src, dst):
    """A copy of the package or delta `src` at `dst` with one byte of a table shard flipped."""
    shutil.copytree(src, dst)
    shard = next(p for p in dst.rglob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_versions_and_deltas_swap_live_a_corrupt_version_is_refused_and_rollback_is_one_request(tmp_path):
    """8 clients predict while a delta is applied, a new whole-model version (its dense layers trained
    too) is swapped in and a corrupt one refused: every answer equals the answer of the version its
    reply names; then one request rolls back."""

    from recis_torchrec import checkpoint

    model, _ = trained("dlrm")
    example = requests("bag", 1)[0]
    root = tmp_path / "model"
    root.mkdir()
    ckpt = checkpoint.save(str(tmp_path / "ckpt"), model, step=0)
    inference.export(model, str(root / "1"), example)
    _train_step(model, 40)
    delta = checkpoint.export_delta(str(tmp_path / "d1"), model, since_step=ckpt)
    _train_step(model, 41, dense_lr=0.05)
    inference.export(model, str(tmp_path / "v2"), example)

    reqs = requests("bag", 4)
    v1 = inference.load(str(root / "1"))
    want = {"1": [v1(*r) for r in reqs]}
    v1.apply_delta(delta)
    want["1+1"] = [v1(*r) for r in reqs]
    v2 = inference.load(str(tmp_path / "v2"))
    want["2"] = [v2(*r) for r in reqs]
    assert not torch.allclose(want["2"][0], want["1+1"][0], atol=1e-4)  # the dense part changed too

    server = ModelServer(str(root), port=0, max_delay_ms=5.0, threads=1, poll_s=3600).start()
    stop, seen, errors = threading.Event(), [], []

    def hammer(c):
        client = Client(server.url)
        k = c
        while not stop.is_set():
            i = k % len(reqs)
            k += 1
            try:
                answer = client._call("POST", "/v1/predict", to_json(reqs[i]))
                out = torch.tensor(answer["outputs"][0])
                torch.testing.assert_close(out, want[answer["version"]][i], atol=1e-6, rtol=1e-6)
                seen.append(answer["version"])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    threads = [threading.Thread(target=hammer, args=(c,)) for c in range(8)]
    try:
        for t in threads:
            t.start()

        def settle(tag):
            # Up to 8 answers in flight at the swap may name the old version; every later one the new.
            n = len(seen)
            while len(seen) < n + 24 and not errors:
                threading.Event().wait(0.01)
            assert server.version == tag
            assert set(seen[n + 8:]) == {tag}, (tag, seen[n:])

        settle("1")
        shutil.copytree(delta, root / "1" / "deltas" / "0001")
        server.poll()
        settle("1+1")
        shutil.copytree(tmp_path / "v2", root / "2")
        server.poll()
        settle("2")
        # A corrupt version (one byte of a table shard flipped) is refused; version 2 keeps serving.
        _corrupt_copy(tmp_path / "v2", root / "3")
        server.poll()
        settle("2")
        info = Client(server.url).model()
        assert info["version"] == "2" and info["previous"] == "1+1" and info["versions"] == ["1", "2", "3"]
        assert any("version 3" in e and "checksum" in e for e in info["errors"]), info["errors"]
        # Rollback: one request.
        assert Client(server.url)._call("POST", "/v1/rollback", {}) == {"version": "1+1"}
        settle("1+1")
        with pytest.raises(ServerError, match="no earlier version") as e:  # a retried rollback changes nothing
            Client(server.url)._call("POST", "/v1/rollback", {})
        assert e.value.status == 409
        # A refused delta (a corrupt copy) changes neither the tables nor the version's name.
        _corrupt_copy(delta, root / "1" / "deltas" / "0002")
        server.poll()
        settle("1+1")
        info = Client(server.url).model()
        assert info["deltas"] == ["0001"] and info["refused_deltas"] == ["0002"], info
        server.poll()  # neither 2 (rolled back from) nor 3 (refused) is loaded again
        settle("1+1")
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.close()
    assert not errors, errors[:3]
    assert {"1", "1+1", "2"} <= set(seen)
    metrics = server.metrics
    loads = {s.labels["result"]: s.value for s in metrics.loads.collect()[0].samples if s.name.endswith("_total")}
    assert loads == {"ok": 2.0, "failed": 1.0}


def test_the_command_line_serves_a_package(package, predictor):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "recis_torchrec.serve", package, "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].split()[0]
        dense, kjt = requests("bag", 1)[0]
        torch.testing.assert_close(Client(url).predict(dense, kjt), predictor(dense, kjt), atol=1e-6, rtol=1e-6)
    finally:
        proc.terminate()
        proc.wait(30)
    bad = subprocess.run([sys.executable, "-m", "recis_torchrec.serve", package + "-missing", "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not an inference package" in bad.stderr


def test_grpc_answers_as_http_and_the_predictor_do_and_names_bad_requests(package, predictor):
    import grpc

    from recis_torchrec.serve.grpc_service import GrpcClient, protos_and_services, request_to_proto

    server = ModelServer(package, port=0, grpc_port=0, threads=1, max_delay_ms=10.0).start()
    client = GrpcClient(f"127.0.0.1:{server.grpc_port}")
    try:
        reqs = requests("bag", 4)
        outs = {}

        def work(c):
            for k in range(6):
                i = (c + k) % len(reqs)
                outs[(c, k)] = (i, GrpcClient(f"127.0.0.1:{server.grpc_port}").predict_with_version(*reqs[i]))

        concurrently(8, work)
        assert len(outs) == 48
        for i, (out, version) in outs.values():
            assert version == "v1"
            torch.testing.assert_close(out, predictor(*reqs[i]), atol=1e-6, rtol=1e-6)
        # gRPC and HTTP give the same answer to the same request.
        torch.testing.assert_close(client.predict(*reqs[0]), Client(server.url).predict(*reqs[0]), atol=0, rtol=0)
        assert client.model()["version"] == "v1"
        # Bad requests: their status and a message naming the problem.
        protos, _ = protos_and_services()
        missing = request_to_proto(reqs[0])
        del missing.sparse["f1"]
        bad_bytes = request_to_proto(reqs[0])
        bad_bytes.dense[0].data = bad_bytes.dense[0].data[:-4]
        odd_ids = request_to_proto(reqs[0])
        odd_ids.sparse["f0"].values = odd_ids.sparse["f0"].values[:-3]
        for msg, text in ((missing, "lacks features"), (bad_bytes, "bytes for shape"),
                          (odd_ids, "'f0': values (ids): 85 bytes is not a whole number of int64"),
                          (protos.PredictRequest(batch_size=2), "sparse must map feature names")):
            with pytest.raises(grpc.RpcError) as e:
                client.stub.Predict(msg, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in e.value.details(), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            client.rollback()
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        client.close()
        server.close()


def test_a_bad_request_in_a_merged_batch_fails_alone_and_dense_values_are_not_changed_silently(predictor):
    """A request whose dense rows do not match its batch_size, merged with a good one: the good one is
    answered as the predictor answers it, the bad one gets its own error. JSON dense values that a
    dtype conversion would change (fractions or bools into integers, out-of-range numbers, finite
    numbers turned infinite) are refused."""
    from recis_torchrec.serve.request import RequestError, _dense_from_json

    def run(*args):
        return predictor(*args), "v"

    batcher = Batcher(run, {0: True}, max_batch=64, max_delay_ms=200)
    try:
        (dense, kjt), (dense2, kjt2) = requests("bag", 2)
        good = batcher.submit(Request((dense, kjt), kjt.stride()))
        bad = batcher.submit(Request((dense2[:-1], kjt2), kjt2.stride()))  # one row short
        assert torch.equal(good.result(30)[0][0], predictor(dense, kjt))
        with pytest.raises(inference.InferenceError, match="has 7 rows"):
            bad.result(30)
        # One row too many and one too few: merged, the rows add up and each request would have been
        # answered (200) from the other's rows. Each is refused instead.
        d = torch.cat([dense, dense[:1]])
        long = batcher.submit(Request((d, kjt), kjt.stride()))
        short = batcher.submit(Request((dense[:-1], kjt), kjt.stride()))
        for f in (long, short):
            with pytest.raises(inference.InferenceError, match="rows"):
                f.result(30)
    finally:
        batcher.close()
    for value, dtype, message in (([1.7], "int64", "give integers"), ([-1], "uint8", "outside uint8"),
                                  ([0.5], "bool", "give true or false"), ([1e6], "float16", "too large"),
                                  ([[1.0], [2.0, 3.0]], "float32", "not a nested list")):
        with pytest.raises(RequestError, match=message):
            _dense_from_json(value, dtype, "dense argument 0")
    assert torch.equal(_dense_from_json([[1, 2]], "float32", "x"), torch.tensor([[1.0, 2.0]]))


def test_closing_a_server_that_never_started_and_a_bad_content_length(package):
    ModelServer(package, port=0, threads=1).close()  # returns: no serve loop to wait for
    server = ModelServer(package, port=0, threads=1).start()
    try:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.putrequest("POST", "/v1/predict")
        conn.putheader("Content-Length", "lots")
        conn.endheaders()
        assert conn.getresponse().status == 400
    finally:
        server.close()


def test_the_servers_thread_setting_is_undone_when_it_closes(package):
    """threads= sets torch's process-wide intra-op threads while the server runs; close() puts the
    previous count back (a test that served with one thread changed the numerics of later tests)."""
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    server = ModelServer(package, port=0, threads=want)
    assert torch.get_num_threads() == want
    server.close()
    assert torch.get_num_threads() == before


def test_grpc_requests_past_its_threads_are_refused_at_once_not_queued_unseen(package, predictor):
    """Each gRPC request holds a thread while it waits for its batch. Past ``grpc_threads`` requests at
    once, one more is answered RESOURCE_EXHAUSTED at once (before: it waited inside grpc's executor,
    unseen by the queue bound and the metrics, and was answered late)."""
    import grpc

    from recis_torchrec.serve.grpc_service import GrpcClient

    with pytest.raises(ValueError, match="grpc_threads must be an integer >= 1"):
        ModelServer(package, port=0, grpc_port=0, grpc_threads=0)
    with pytest.raises(ValueError, match="grpc_port is not"):
        ModelServer(package, port=0, grpc_threads=2)
    # Requests wait up to 3 s for others to join their batch: two hold both threads meanwhile.
    server = ModelServer(package, port=0, grpc_port=0, grpc_threads=2, max_queue=100, max_batch=10_000,
                         max_delay_ms=3000.0, threads=1).start()
    try:
        req = requests("bag", 1)[0]
        results = {}

        def work(c):
            if c >= 2:
                threading.Event().wait(0.5)  # after the first two hold the threads
            t0 = time.monotonic()
            try:
                results[c] = (GrpcClient(f"127.0.0.1:{server.grpc_port}").predict(*req), time.monotonic() - t0)
            except grpc.RpcError as e:
                results[c] = (e.code(), time.monotonic() - t0)

        concurrently(4, work)
        assert server.grpc_threads == 2
        answered = [c for c, (r, _) in results.items() if isinstance(r, torch.Tensor)]
        refused = [c for c, (r, _) in results.items() if r == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert sorted(answered) == [0, 1] and sorted(refused) == [2, 3], results
        for c in answered:
            torch.testing.assert_close(results[c][0], predictor(*req), atol=1e-6, rtol=1e-6)
        assert all(results[c][1] < 2.0 for c in refused)  # refused at once, not after the batch ran
    finally:
        server.close()
