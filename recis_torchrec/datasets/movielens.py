# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""MovieLens-100k as a click-style task: rating >= 4 is a positive.

``prepare(ml_dir, out_dir)`` joins ``u.data`` with ``u.user`` and ``u.item``
and writes ``train.parquet`` and ``eval.parquet``, split chronologically (the
last `eval_fraction` of the ratings by timestamp are held out). Columns:
``label``, ``timestamp``; dense ``age`` (years / 100) and ``year`` (release year - 1900, / 100);
sparse ``user_id``, ``item_id``, ``occupation``, ``gender``, ``zip3`` (first
three zip digits) and ``genres`` (a ``list<int64>`` of genre ids).
"""

import os
from typing import Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recis_torchrec.io.schema import Schema


def movielens_schema() -> Schema:
    return Schema(
        dense=["age", "year"],
        sparse={
            "user": "user_id",
            "item": "item_id",
            "occupation": "occupation",
            "gender": "gender",
            "zip3": "zip3",
            "genres": "genres",
        },
        labels=["label"],
    )


def prepare(ml_dir: str, out_dir: str, eval_fraction: float = 0.2) -> Tuple[str, str]:
    """Writes ``train.parquet`` and ``eval.parquet`` under `out_dir`; returns their paths."""
    for name in ("u.data", "u.user", "u.item"):
        if not os.path.exists(os.path.join(ml_dir, name)):
            raise FileNotFoundError(f"{os.path.join(ml_dir, name)}: missing (is {ml_dir} MovieLens-100k?)")
    ratings = np.loadtxt(os.path.join(ml_dir, "u.data"), dtype=np.int64)  # user item rating timestamp
    users = {}
    with open(os.path.join(ml_dir, "u.user"), encoding="latin-1") as f:
        for line in f:
            uid, age, gender, occupation, zipcode = line.rstrip("\n").split("|")
            users[int(uid)] = (int(age), gender, occupation, zipcode[:3])
    items = {}
    with open(os.path.join(ml_dir, "u.item"), encoding="latin-1") as f:
        for line in f:
            parts = line.rstrip("\n").split("|")
            date = parts[2]
            year = int(date[-4:]) if len(date) >= 4 and date[-4:].isdigit() else 1990
            genres = [g for g, flag in enumerate(parts[5:24]) if flag == "1"]
            items[int(parts[0])] = (year, genres)
    order = np.argsort(ratings[:, 3], kind="stable")
    ratings = ratings[order]
    split = int(len(ratings) * (1 - eval_fraction))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, rows in (("train", ratings[:split]), ("eval", ratings[split:])):
        u = [users[int(x)] for x in rows[:, 0]]
        it = [items[int(x)] for x in rows[:, 1]]
        table = pa.table(
            {
                "label": pa.array((rows[:, 2] >= 4).astype(np.float32)),
                "timestamp": pa.array(rows[:, 3]),
                "age": pa.array(np.array([a[0] for a in u], dtype=np.float32) / 100.0),
                "year": pa.array((np.array([i[0] for i in it], dtype=np.float32) - 1900.0) / 100.0),
                "user_id": pa.array(rows[:, 0]),
                "item_id": pa.array(rows[:, 1]),
                "occupation": pa.array([a[2] for a in u]),
                "gender": pa.array([a[1] for a in u]),
                "zip3": pa.array([a[3] for a in u]),
                "genres": pa.array([i[1] for i in it], pa.list_(pa.int64())),
            }
        )
        path = os.path.join(out_dir, f"{name}.parquet")
        pq.write_table(table, path, row_group_size=8192)
        paths.append(path)
    return paths[0], paths[1]
