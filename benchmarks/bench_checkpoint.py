# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint save and load throughput of a 2-rank hash-sharded model.

Two spawned ranks (gloo) hold a DMP model whose hash tables have `rows` rows in
total (default 10M, dim 32, row-wise Adagrad state), filled with random rows.
Each rank saves its shards with ``recis_torchrec.checkpoint.save`` (fsync'd
safetensors files, checksummed) and loads them back; reported per rank:
bytes of table files / seconds, in GB/s, median of `repeats` runs.

    python -m benchmarks.bench_checkpoint
    python -m benchmarks.bench_checkpoint --rows 1000000 --repeats 1   # quick
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from typing import List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def _worker(rank: int, world_size: int, rows: int, dim: int, repeats: int, root: str, out: str, durable: bool) -> None:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.model_parallel import DistributedModelParallel

    import recis_torchrec as rt
    from recis_torchrec import checkpoint, ops

    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=1024, feature_names=[f"f{i}"])
        for i in range(2)
    ]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
            self.dense = torch.nn.Linear(2 * dim, 1)

    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
    model = Model()
    dmp = DistributedModelParallel(model, sharders=rt.sharders(fused), plan=rt.plan(model, world_size))
    g = torch.Generator().manual_seed(rank)
    per_table = rows // len(tables)
    for name, table in dmp.module.ebc.tables().items():
        ids = torch.randint(-(2**62), 2**62, (per_table * 2,), generator=g)
        ids = ids[ops.owner_of(ids, world_size) == rank][: per_table // world_size]
        table.import_(ids, torch.randn(ids.numel(), dim, generator=g), torch.rand(ids.numel(), 1, generator=g))
    local_rows = sum(len(t) for t in dmp.module.ebc.tables().values())
    save_s, load_s, plain_s, nbytes = [], [], [], 0
    for r in range(repeats):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        path = checkpoint.save(root, dmp, step=r, keep_last=1, durable=durable)
        save_s.append(time.perf_counter() - t0)
        nbytes = checkpoint.save.last_bytes
        torch.distributed.barrier()
        t0 = time.perf_counter()
        checkpoint.load(path, dmp)
        load_s.append(time.perf_counter() - t0)
        # The disk's ceiling, in the same conditions: both ranks write the same
        # number of bytes to new files with plain Python writes, fsync'd.
        torch.distributed.barrier()
        block = bytes(64 << 20)
        t0 = time.perf_counter()
        with open(os.path.join(root, f"plain-rank{rank}.bin"), "wb") as f:
            left = nbytes
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        plain_s.append(time.perf_counter() - t0)
        os.remove(os.path.join(root, f"plain-rank{rank}.bin"))
    result = {"rank": rank, "rows": local_rows, "bytes": nbytes, "save_s": save_s, "load_s": load_s,
              "plain_write_s": plain_s}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary dir)")
    p.add_argument("--no-durable", action="store_true", help="skip fsync (page-cache speed; survives a process crash only)")
    args = p.parse_args(argv)
    from recis_torchrec.testing.multiprocess import run_ranks

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root, out = os.path.join(tmp, "ckpt"), os.path.join(tmp, "out")
        os.makedirs(out)
        run_ranks(_worker, 2, args=(args.rows, args.dim, args.repeats, root, out, not args.no_durable), timeout=1800)
        results = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    mode = "page cache, no fsync" if args.no_durable else "durable: every file fsync'd"
    print(f"2 ranks, {sum(r['rows'] for r in results):,} rows in total, dim {args.dim}, row-wise Adagrad state, {mode}")
    print("| rank | rows | bytes per save | save GB/s | load GB/s | plain write of the same bytes GB/s | save / plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        save = r["bytes"] / statistics.median(r["save_s"]) / 1e9
        load = r["bytes"] / statistics.median(r["load_s"]) / 1e9
        plain = r["bytes"] / statistics.median(r["plain_write_s"]) / 1e9
        r["save_gbs"], r["load_gbs"], r["plain_gbs"] = save, load, plain
        print(f"| {r['rank']} | {r['rows']:,} | {r['bytes']:,} | {save:.2f} | {load:.2f} | {plain:.2f} | {save / plain:.2f} |")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    path = os.path.join(
        RESULTS_DIR, f"{stamp}-{socket.gethostname()}-checkpoint{'-nodurable' if args.no_durable else ''}.json"
    )
    with open(path, "w") as f:
        json.dump({"rows": args.rows, "dim": args.dim, "durable": not args.no_durable, "results": results}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
