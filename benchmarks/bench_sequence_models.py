# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Sequence models and the list-column loader, each against its baseline in the same process:

- DIN training (forward + backward + Adam) on generated Taobao-shaped samples with an L=50 history:
  the model on our hash EC (``rt.convert``, fused Adam) against the same model on TorchRec's
  ``EmbeddingCollection`` (dense tables, ``torch.optim.Adam``), examples/s;
- the loader on the same rows written as Taobao-style CSV (header-less, ``^``-delimited histories)
  against the same rows in Parquet (``list<int64>`` columns), rows/s.

    python -m benchmarks.bench_sequence_models [--quick]
"""

import argparse
import copy
import os
import statistics
import tempfile
import time
from typing import Any, Dict, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingCollection, EmbeddingConfig

import recis_torchrec as rt
from recis_torchrec.datasets.formats import TAOBAO_COLUMNS, write_taobao_parts
from recis_torchrec.io import ColumnarDataset, Schema
from recis_torchrec.models import DIN

SIZES = {"smoke": dict(rows=2_000, batch=256, reps=2, warmup=1, items=10_000),
         "quick": dict(rows=20_000, batch=1024, reps=5, warmup=1, items=100_000),
         "full": dict(rows=60_000, batch=2048, reps=9, warmup=2, items=1_000_000)}
SCHEMA = Schema(sparse={"item": "item", "cate": "cate", "hist_item": "hist_item",
                        "hist_cate": "hist_cate"}, dense=["price"], dense_transform="log1p", labels=["clk"],
                list_delimiter="^", column_names=TAOBAO_COLUMNS)


def _din(items: int) -> DIN:
    torch.manual_seed(0)
    ec = EmbeddingCollection([
        EmbeddingConfig(name="item", embedding_dim=16, num_embeddings=items, feature_names=["item", "hist_item"]),
        EmbeddingConfig(name="cate", embedding_dim=16, num_embeddings=1000, feature_names=["cate", "hist_cate"]),
    ])
    return DIN(ec, "item", "hist_item", max_length=50, dense_in_features=1)


def _parquet_copy(csv_paths: List[str], out: str) -> str:
    """The same rows as Parquet, histories as list<int64>, read through the same schema."""
    ds = ColumnarDataset(csv_paths, SCHEMA, 10**9, prefetch=0)
    tables = [f._csv for f in ds._files]
    table = pa.concat_tables([t.select(["clk", "user", "item", "cate", "hist_item", "hist_cate", "price"])
                              for t in tables])
    pq.write_table(table, out, row_group_size=1 << 16)
    return out


def bench(mode: str) -> Dict[str, Any]:
    from benchmarks.suite import Row

    size = SIZES[mode]
    rows: List[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        csv_paths = write_taobao_parts(os.path.join(tmp, "csv"), rows=size["rows"], parts=4, history=50, seed=0)
        parquet = _parquet_copy(csv_paths, os.path.join(tmp, "samples.parquet"))
        parquet_schema = Schema(sparse=dict(SCHEMA.sparse), dense=["price"], dense_transform="log1p", labels=["clk"])
        # Loader: rows/s through ColumnarDataset, file open and parse included.
        samples: Dict[str, List[float]] = {"recis_csv_list_columns": [], "recis_parquet": []}
        for r in range(size["warmup"] + size["reps"]):
            for name, make in (("recis_csv_list_columns", lambda: ColumnarDataset(csv_paths, SCHEMA, size["batch"])),
                               ("recis_parquet", lambda: ColumnarDataset(parquet, parquet_schema, size["batch"]))):
                t0 = time.perf_counter()
                n = sum(b.labels.shape[0] for b in make())
                if r >= size["warmup"]:
                    samples[name].append((time.perf_counter() - t0) * 1e3)
        for impl, s in samples.items():
            rows.append(Row("sequence", f"loader, Taobao-shaped rows (L<=50 histories, {size['rows']:,} rows)", impl,
                            s, "recis_parquet", 0, n, "rows", torch.get_num_threads()))
        batches = list(ColumnarDataset(parquet, parquet_schema, size["batch"], prefetch=0))
    # DIN training step: ours against TorchRec's EC, round-robin.
    ref = _din(size["items"])
    ours = rt.convert(copy.deepcopy(ref), fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 0.01})
    opts = {"recis_din": torch.optim.Adam(ours.parameters(), lr=0.001),
            "torchrec_ec_din": torch.optim.Adam(ref.parameters(), lr=0.001)}
    models = {"recis_din": ours, "torchrec_ec_din": ref}
    step = {"i": 0}
    samples = {k: [] for k in models}
    for r in range(size["warmup"] + size["reps"]):
        b = batches[step["i"] % len(batches)]
        step["i"] += 1
        for name, model in models.items():
            t0 = time.perf_counter()
            opts[name].zero_grad()
            out = model(b.dense_features, b.sparse_features).reshape(-1)
            torch.nn.functional.binary_cross_entropy_with_logits(out, b.labels).backward()
            opts[name].step()
            if r >= size["warmup"]:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    for impl, s in samples.items():
        rows.append(Row("sequence", f"DIN train step, L=50, B={size['batch']}, item table {size['items']:,}", impl, s,
                        "torchrec_ec_din", 0, size["batch"], "samples", torch.get_num_threads()))
    return {"rows": rows, "config": size}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    out = bench("smoke" if args.smoke else "quick" if args.quick else "full")
    base = {}
    for r in out["rows"]:
        base.setdefault(r.bench, {})[r.impl] = statistics.median(r.samples_ms)
    for r in out["rows"]:
        med = statistics.median(r.samples_ms)
        print(f"{r.bench} | {r.impl}: median {med:.1f} ms, ratio {med / base[r.bench][r.baseline]:.2f}")


if __name__ == "__main__":
    main()
