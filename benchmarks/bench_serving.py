# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The model server on localhost (``recis_torchrec.serve``), against the offline predictor and
TorchRec's quantized model in the same process:

- throughput (predictions/s) with 1 and with 8 concurrent HTTP clients, each sending requests of
  batch 64, against the offline ``Predictor`` at batch 512 and TorchRec's ``quantize_embeddings``
  model called in-process at batch 64 and 512;
- latency p50 / p99 at about half the saturating load (8 clients pacing their requests);
- a package swap under load: failed requests and answers that match neither version;
- the 1- and 8-client throughput again with each client in its own process (spawned; the clients'
  request encoding then no longer shares the server's GIL, only the machine's cores).

    python -m benchmarks.bench_serving [--rows 100000] [--tables 8] [--dim 64] [--seconds 5]
"""

import argparse
import copy
import os
import shutil
import tempfile
import threading
import time
from typing import Dict, List

import torch

from benchmarks.bench_inference import dlrm_pair
from recis_torchrec import inference
from recis_torchrec.serve import Client, ModelServer, to_json


def _client_loop(client, reqs: List, first: int, stop: float, pace_s: float = 0.0):
    """Sends `reqs` round robin from `first` until monotonic time `stop`, pacing each request to take at
    least `pace_s`: (rows answered, latencies in s, failed requests)."""
    lat: List[float] = []
    rows = failed = 0
    k = first
    while time.monotonic() < stop:
        r = reqs[k % len(reqs)]
        k += 1
        t0 = time.monotonic()
        try:
            client.predict(*r)
        except Exception:  # noqa: BLE001 - counted
            failed += 1
            continue
        dt = time.monotonic() - t0
        lat.append(dt)
        rows += r[1].stride()
        if pace_s > dt:
            time.sleep(pace_s - dt)
    return rows, lat, failed


def _summary(results: List, wall: float) -> Dict[str, float]:
    lat = sorted(x for _, ls, _ in results for x in ls)
    return {"rows_per_s": sum(r for r, _, _ in results) / wall, "requests_per_s": len(lat) / wall,
            "failed": sum(f for _, _, f in results),
            "p50_ms": 1e3 * lat[len(lat) // 2] if lat else float("nan"),
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")}


def _load(url: str, reqs: List, clients: int, seconds: float, pace_s: float = 0.0,
          make=None) -> Dict[str, float]:
    """Requests/s and latencies of `clients` threads sending `reqs` round robin for `seconds`
    (HTTP clients, or `make()`'s)."""
    stop = time.monotonic() + seconds
    results: List = [None] * clients

    def work(c):
        results[c] = _client_loop(make() if make is not None else Client(url), reqs, c, stop, pace_s)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(results, time.monotonic() - t0)


def _client_process(kind: str, target: str, reqs: List, first: int, seconds: float, ready, start, out) -> None:
    """One client in its own process (its own GIL): round robin over `reqs` for `seconds` once `start`
    is set; puts (rows, latencies, failed) on `out`."""
    torch.set_num_threads(1)
    if kind == "grpc":
        from recis_torchrec.serve.grpc_service import GrpcClient

        client = GrpcClient(target)
    else:
        client = Client(target)
    client.predict(*reqs[first % len(reqs)])  # connected and warm before the clock starts
    ready.put(first)
    start.wait()
    out.put(_client_loop(client, reqs, first, time.monotonic() + seconds))


def _load_processes(kind: str, target: str, reqs: List, clients: int, seconds: float) -> Dict[str, float]:
    """As _load, with each client in its own spawned process: the clients' request encoding no longer
    shares the server's GIL (they still share the machine's cores)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(kind, target, reqs, c, seconds, ready, start, out))
             for c in range(clients)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=300)
        start.set()
        results = [out.get(timeout=seconds + 300) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return _summary(results, seconds)


def _offline(fn, reqs, seconds: float) -> float:
    rows, t0 = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - t0 < seconds:
            for r in reqs:
                fn(*r)
                rows += r[1].stride()
    return rows / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--pooling", type=int, default=20)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and the offline runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ours, theirs, batch = dlrm_pair(args)
    from torchrec.inference.modules import quantize_embeddings

    quantized = quantize_embeddings(copy.deepcopy(theirs), dtype=torch.qint8, inplace=True)
    tmp = tempfile.mkdtemp()
    try:
        root = os.path.join(tmp, "model")
        inference.export(ours, os.path.join(root, "1"), batch(8))
        predictor = inference.load(os.path.join(root, "1"))
        small = [batch(64) for _ in range(16)]
        large = [batch(512) for _ in range(2)]
        offline_512 = _offline(predictor, large, args.seconds)
        torchrec_64 = _offline(quantized, small, args.seconds)
        torchrec_512 = _offline(quantized, large, args.seconds)
        server = ModelServer(root, port=0, threads=args.threads, max_batch=512, max_delay_ms=2.0, poll_s=3600,
                             grpc_port=0).start()
        try:
            one = _load(server.url, small, 1, args.seconds)
            eight = _load(server.url, small, 8, args.seconds)
            from recis_torchrec.serve.grpc_service import GrpcClient

            def grpc_client():
                return GrpcClient(f"127.0.0.1:{server.grpc_port}")

            g_one = _load(server.url, small, 1, args.seconds, make=grpc_client)
            g_eight = _load(server.url, small, 8, args.seconds, make=grpc_client)
            # The same with each client in its own process.
            grpc_target = f"127.0.0.1:{server.grpc_port}"
            procs = {(kind, n): _load_processes(kind, server.url if kind == "http" else grpc_target, small, n,
                                                args.seconds)
                     for kind in ("grpc", "http") for n in (1, 8)}
            # About half the saturating load: each of 8 clients waits so that together they send half
            # of what 8 unpaced clients did.
            pace = 8 / max(eight["requests_per_s"] / 2, 1e-9)
            half = _load(server.url, small, 8, args.seconds, pace_s=pace)
            # A whole new version swapped in under load.
            ours2 = copy.deepcopy(ours)
            with torch.no_grad():
                for prm in ours2.parameters():
                    prm.mul_(1.01)
            inference.export(ours2, os.path.join(tmp, "v2"), batch(8))
            want = {"1": [predictor(*r) for r in small], "2": [inference.load(os.path.join(tmp, "v2"))(*r)
                                                               for r in small]}
            mixed, failed, answers = [], [], [0]
            stop = threading.Event()

            def hammer(c):
                client, k = Client(server.url), c
                while not stop.is_set():
                    i = k % len(small)
                    k += 1
                    try:
                        a = client._call("POST", "/v1/predict", to_json(small[i]))
                    except Exception as e:  # noqa: BLE001 - counted
                        failed.append(e)
                        continue
                    answers[0] += 1
                    if not torch.allclose(torch.tensor(a["outputs"][0]), want[a["version"]][i], atol=1e-5):
                        mixed.append(a["version"])

            threads = [threading.Thread(target=hammer, args=(c,)) for c in range(8)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            shutil.copytree(os.path.join(tmp, "v2"), os.path.join(root, "2"))
            server.poll()
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join()
            swapped = server.version
        finally:
            server.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"DLRM, {args.tables} tables x {args.rows:,} rows x dim {args.dim}, {args.pooling} ids per feature; "
          f"server and offline runs with {args.threads} torch thread(s); {args.seconds:g} s per measure")
    print(f"  HTTP, requests of batch 64: 1 client {one['rows_per_s']:,.0f} rows/s ({one['requests_per_s']:.0f} req/s, "
          f"p50 {one['p50_ms']:.1f} ms); 8 clients {eight['rows_per_s']:,.0f} rows/s ({eight['requests_per_s']:.0f} "
          f"req/s, p50 {eight['p50_ms']:.1f} ms, p99 {eight['p99_ms']:.1f} ms): "
          f"{eight['rows_per_s'] / one['rows_per_s']:.2f}x one client")
    print(f"  gRPC, requests of batch 64: 1 client {g_one['rows_per_s']:,.0f} rows/s (p50 {g_one['p50_ms']:.1f} ms); "
          f"8 clients {g_eight['rows_per_s']:,.0f} rows/s (p50 {g_eight['p50_ms']:.1f} ms, p99 {g_eight['p99_ms']:.1f} "
          f"ms): {g_eight['rows_per_s'] / g_one['rows_per_s']:.2f}x one client")
    print(f"  offline Predictor at batch 512: {offline_512:,.0f} rows/s; 8 clients / offline = "
          f"{eight['rows_per_s'] / offline_512:.2f} (HTTP), {g_eight['rows_per_s'] / offline_512:.2f} (gRPC)")
    print("  (the clients above run in the server's process and share its GIL and the machine's cores)")
    for kind in ("grpc", "http"):
        a, b = procs[(kind, 1)], procs[(kind, 8)]
        print(f"  {kind}, each client in its own process: 1 client {a['rows_per_s']:,.0f} rows/s (p50 "
              f"{a['p50_ms']:.1f} ms); 8 clients {b['rows_per_s']:,.0f} rows/s (p50 {b['p50_ms']:.1f} ms, p99 "
              f"{b['p99_ms']:.1f} ms, failed {b['failed']}): {b['rows_per_s'] / a['rows_per_s']:.2f}x one client, "
              f"{b['rows_per_s'] / offline_512:.2f}x the offline Predictor at batch 512")
    print(f"  TorchRec quantize_embeddings (INT8) in-process: batch 64 {torchrec_64:,.0f} rows/s, batch 512 "
          f"{torchrec_512:,.0f} rows/s; 8 HTTP clients / TorchRec at batch 64 = {eight['rows_per_s'] / torchrec_64:.2f}")
    print(f"  at about half load ({half['requests_per_s']:.0f} req/s): p50 {half['p50_ms']:.1f} ms, p99 "
          f"{half['p99_ms']:.1f} ms, p99/p50 = {half['p99_ms'] / half['p50_ms']:.2f}; failed {half['failed']}")
    print(f"  a version swap under 8 clients: {answers[0]} answers, {len(failed)} failed, {len(mixed)} matching "
          f"neither version; serving {swapped} after it")


if __name__ == "__main__":
    main()
