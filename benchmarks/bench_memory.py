# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Bytes per id of a hash table holding N ids, per optimizer and dim, against FBGEMM TBE's
``E x (D + state) x 4`` bytes for a table of exactly E = N rows (TBE keeps no ids, no metadata and no
slack: the floor a bounded table has):

- ``reserved``: ``memory_bytes`` over the ids (IdMap slots, every allocated row block, logs);
- ``used``: ``used_bytes`` over the ids (the live rows with their id and metadata, and their IdMap slots).

    python -m benchmarks.bench_memory [--ids 1000000]
"""

import argparse
from typing import List, Optional

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig

import recis_torchrec as rt

# Floats of optimizer state per row for TBE: SGD none, row-wise Adagrad one, Adagrad D, Adam 2D.
TBE_STATE = {"EXACT_SGD": lambda d: 0, "EXACT_ROWWISE_ADAGRAD": lambda d: 1, "EXACT_ADAGRAD": lambda d: d,
             "ADAM": lambda d: 2 * d}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=1_000_000)
    args = p.parse_args(argv)
    ids = torch.arange(args.ids, dtype=torch.int64) * 7919 + 13
    print("| optimizer | dim | ours reserved B/id | ours used B/id | TBE B/id | reserved / TBE | used / TBE |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for opt, state in TBE_STATE.items():
        for dim in (16, 64, 128):
            ebc = rt.HashEmbeddingBagCollection(
                [EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=args.ids, feature_names=["f"])],
                fused_params={"optimizer": EmbOptimType[opt], "learning_rate": 0.01})
            table = ebc.tables()["t"]
            table.find_or_insert(ids)
            info = table.info()
            reserved, used = info["memory_bytes"] / args.ids, info["used_bytes"] / args.ids
            tbe = 4 * (dim + state(dim))
            print(f"| {opt} | {dim} | {reserved:.0f} | {used:.0f} | {tbe} | {reserved / tbe:.2f} | {used / tbe:.2f} |")
            del ebc, table


if __name__ == "__main__":
    main()
