# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Generated files in the layouts public CTR datasets are published in, for tests, examples and
benchmarks (the real files' licences forbid copying them):

- :func:`write_avazu_csv`: Avazu's click logs: one CSV with a header (``id,click,hour,C1,...``), every
  feature a categorical string (hex ids, ``hour`` as ``YYMMDDHH``), no dense column.
- :func:`write_taobao_parts`: Taobao/Alimama-style samples with behaviour sequences: header-less CSV
  parts ``clk, user, item, cate, hist_item, hist_cate, price, pid``, the histories as one field
  delimited by ``^`` (``"170301^573514"``), ``price`` a raw, unscaled number and ``pid`` empty in
  every row; or, with ``repeated_header=True``, one CSV whose fixed-width history is ``history``
  columns all named ``his_cate`` with a mask column each (``his_mask``), padding as 0.
- :func:`write_amazon_tsv`: the Amazon review samples as DIEN's preparation scripts write them
  (``local_train_splitByUser``): header-less TSV ``label, user, item, category, item history,
  category history``, users and items as Amazon's string ids (``A2...``, ``B00...``), categories
  as names, each history one field delimited by ``\\x02``.

In both, the label carries signal: an Avazu click depends on the site and the device type; a
Taobao click on whether the target's category is among the user's recent ones (only the history
says so: a model that cannot relate the two cannot learn it).
"""

import os
from typing import List

import numpy as np

AVAZU_COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                 "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
                 "device_conn_type"] + [f"C{i}" for i in range(14, 22)]
TAOBAO_COLUMNS = ["clk", "user", "item", "cate", "hist_item", "hist_cate", "price", "pid"]


def write_avazu_csv(path: str, rows: int = 2000, seed: int = 0) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # the examples' data/avazu/ in a fresh checkout
    rng = np.random.default_rng(seed)
    sites = [f"{x:08x}" for x in rng.integers(0, 2**32, 50)]
    good = set(sites[:10])
    with open(path, "w") as f:
        f.write(",".join(AVAZU_COLUMNS) + "\n")
        for r in range(rows):
            site = sites[int(rng.integers(0, len(sites)))]
            device_type = int(rng.integers(0, 5))
            p = 0.05 + 0.5 * (site in good) + 0.2 * (device_type == 1)
            fields = {
                "id": str(int(rng.integers(10**18, 2**63 - 1))), "click": str(int(rng.random() < p)),
                "hour": f"1410{21 + r * 10 // rows:02d}{int(rng.integers(0, 24)):02d}", "C1": str(1005 + int(rng.integers(0, 3))),
                "banner_pos": str(int(rng.integers(0, 2))), "site_id": site, "site_domain": f"{(int(site, 16) * 2654435761) & 0xffffffff:08x}",
                "site_category": f"{int(rng.integers(0, 20)):08x}", "app_id": "ecad2386", "app_domain": "7801e8d9",
                "app_category": "07d7df22", "device_id": "a99f214a" if rng.random() < 0.8 else f"{int(rng.integers(0, 2**32)):08x}",
                "device_ip": f"{int(rng.integers(0, 2**32)):08x}", "device_model": f"{int(rng.integers(0, 300)):08x}",
                "device_type": str(device_type), "device_conn_type": str(int(rng.integers(0, 3))),
            }
            for i in range(14, 22):
                fields[f"C{i}"] = str(int(rng.integers(0, 1000)))
            f.write(",".join(fields[c] for c in AVAZU_COLUMNS) + "\n")
    return path


def _taobao_samples(rows: int, history: int, seed: int, num_items: int = 5000, num_cates: int = 50):
    rng = np.random.default_rng(seed)
    cate_of = rng.integers(0, num_cates, num_items)
    by_cate = [np.nonzero(cate_of == c)[0] for c in range(num_cates)]
    for _ in range(rows):
        liked = rng.choice(num_cates, 3, replace=False)
        n = int(rng.integers(0, history + 1))
        hist = []
        for _ in range(n):
            pool = by_cate[int(rng.choice(liked))]
            hist.append(int(rng.choice(pool)) if len(pool) else 0)
        recent = {int(cate_of[h]) for h in hist[-10:]}
        if rng.random() < 0.5 and recent:
            cate = int(rng.choice(sorted(recent)))
        else:
            cate = int(rng.integers(0, num_cates))
        item = int(rng.choice(by_cate[cate])) if len(by_cate[cate]) else 0
        p = 0.8 if cate in recent else 0.1
        yield (int(rng.random() < p), int(rng.integers(0, 10**6)), item, cate, hist,
               [int(cate_of[h]) for h in hist], float(rng.integers(1, 100_000)))


def write_taobao_parts(out_dir: str, rows: int = 2000, parts: int = 2, history: int = 50, seed: int = 0,
                       repeated_header: bool = False) -> List[str]:
    """The Taobao-shaped files under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    samples = list(_taobao_samples(rows, history, seed))
    paths = []
    if repeated_header:
        path = os.path.join(out_dir, "samples.csv")
        with open(path, "w") as f:
            f.write(",".join(["clk", "user", "item", "cate"] + ["his_cate"] * history + ["his_mask"] * history) + "\n")
            for clk, user, item, cate, _, hcate, _ in samples:
                hc = hcate[-history:]
                pad = history - len(hc)
                f.write(",".join(map(str, [clk, user, item, cate] + hc + [0] * pad + [1] * len(hc) + [0] * pad)) + "\n")
        return [path]
    per = (rows + parts - 1) // parts
    for p in range(parts):
        path = os.path.join(out_dir, f"part-{p:05d}.csv")
        with open(path, "w") as f:  # no header
            for clk, user, item, cate, hist, hcate, price in samples[p * per:(p + 1) * per]:
                f.write(f"{clk},{user},{item},{cate},{'^'.join(map(str, hist))},{'^'.join(map(str, hcate))},{price},\n")
        paths.append(path)
    return paths


AMAZON_COLUMNS = ["label", "user", "item", "cate", "hist_item", "hist_cate"]


def write_amazon_tsv(path: str, rows: int = 2000, history: int = 30, seed: int = 0) -> str:
    """Amazon-shaped samples (DIEN's layout) at ``path``; returns it. Same signal as the Taobao files."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    asin = lambda i: f"B00{i * 7919 % 10**7:07d}"  # noqa: E731
    cate = lambda c: f"Category {c}"  # noqa: E731
    with open(path, "w") as f:
        for clk, user, item, c, hist, hcate, _ in _taobao_samples(rows, history, seed):
            f.write("\t".join([str(clk), f"A{user:013X}", asin(item), cate(c), "\x02".join(map(asin, hist)),
                               "\x02".join(map(cate, hcate))]) + "\n")
    return path


__all__ = ["AMAZON_COLUMNS", "AVAZU_COLUMNS", "TAOBAO_COLUMNS", "write_amazon_tsv", "write_avazu_csv",
           "write_taobao_parts"]
