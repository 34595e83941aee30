# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Loader throughput: rows per second from files to TorchRec ``Batch``es with a KJT.

Criteo shape: a label, 13 dense counts (10% null) and 26 categorical ids
(Zipf 1.15 over 1e6 values per feature, scrambled over the int64 range, 5%
null -> empty bag). Compared in one run:

- ours: ``ColumnarDataset`` over Parquet (prefetch thread, C++ conversion);
- plain: ``pyarrow`` record batches -> pandas -> numpy -> ``KeyedJaggedTensor.from_lengths_sync``;
- TorchRec's Criteo pipelines: ``torchrec.datasets.criteo.criteo_kaggle`` over the same rows as
  Criteo TSV (row dicts collated into batches; measured on the first rows only, it is slow), and
  ``InMemoryBinaryCriteoIterDataPipe`` over the same rows as npy files (load + iterate).

    python -m benchmarks.bench_io            # 5M rows (generated once into benchmarks/.data/)
    python -m benchmarks.bench_io --quick    # 200k rows
"""

import argparse
import datetime
import json
import os
import socket
import time
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recis_torchrec.io import ColumnarDataset, Schema
from recis_torchrec.testing import zipf_ids

DATA_DIR = os.path.join(os.path.dirname(__file__), ".data")
RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
KEYS = [f"cat_{i}" for i in range(26)]
SCHEMA = Schema(dense=DENSE, sparse=dict(zip(KEYS, SPARSE)), labels=["label"])

_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)


def _scramble(x: np.ndarray, salt: int) -> np.ndarray:
    x = x.astype(np.uint64) ^ np.uint64(salt)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= _M1
        x ^= x >> np.uint64(33)
        x *= _M2
        x ^= x >> np.uint64(33)
    return x.view(np.int64)


def generate(path: str, rows: int, chunk: int = 250_000, row_group: int = 131_072) -> None:
    """Writes the synthetic Criteo-shaped Parquet file (once)."""
    rng = np.random.default_rng(2026)
    tmp = path + ".partial"
    writer = None
    written = 0
    while written < rows:
        n = min(chunk, rows - written)
        cols = {"label": pa.array((rng.random(n) < 0.25).astype(np.int8))}
        for c in DENSE:
            v = np.floor(rng.pareto(1.5, n) * 3).astype(np.float32)
            cols[c] = pa.array(v, mask=rng.random(n) < 0.10)
        for j, c in enumerate(SPARSE):
            ids = _scramble(zipf_ids(n, 1_000_000, 1.15, rng), 1000 + j)
            cols[c] = pa.array(ids, mask=rng.random(n) < 0.05)
        table = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table, row_group_size=row_group)
        written += n
    writer.close()
    os.replace(tmp, path)


def bench_ours(path: str, batch: int) -> Dict[str, float]:
    t0 = time.perf_counter()
    rows = 0
    for b in ColumnarDataset(path, SCHEMA, batch, prefetch=4):
        rows += b.labels.numel()
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def bench_plain(path: str, batch: int) -> Dict[str, float]:
    """pyarrow -> pandas -> numpy -> KeyedJaggedTensor.from_lengths_sync."""
    t0 = time.perf_counter()
    rows = 0
    f = pq.ParquetFile(path)
    for rb in f.iter_batches(batch_size=batch, columns=["label"] + DENSE + SPARSE):
        df = rb.to_pandas()
        dense = torch.from_numpy(df[DENSE].fillna(0).to_numpy(np.float32))
        lengths, values = [], []
        for c in SPARSE:
            col = df[c]
            present = col.notna().to_numpy()
            lengths.append(present.astype(np.int64))
            values.append(col[present].to_numpy(np.int64))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=KEYS, values=torch.from_numpy(np.concatenate(values)), lengths=torch.from_numpy(np.concatenate(lengths))
        )
        labels = torch.from_numpy(df["label"].to_numpy(np.float32))
        Batch(dense_features=dense, sparse_features=kjt, labels=labels)
        rows += len(df)
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def write_tsv(path: str, tsv: str, rows: int) -> None:
    """The first `rows` rows as raw Criteo TSV: counts as ints, ids as 8-digit hex, nulls empty."""
    table = pq.read_table(path).slice(0, rows)
    cols = []
    for c in ["label"] + DENSE:
        a = table.column(c).to_numpy(zero_copy_only=False)
        cols.append(np.where(np.isnan(a.astype(np.float64)), "", a.astype(np.int64).astype(str)) if c != "label" else a.astype(str))
    for c in SPARSE:
        col = table.column(c)
        v = col.fill_null(0).to_numpy().astype(np.uint64) & np.uint64(0xFFFFFFFF)
        hexed = np.char.mod("%08x", v)
        cols.append(np.where(col.is_null().to_numpy(zero_copy_only=False), "", hexed))
    with open(tsv, "w") as f:
        f.write("\n".join("\t".join(r) for r in zip(*cols)))
        f.write("\n")


def bench_torchrec_tsv(tsv: str, batch: int) -> Dict[str, float]:
    """TorchRec's criteo_kaggle datapipe (row dicts) collated into batches."""
    from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES, criteo_kaggle

    t0 = time.perf_counter()
    rows = 0
    buf: List[dict] = []

    def collate(rs: List[dict]) -> Batch:
        dense = torch.tensor([[r[n] for n in DEFAULT_INT_NAMES] for r in rs], dtype=torch.float32)
        lengths, values = [], []
        for n in DEFAULT_CAT_NAMES:
            for r in rs:
                v = r[n]
                if v == "":
                    lengths.append(0)
                else:
                    lengths.append(1)
                    values.append(int(v, 16))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=DEFAULT_CAT_NAMES, values=torch.tensor(values), lengths=torch.tensor(lengths)
        )
        return Batch(dense, kjt, torch.tensor([r["label"] for r in rs], dtype=torch.float32))

    for r in criteo_kaggle(tsv):
        buf.append(r)
        if len(buf) == batch:
            collate(buf)
            rows += len(buf)
            buf = []
    if buf:
        collate(buf)
        rows += len(buf)
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def bench_torchrec_npy(path: str, batch: int, tmp: str) -> Dict[str, float]:
    """TorchRec's InMemoryBinaryCriteoIterDataPipe over npy files of the same rows (load + iterate)."""
    from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe

    table = pq.read_table(path)
    files = {
        "dense": np.stack([table.column(c).fill_null(0).to_numpy() for c in DENSE], 1).astype(np.float32),
        "sparse": np.stack([table.column(c).fill_null(0).to_numpy() for c in SPARSE], 1).astype(np.int64),
        "labels": table.column("label").to_numpy().astype(np.int32).reshape(-1, 1),
    }
    paths = {}
    for k, a in files.items():
        paths[k] = os.path.join(tmp, f"day_0_{k}.npy")
        np.save(paths[k], a)
    del files, table
    t0 = time.perf_counter()
    dp = InMemoryBinaryCriteoIterDataPipe(
        "train", [paths["dense"]], [paths["sparse"]], [paths["labels"]], batch_size=batch, rank=0, world_size=1
    )
    rows = 0
    for b in dp:
        rows += b.labels.numel()
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--tsv-rows", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rows = args.rows or (200_000 if args.quick else 5_000_000)
    os.makedirs(DATA_DIR, exist_ok=True)
    path = os.path.join(DATA_DIR, f"criteo_zipf_{rows}.parquet")
    if not os.path.exists(path):
        t = time.perf_counter()
        generate(path, rows)
        print(f"generated {path} in {time.perf_counter() - t:.0f} s", flush=True)
    tsv = os.path.join(DATA_DIR, f"criteo_zipf_{rows}_head{args.tsv_rows}.tsv")
    if not os.path.exists(tsv):
        write_tsv(path, tsv, min(args.tsv_rows, rows))

    results: Dict[str, List[Dict[str, float]]] = {"recis_torchrec": [], "pyarrow_pandas_kjt": []}
    for _ in range(args.repeats):  # alternate, so noise hits both
        results["recis_torchrec"].append(bench_ours(path, args.batch))
        results["pyarrow_pandas_kjt"].append(bench_plain(path, args.batch))
    results["torchrec_criteo_tsv"] = [bench_torchrec_tsv(tsv, args.batch)]
    results["torchrec_criteo_npy_in_memory"] = [bench_torchrec_npy(path, args.batch, DATA_DIR)]

    def rate(rs: List[Dict[str, float]]) -> float:
        return float(np.median([r["rows"] / r["seconds"] for r in rs]))

    base = rate(results["pyarrow_pandas_kjt"])
    info = {
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "pyarrow": pa.__version__,
        "torch": torch.__version__,
    }
    print(f"{rows:,} rows, batch {args.batch}, Criteo shape (13 dense, 26 sparse, Zipf 1.15), {info}")
    print("| loader | rows | median rows/s | ratio to plain |")
    print("|---|---:|---:|---:|")
    for name, rs in results.items():
        print(f"| {name} | {rs[0]['rows']:,} | {rate(rs):,.0f} | {rate(rs) / base:.2f} |")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out = os.path.join(RESULTS_DIR, f"{stamp}-{socket.gethostname()}-io{'-quick' if args.quick else ''}.json")
    with open(out, "w") as f:
        json.dump({"machine": info, "rows": rows, "batch": args.batch, "results": results}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
