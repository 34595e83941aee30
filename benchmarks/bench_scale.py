# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The scale curve: one table grown from 1e5 ids to what fits in the memory budget, with, at each size,

- ``insert``: keys/s of the bulk insert that grew the table to this size, and the minor page faults
  per inserted key (``getrusage``: fresh row and IdMap memory touched for the first time);
- ``find``: keys/s of a lookup of existing ids (uniform over the table: the worst case for caches);
- ``find_or_insert``: keys/s of a batch of one training step's size (2^17 keys) of which half are new,
  the new ids erased after each call (as eviction keeps a table at its cap: their rows are reused, so
  fresh memory is in ``insert`` alone);
- ``forward`` and ``train``: one table of a DLRM-like batch (B=2048, L=20, uniform ids), forward alone
  and forward + backward + fused row-wise Adagrad, ours against FBGEMM's CPU TBE holding exactly the
  same rows (TBE at the sizes where it fits beside ours in the budget);
- ``bytes/id``: ``memory_bytes`` over the ids, and TBE's ``E x (D + 1) x 4``;

and, after the curve, training steps whose ids are partly new, with and without spare blocks (rows
prepared ahead of growth off the training thread, see ``csrc/hashtable/embedding_blocks.h``).

The budget is min(--budget-gb, 40% of MemAvailable): the machine has no swap, and running out of memory
kills every process on it. Sizes grow by about sqrt(10) and stop before the projected footprint (the
table at the next size, with an IdMap doubling's old and new arrays) would pass the budget.

    python -m benchmarks.bench_scale [--budget-gb 8] [--dim 64] [--threads 1] [--out DIR]

Writes ``<out>/<date>-scale.json``, ``.md`` and ``.png`` (find, find_or_insert, the steps and bytes per id
against the table size). Run it under ``OMP_WAIT_POLICY=active`` like the suite (it re-runs itself so).
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
STEP_KEYS = 1 << 17  # a training step's ids for one table (B=2048 x L=20 x ~3 features)
BATCH, POOLING = 2048, 20


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sizes_up_to(start: int, stop: int) -> List[int]:
    out, s = [], start
    while s <= stop:
        out.append(s)
        s = int(round(s * 10**0.5, -len(str(int(s * 10**0.5))) + 2))  # ~sqrt(10) steps, two digits
    return out


def _median_ms(fn, reps: int) -> float:
    fn()  # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(budget_bytes: int, dim: int = 64, start: int = 100_000, reps: int = 5, max_ids: Optional[int] = None,
        seed: int = 0) -> Dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                        SplitTableBatchedEmbeddingBagsCodegen)
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

    import recis_torchrec as rt

    rng = np.random.default_rng(seed)
    ebc = rt.HashEmbeddingBagCollection(
        [EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=start, feature_names=["f"])],
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01})
    table = ebc.tables()["t"]
    tbe_bytes_per_id = 4 * (dim + 1)
    grad = torch.randn(BATCH, dim)
    lengths = torch.full((BATCH,), POOLING, dtype=torch.int64)
    offsets = torch.arange(BATCH + 1, dtype=torch.int64) * POOLING
    keys = torch.empty(0, dtype=torch.int64)
    points: List[Dict[str, Any]] = []
    base_rss = rss_bytes()
    limit = max_ids or 10**12
    sizes = sizes_up_to(start, limit)
    while sizes:
        size = sizes.pop(0)
        grow = size - keys.numel()
        if grow > 0:
            if points:  # project the next size: its bytes/id, and an IdMap doubling's two arrays at once
                per_id = points[-1]["bytes_per_id"] + 32 + 8  # + a doubling's extra slots, + our key copy
                if base_rss + size * per_id > budget_bytes:
                    # The last point: the largest two-digit size that fits, if well past the previous one.
                    fit = max(int((budget_bytes - base_rss) / per_id), 0)
                    unit = 10 ** max(len(str(fit)) - 2, 0)
                    fit = fit // unit * unit  # rounded down: it still fits
                    if fit > 1.2 * points[-1]["ids"] and fit <= limit:
                        sizes = [fit]
                        continue
                    break
            new = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, grow, dtype=np.int64))
            faults0 = minor_faults()
            t0 = time.perf_counter()
            table.find_or_insert(new)
            insert_s = time.perf_counter() - t0
            faults = minor_faults() - faults0
            keys = torch.cat([keys, new])
        else:
            insert_s, faults = float("nan"), 0
        n = len(table)
        point: Dict[str, Any] = {"ids": n, "insert_keys": grow, "insert_keys_s": grow / insert_s if grow > 0 else None,
                                 "faults_per_inserted_key": faults / grow if grow > 0 else None,
                                 "bytes_per_id": table.memory_bytes() / n, "tbe_bytes_per_id": tbe_bytes_per_id,
                                 "rss_gb": rss_bytes() / 2**30}
        q = keys[torch.from_numpy(rng.integers(0, keys.numel(), 1_000_000))]
        point["find_keys_s"] = q.numel() / (_median_ms(lambda: table.find(q), reps) / 1e3)
        # find_or_insert: half the batch new.
        foi = []
        for _ in range(3):
            fresh = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, STEP_KEYS // 2, dtype=np.int64))
            mixed = torch.cat([keys[torch.from_numpy(rng.integers(0, keys.numel(), STEP_KEYS // 2))], fresh])
            t0 = time.perf_counter()
            table.find_or_insert(mixed)
            foi.append(time.perf_counter() - t0)
            table.erase(fresh)  # back to this size, as eviction keeps a table at its cap
        point["find_or_insert_keys_s"] = STEP_KEYS / statistics.median(foi)
        # One table's forward and training step, ours and TBE on the same rows.
        pos = torch.from_numpy(rng.integers(0, keys.numel(), (4, BATCH * POOLING)))
        kjts = [KeyedJaggedTensor(keys=["f"], values=keys[p], lengths=lengths) for p in pos]
        it = {"i": 0}

        def next_kjt():
            it["i"] += 1
            return kjts[it["i"] % 4]

        with torch.no_grad():
            point["forward_ms"] = _median_ms(lambda: ebc(next_kjt()), reps)
        point["train_ms"] = _median_ms(lambda: ebc(next_kjt()).values().backward(grad), reps)
        rows = keys.numel()
        if rss_bytes() + rows * tbe_bytes_per_id * 1.1 <= budget_bytes:
            tbe = SplitTableBatchedEmbeddingBagsCodegen([(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                        learning_rate=0.01, pooling_mode=PoolingMode.SUM)
            # TBE's rows are our ids' positions in `keys`: the same rows, densely numbered.
            def next_pos():
                it["i"] += 1
                return pos[it["i"] % 4]

            with torch.no_grad():
                point["tbe_forward_ms"] = _median_ms(lambda: tbe(next_pos(), offsets), reps)
            point["tbe_train_ms"] = _median_ms(lambda: tbe(next_pos(), offsets).backward(grad), reps)
            del tbe
        else:
            point["tbe_forward_ms"] = point["tbe_train_ms"] = None
        point["rss_after_gb"] = rss_bytes() / 2**30
        points.append(point)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in point.items()}), flush=True)
    return {"dim": dim, "optimizer": "EXACT_ROWWISE_ADAGRAD", "budget_bytes": budget_bytes, "batch": BATCH,
            "pooling": POOLING, "step_keys": STEP_KEYS, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "points": points, "machine": machine_caches()}


def fresh_rows_steps(ids: int = 1_000_000, new_fraction: float = 1.0, steps: int = 30, dim: int = 64,
                     dense_matmuls: int = 8, seed: int = 0) -> Dict[str, Any]:
    """Training steps whose ids are `new_fraction` new (rows into fresh memory), on two tables alike but
    for their spare blocks (``RECIS_SPARE_BLOCKS`` on and off when each was created), alternating step by
    step in one process. Between steps a few 512x512 matmuls stand for the dense part of a model: the
    time in which spare blocks are prepared. Returns the step times (ms) of each."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

    import recis_torchrec as rt

    rng = np.random.default_rng(seed)
    before = os.environ.get("RECIS_SPARE_BLOCKS")
    ebcs, keys = {}, torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, ids, dtype=np.int64))
    try:
        for name, env in (("spare_blocks", "1"), ("no_spare_blocks", "0")):
            os.environ["RECIS_SPARE_BLOCKS"] = env  # read when a table is created
            ebc = rt.HashEmbeddingBagCollection(
                [EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=ids, feature_names=["f"])],
                fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01})
            ebc.tables()["t"].find_or_insert(keys)
            ebcs[name] = ebc
    finally:
        if before is None:
            os.environ.pop("RECIS_SPARE_BLOCKS", None)
        else:
            os.environ["RECIS_SPARE_BLOCKS"] = before
    grad, dense = torch.randn(BATCH, dim), torch.randn(512, 512)
    n = BATCH * POOLING
    fresh = int(n * new_fraction)
    times: Dict[str, List[float]] = {name: [] for name in ebcs}
    for step in range(steps + 2):
        old = keys[torch.from_numpy(rng.integers(0, ids, n - fresh))]
        batch = torch.cat([old, torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, fresh, dtype=np.int64))])
        kjt = KeyedJaggedTensor(keys=["f"], values=batch, lengths=torch.full((BATCH,), POOLING, dtype=torch.int64))
        for name in (list(ebcs) if step % 2 == 0 else list(ebcs)[::-1]):
            t0 = time.perf_counter()
            ebcs[name](kjt).values().backward(grad)
            if step >= 2:
                times[name].append((time.perf_counter() - t0) * 1e3)
            for _ in range(dense_matmuls):
                dense @ dense
    bytes_per_id = {name: e.tables()["t"].memory_bytes() / len(e.tables()["t"]) for name, e in ebcs.items()}
    return {"ids": ids, "new_fraction": new_fraction, "dim": dim, "steps": steps, "dense_matmuls": dense_matmuls,
            "times_ms": times, "bytes_per_id": bytes_per_id,
            "median_ms": {k: statistics.median(v) for k, v in times.items()},
            "p90_ms": {k: float(np.quantile(v, 0.9)) for k, v in times.items()}}


def machine_caches() -> Dict[str, Any]:
    info: Dict[str, Any] = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            if not idx.startswith("index"):
                continue
            read = lambda f: open(os.path.join(base, idx, f)).read().strip()  # noqa: E731
            if read("type") != "Instruction":
                info[f"L{read('level')}"] = read("size")
    except OSError:
        pass
    try:
        info["transparent_hugepage"] = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        pass
    return info


def markdown(res: Dict[str, Any]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"D={res['dim']}, row-wise Adagrad, {res['threads']} thread(s), OMP_WAIT_POLICY={res['omp_wait_policy']},"
             f" caches {res['machine']}",
             "",
             "| ids | insert M keys/s | faults / new key | find M keys/s | find_or_insert M keys/s | forward ms | "
             "TBE forward ms | train ms | TBE train ms | train / TBE | B/id | TBE B/id | RSS GB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in res["points"]:
        ratio = p["train_ms"] / p["tbe_train_ms"] if p["tbe_train_ms"] else None
        lines.append(
            f"| {p['ids']:,} | {f(p['insert_keys_s'] and p['insert_keys_s'] / 1e6, '.1f')} | "
            f"{f(p['faults_per_inserted_key'], '.3f')} | {p['find_keys_s'] / 1e6:.1f} | "
            f"{p['find_or_insert_keys_s'] / 1e6:.1f} | {p['forward_ms']:.2f} | {f(p['tbe_forward_ms'], '.2f')} | "
            f"{p['train_ms']:.2f} | {f(p['tbe_train_ms'], '.2f')} | {f(ratio, '.2f')} | {p['bytes_per_id']:.0f} | "
            f"{p['tbe_bytes_per_id']} | {p['rss_after_gb']:.2f} |")
    if res.get("fresh_rows"):
        lines += ["", "Training steps with new ids (fresh rows), spare blocks on and off, alternating in one process:",
                  "", "| ids | new ids per step | spare blocks: median / p90 ms | none: median / p90 ms | "
                  "median ratio | B/id with / without |", "|---:|---:|---:|---:|---:|---:|"]
        for r in res["fresh_rows"]:
            m, q, b = r["median_ms"], r["p90_ms"], r["bytes_per_id"]
            lines.append(f"| {r['ids']:,} | {r['new_fraction']:.0%} | {m['spare_blocks']:.2f} / {q['spare_blocks']:.2f}"
                         f" | {m['no_spare_blocks']:.2f} / {q['no_spare_blocks']:.2f} | "
                         f"{m['spare_blocks'] / m['no_spare_blocks']:.2f} | {b['spare_blocks']:.0f} / "
                         f"{b['no_spare_blocks']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(res: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = res["points"]
    x = [p["ids"] for p in pts]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(x, [p["find_keys_s"] / 1e6 for p in pts], "o-", label="find")
    ax.plot(x, [p["find_or_insert_keys_s"] / 1e6 for p in pts], "s-", label="find_or_insert (half new)")
    ins = [(p["ids"], p["insert_keys_s"] / 1e6) for p in pts if p["insert_keys_s"]]
    ax.plot([a for a, _ in ins], [b for _, b in ins], "^-", label="bulk insert")
    ax.set_ylabel("M keys/s")
    ax.set_title("hashtable")
    ax = axes[1]
    ax.plot(x, [p["train_ms"] for p in pts], "o-", label="ours: fwd+bwd+row-wise Adagrad")
    tb = [(p["ids"], p["tbe_train_ms"]) for p in pts if p["tbe_train_ms"]]
    ax.plot([a for a, _ in tb], [b for _, b in tb], "s-", label="FBGEMM TBE: same")
    ax.plot(x, [p["forward_ms"] for p in pts], "o--", label="ours: forward")
    tf = [(p["ids"], p["tbe_forward_ms"]) for p in pts if p["tbe_forward_ms"]]
    ax.plot([a for a, _ in tf], [b for _, b in tf], "s--", label="TBE: forward")
    ax.set_ylabel(f"ms per step (B={res['batch']}, L={res['pooling']})")
    ax.set_title("one table's step")
    ax = axes[2]
    ax.plot(x, [p["bytes_per_id"] for p in pts], "o-", label="ours")
    ax.plot(x, [p["tbe_bytes_per_id"] for p in pts], "s-", label="TBE")
    ax.set_ylabel("bytes per id")
    ax.set_title("memory")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("ids in the table")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-gb", type=float, default=8.0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--start", type=int, default=100_000)
    p.add_argument("--max-ids", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = int(min(args.budget_gb * 2**30, 0.4 * mem_available_bytes()))
    print(f"budget {budget / 2**30:.1f} GB (MemAvailable {mem_available_bytes() / 2**30:.1f} GB)", flush=True)
    res = run(budget, dim=args.dim, start=args.start, reps=args.reps, max_ids=args.max_ids)
    res["fresh_rows"] = [fresh_rows_steps(ids=min(1_000_000, 10 * args.start), new_fraction=f, dim=args.dim,
                                          steps=max(4, 6 * args.reps))
                         for f in (0.25, 1.0)]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{datetime.date.today().isoformat()}-scale")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(res, stem + ".png")
    print(md)
    return res


if __name__ == "__main__":
    from benchmarks.threading_env import pinned_environment, requested_policy

    env = pinned_environment(os.environ, requested_policy([]))
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_scale", *sys.argv[1:]], env)
    main()
