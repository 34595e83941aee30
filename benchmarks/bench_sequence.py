# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Long sequences: HashEmbeddingCollection against torchrec.EmbeddingCollection, time and peak memory per id.

A batch of 8 behaviour sequences of L ids each (Zipf 1.15 over 1e6 item ids,
so many repeat), dim 64; one training step = forward, a backward of the
unpooled embeddings, and the optimizer (ours: fused exact SGD; TorchRec's EC:
``nn.Embedding`` with ``torch.optim.SGD``, which updates the dense 1e6 x 64
table). Each implementation runs in its own process so that its peak resident
memory (``ru_maxrss``) is its own; peak memory per id = (peak - the process's
memory before the batch was built) / ids.

    python -m benchmarks.bench_sequence
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROWS, DIM, BATCH = 1_000_000, 64, 8


def _worker(impl: str, length: int, reps: int) -> Dict[str, float]:
    import numpy as np
    import torch
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

    import recis_torchrec as rt
    from recis_torchrec.testing import zipf_ids

    torch.set_num_threads(2)
    cfg = [EmbeddingConfig(name="items_t", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["seq"])]
    if impl == "torchrec_ec":
        module = EmbeddingCollection(cfg)
        opt = torch.optim.SGD(module.parameters(), lr=0.01)
    else:
        module = rt.HashEmbeddingCollection(cfg, fused_params={"optimizer": "exact_sgd", "learning_rate": 0.01})
        opt = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rng = np.random.default_rng(0)
    n = BATCH * length
    kjt = KeyedJaggedTensor(["seq"], torch.from_numpy(zipf_ids(n, ROWS, 1.15, rng)),
                            lengths=torch.full((BATCH,), length, dtype=torch.int64))
    grad = torch.randn(n, DIM)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        if opt is not None:
            opt.zero_grad()
        out = module(kjt)["seq"].values()
        out.backward(grad)
        if opt is not None:
            opt.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"ids": n, "unique": int(torch.unique(kjt.values()).numel()), "ms": statistics.median(times[1:]) * 1e3,
            "peak_bytes_over_base": peak - base}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--lengths", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    if args.worker:
        impl, length, reps = args.worker
        print(json.dumps(_worker(impl, int(length), int(reps))))
        return
    rows = []
    for length in args.lengths:
        for impl in ("recis_torchrec", "torchrec_ec"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_sequence", "--worker", impl, str(length),
                                  str(args.reps)], capture_output=True, text=True, check=True,
                                 cwd=os.path.join(os.path.dirname(__file__), ".."))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((length, impl, r))
    print(f"B={BATCH} sequences x L ids (Zipf 1.15 over {ROWS:,}), dim {DIM}, one SGD training step\n")
    print("| L | implementation | ids | unique ids | step ms | ns per id | peak MB over base | bytes per id |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for length, impl, r in rows:
        print(f"| {length:,} | {impl} | {r['ids']:,} | {r['unique']:,} | {r['ms']:.1f} | {r['ms'] * 1e6 / r['ids']:.0f} | "
              f"{r['peak_bytes_over_base'] / 2**20:.0f} | {r['peak_bytes_over_base'] / r['ids']:.0f} |")


if __name__ == "__main__":
    main()
