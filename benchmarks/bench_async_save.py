# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""A background checkpoint save against a blocking one, in the same process:

- the training step while a background save of the model writes, against the step without one;
- the part of a background save the step waits for (starting the copy-on-write snapshot, copying
  the dense state), against a blocking save; and how many rows the steps copied on write.

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
    p.add_argument("--write-share", type=float, default=None, help="save(write_share=...); default: save's")
    p.add_argument("--dir", default=None, help="where to write (default: the system's temporary directory)")
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
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        checkpoint.save(tmp + "/a", model, step=1)
        blocking_s = time.perf_counter() - t0
        runs, after = [], []
        for k in range(2):  # the first reads into fresh host buffers, the second into the kept ones
            t0 = time.perf_counter()
            checkpoint.save(tmp + f"/b{k}", model, step=1, blocking=False, write_share=args.write_share)
            returned_s = time.perf_counter() - t0
            during, copies, reading = [], 0, []
            while checkpoint.saver._background_running():
                during.append(step())
                now = table.info()["snapshot_copies"]
                if now:  # the snapshot is still being read
                    reading.append(during[-1])
                copies = max(copies, now)
            checkpoint.wait()
            runs.append((returned_s, during, time.perf_counter() - t0, copies, reading))
            for _ in range(3):
                step()
            after.extend(step() for _ in range(20))
    checkpoint.release_buffers()
    n = statistics.median(normal)
    print(f"{args.rows:,} rows x dim {args.dim} (row-wise Adagrad), batch {args.batch} x 20 ids:")
    print(f"  step alone: {n:.1f} ms before the saves, {statistics.median(after):.1f} ms after them (median; "
          f"means {statistics.mean(normal):.1f} and {statistics.mean(after):.1f}); blocking save: {blocking_s:.2f} s")
    for k, (returned_s, during, total_s, copies, reading) in enumerate(runs):
        d = statistics.median(during) if during else float("nan")
        mean = statistics.mean(during) if during else float("nan")
        print(f"  background save {k + 1} ({'fresh' if k == 0 else 'kept'} buffers): returns after "
              f"{returned_s * 1e3:.1f} ms ({returned_s / blocking_s:.1%} of the blocking save), written in "
              f"{total_s:.2f} s; step during it {d:.1f} ms median, {mean:.1f} ms mean ({len(during)} steps): ratio {d / n:.2f} "
              f"(mean {mean / statistics.mean(normal):.2f}); rows copied on write: {copies:,} "
              f"({copies / args.rows:.1%} of the table); while the snapshot was read ({len(reading)} steps, "
              f"{sum(reading) / 1e3:.2f} s): {statistics.median(reading) / n if reading else float('nan'):.2f}x median, "
              f"{statistics.mean(reading) / statistics.mean(normal) if reading else float('nan'):.2f}x mean; "
              f"extra step time over the whole save {(sum(during) - len(during) * statistics.mean(normal)) / 1e3:.2f} s")

if __name__ == "__main__":
    main()
