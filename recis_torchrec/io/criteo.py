# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Criteo's raw TSV (``label, I1..I13, C1..C26``, empty fields allowed) -> Parquet.

    python -m recis_torchrec.io.criteo day_0.tsv day_0.parquet

Counts become nullable int64 columns, categories nullable strings (hashed by
the loader), the label int8; empty fields become nulls. The file is streamed
block by block, with a progress bar over the bytes read.
"""

import argparse
import os
import sys
from typing import List, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from recis_torchrec.io.schema import CRITEO_DENSE, CRITEO_LABEL, CRITEO_SPARSE

CRITEO_COLUMNS = (CRITEO_LABEL,) + CRITEO_DENSE + CRITEO_SPARSE
CRITEO_TYPES = {CRITEO_LABEL: pa.int8(), **{c: pa.int64() for c in CRITEO_DENSE}, **{c: pa.string() for c in CRITEO_SPARSE}}


def criteo_tsv_reader(path: str, block_size: int = 1 << 24) -> pacsv.CSVStreamingReader:
    """A streaming reader of a raw Criteo TSV file (no header, 40 tab-separated fields)."""
    return pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=list(CRITEO_COLUMNS), block_size=block_size),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types=CRITEO_TYPES, strings_can_be_null=True),
    )


def convert(src: str, dst: str, row_group_size: int = 1 << 17, progress: bool = True) -> int:
    """Converts a Criteo TSV file to Parquet; returns the number of rows written."""
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file")
    total = os.path.getsize(src)
    rows = 0
    tmp = dst + ".partial"
    try:
        reader = criteo_tsv_reader(src)
        with pq.ParquetWriter(tmp, reader.schema, compression="zstd") as writer, tqdm(
            total=total, unit="B", unit_scale=True, desc=os.path.basename(src), disable=not progress
        ) as bar:
            pending: List[pa.RecordBatch] = []
            pending_rows = 0
            for batch in reader:
                pending.append(batch)
                pending_rows += batch.num_rows
                bar.update(batch.nbytes // 4)  # parsed size is ~4x the text; an estimate until the end
                if pending_rows >= row_group_size:
                    writer.write_table(pa.Table.from_batches(pending), row_group_size=row_group_size)
                    rows += pending_rows
                    pending, pending_rows = [], 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending), row_group_size=row_group_size)
                rows += pending_rows
            bar.update(max(0, total - bar.n))
    except pa.ArrowInvalid as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ValueError(f"{src}: not a Criteo TSV file ({e})") from e
    os.replace(tmp, dst)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="raw Criteo TSV file")
    p.add_argument("dst", help="Parquet file to write")
    p.add_argument("--row-group-size", type=int, default=1 << 17)
    args = p.parse_args(argv)
    n = convert(args.src, args.dst, args.row_group_size)
    print(f"wrote {n:,} rows to {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def is_raw_criteo(path: str) -> bool:
    """A headerless, 40-field, tab-separated Criteo file (the raw dac / 1TB format)."""
    if not os.path.isfile(path) or os.path.splitext(path)[1].lower() not in (".tsv", ".txt", ".csv"):
        return False
    with open(path) as f:
        fields = f.readline().rstrip("\n").split("\t")
    return len(fields) == 40 and fields[0] in ("0", "1")


def ensure_parquet(path: str, out_dir: str, rank: int = 0) -> str:
    """`path`, or its Parquet conversion (made once, by rank 0) when it is raw Criteo TSV."""
    if not is_raw_criteo(path):
        return path
    import torch.distributed as dist

    out = os.path.join(out_dir, os.path.basename(path) + ".parquet")
    if rank == 0 and not os.path.exists(out):
        os.makedirs(out_dir, exist_ok=True)
        convert(path, out, progress=False)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out
