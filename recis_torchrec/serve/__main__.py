# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""python -m recis_torchrec.serve PACKAGE_OR_MODEL_DIR [--host H] [--port N] [--max-batch N]
[--max-delay-ms MS] [--max-queue N] [--workers N] [--threads N] [--dense export|aoti] [--poll-s S]
[--grpc-port N]

A model directory holds versions of one model (VERSION/, each a package; VERSION/deltas/* its deltas):
the newest is served, newer ones and new deltas are picked up every --poll-s seconds."""

import argparse
import sys

from recis_torchrec.inference.package import InferenceError
from recis_torchrec.serve.server import ModelServer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recis_torchrec.serve", description=__doc__)
    p.add_argument("package", help="an inference package (inference.export), or a directory of versions of one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch", type=int, default=512, help="rows per batch run at most")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="how long a request waits for others to join it")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting at most; more are refused (429)")
    p.add_argument("--workers", type=int, default=1, help="batches run at once")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dense", choices=("export", "aoti"), default="export")
    p.add_argument("--poll-s", type=float, default=2.0, help="how often to look for new versions and deltas")
    p.add_argument("--grpc-port", type=int, default=None, help="also serve gRPC (predictor.proto) on this port")
    p.add_argument("--grpc-threads", type=int, default=None,
                   help="gRPC requests served at once (default min(max-queue, 64)); more are refused at once")
    args = p.parse_args(argv)
    try:
        server = ModelServer(args.package, host=args.host, port=args.port, max_batch=args.max_batch,
                             max_delay_ms=args.max_delay_ms, max_queue=args.max_queue, workers=args.workers,
                             threads=args.threads, dense=args.dense, poll_s=args.poll_s,
                             grpc_port=args.grpc_port, grpc_threads=args.grpc_threads)
    except (InferenceError, ValueError, OSError) as e:
        print(f"recis_torchrec.serve: error: {e}", file=sys.stderr)
        return 2
    grpc_note = f", gRPC on {args.host}:{server.grpc_port}" if server.grpc is not None else ""
    print(f"serving {server.current.path} (version {server.version}) on {server.url} (POST /v1/predict "
          f"/v1/rollback, GET /healthz /readyz /metrics /v1/model){grpc_note}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
