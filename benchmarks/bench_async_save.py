# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""A background checkpoint save against a blocking one, in the same process:

- the training step while a background save of the model writes, against the step without one;
- the part of a background save the step waits for (the snapshot), against a blocking save.

    python -m benchmarks.bench_async_save [--rows 10000000]
"""

import argparse
import statistics
import tempfile
import time
from typing import List, Optional

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

import recis_torchrec as rt
from recis_torchrec import checkpoint


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=2048)
    args = p.parse_args(argv)
    model = torch.nn.ModuleDict({"ebc": rt.HashEmbeddingBagCollection(
        [EmbeddingBagConfig(name="t", embedding_dim=args.dim, num_embeddings=args.rows, feature_names=["f"])],
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01})})
    table = model["ebc"].tables()["t"]
    for lo in range(0, args.rows, 1_000_000):
        table.find_or_insert(torch.arange(lo, min(lo + 1_000_000, args.rows)))
    g = torch.Generator().manual_seed(0)

    def step() -> float:
        ids = torch.randint(0, args.rows, (args.batch * 20,), generator=g)
        kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.full((args.batch,), 20))
        t0 = time.perf_counter()
        model["ebc"](kjt).values().sum().backward()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(3):
        step()
    normal = [step() for _ in range(20)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        checkpoint.save(tmp + "/a", model, step=1)
        blocking_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        checkpoint.save(tmp + "/b", model, step=1, blocking=False)
        returned_s = time.perf_counter() - t0
        during = []
        while checkpoint.saver._background_running():
            during.append(step())
        checkpoint.wait()
        total_s = time.perf_counter() - t0
    n, d = statistics.median(normal), statistics.median(during) if during else float("nan")
    print(f"{args.rows:,} rows x dim {args.dim} (row-wise Adagrad), batch {args.batch} x 20 ids:")
    print(f"  step: {n:.1f} ms alone, {d:.1f} ms during a background save ({len(during)} steps): ratio {d / n:.2f}")
    print(f"  save: blocking {blocking_s:.2f} s; background returns after {returned_s:.2f} s "
          f"({returned_s / blocking_s:.1%} of the blocking save), written in {total_s:.2f} s")


if __name__ == "__main__":
    main()
