# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The head-to-head benchmark suite: every benchmark against its baselines, one report.

    python -m benchmarks              # full
    python -m benchmarks --quick      # a few minutes
    python -m benchmarks --smoke      # seconds: tiny sizes, checks the pipeline end to end

Writes ``benchmarks/results/<date>-<host>[-mode].json`` (raw samples, the
machine, the configs), ``...md`` (the report) and ``...-<plot>.png``. Each
benchmark runs ours and its baselines in the same process, alternating, and
reports median, p10 and p90 per implementation, the ratio to the baseline and,
where the bytes moved are known, the effective bandwidth in GB/s and as a
share of the copy bandwidth measured at the start of the same run (a
STREAM-like copy): the MBU.

Sections: memory (the ceiling), embedding (forward and forward+backward+
optimizer against FBGEMM's TBE, TorchRec's EBC and nn.EmbeddingBag, on
FBGEMM's benchmark shape scaled to fit and on the DESIGN shape; sweeps over
batch size, pooling factor, table size and Zipf exponent for the plots),
hashtable (find / find_or_insert / insert keys per second per core against a
sorted-array ``torch.searchsorted`` remap and ``std::unordered_map``),
features (each fused op and the engine against per-feature torch ops), loader
(against the plain pyarrow -> pandas -> KJT path), paths (FP16/BF16 tables against FP32: memory
per id and the training step; a torch.export-ed forward against eager) and dmp (a 2-rank DLRM step
against TorchRec's row-wise sharding; not in smoke mode), and, with a GPU and a
RECIS_CUDA=1 build, gpu (``benchmarks/bench_cuda.py``: pooled forward MBU against
the GPU's copy bandwidth, hashtable find in B keys/s, fwd+bwd+Adam against
``nn.EmbeddingBag`` + ``SparseAdam``).
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from benchmarks import cpp_baselines
from benchmarks.threading_env import DEFAULT_POLICY, POLICIES

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")

MODES = {
    # copy MB, embedding shapes, sweep points, hashtable sizes, feature batch, loader rows, dmp
    "smoke": dict(copy_mb=8, reps=2, warmup=1, fbgemm_rows=500, design_rows=500, design_batch=64, fbgemm_tables=4,
                  sweep=dict(batch=[16, 32], pooling=[2, 8], rows=[500, 2000], zipf=[0.0, 1.2]),
                  sweep_base=dict(tables=2, rows=1000, dim=16, batch=32, pooling=4),
                  table_sizes=[10_000], loads=[0.25, 0.9], feature_batch=256, loader_rows=20_000, dmp=False),
    "quick": dict(copy_mb=256, reps=7, warmup=2, fbgemm_rows=25_000, design_rows=100_000, design_batch=2048,
                  fbgemm_tables=32,
                  sweep=dict(batch=[256, 1024, 4096], pooling=[5, 20, 80], rows=[10_000, 100_000, 1_000_000],
                             zipf=[0.0, 0.8, 1.2]),
                  sweep_base=dict(tables=4, rows=100_000, dim=64, batch=1024, pooling=20),
                  table_sizes=[100_000, 1_000_000, 10_000_000], loads=[0.25, 0.5, 0.9], feature_batch=4096,
                  loader_rows=500_000, dmp=True),
    # FBGEMM's shape at E=1e5 holds 1.6 GB per copy of its tables; with every baseline and its optimizer
    # state alive at once that outgrows 24 GB, so the full mode scales E to 5e4.
    "full": dict(copy_mb=1024, reps=15, warmup=3, fbgemm_rows=50_000, design_rows=100_000, design_batch=2048,
                 fbgemm_tables=32,
                 sweep=dict(batch=[128, 512, 2048, 8192], pooling=[1, 5, 20, 80], rows=[10_000, 100_000, 1_000_000],
                            zipf=[0.0, 0.6, 1.0, 1.2, 1.4]),
                 sweep_base=dict(tables=8, rows=100_000, dim=64, batch=2048, pooling=20),
                 table_sizes=[100_000, 1_000_000, 10_000_000, 50_000_000], loads=[0.25, 0.5, 0.7, 0.9],
                 feature_batch=4096, loader_rows=5_000_000, dmp=True),
}


def _stats(samples: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(samples), "p10": float(np.quantile(samples, 0.1)),
            "p90": float(np.quantile(samples, 0.9))}


def machine() -> Dict[str, Any]:
    from benchmarks.bench_embedding_bag import machine as base

    info = dict(base())
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["platform"] = platform.platform()
    return info


# -- memory ceiling -------------------------------------------------------------------


def copy_bandwidth(mb: int, reps: int = 5, device: str = "cpu") -> Dict[str, Any]:
    """STREAM-like copy: GB/s = 2 x bytes (read + write) / time; the best of `reps`."""
    n = mb * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times[1:])
    return {"bytes": 2 * n * 4, "seconds": times[1:], "gb_s": 2 * n * 4 / best / 1e9, "device": device}


# -- rows of the report ------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    section: str
    bench: str
    impl: str
    samples_ms: List[float]
    baseline: str
    nbytes: Optional[int] = None  # bytes the op must move (for GB/s and MBU)
    items: Optional[int] = None  # keys / rows per call (for throughput)
    unit: str = ""
    threads: int = 1

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _round_robin(impls: Dict[str, Callable[[], Any]], reps: int, warmup: int) -> Dict[str, List[float]]:
    from benchmarks.bench_embedding_bag import run_round_robin

    return run_round_robin(impls, reps, warmup)


# -- embedding --------------------------------------------------------------------------


def embedding(mode: Dict[str, Any], with_sweeps: bool = True) -> Dict[str, Any]:
    from benchmarks.bench_embedding_bag import BASELINE, ExperimentConfig, bench_all

    rows: List[Row] = []
    shapes = {
        f"FBGEMM default shape scaled (T={mode['fbgemm_tables']}, E={mode['fbgemm_rows']:,}, D=128, B=512, L=20)":
            ExperimentConfig(tables=mode["fbgemm_tables"], rows=mode["fbgemm_rows"], dim=128, batch=512, pooling=20,
                             zipf_alpha=0.0, reps=mode["reps"], warmup=mode["warmup"]),
        f"DESIGN shape (T=8, E={mode['design_rows']:,}, D=64, B={mode['design_batch']}, L=20, Zipf 1.15)":
            ExperimentConfig(tables=8, rows=mode["design_rows"], dim=64, batch=mode["design_batch"], pooling=20,
                             zipf_alpha=1.15, reps=mode["reps"], warmup=mode["warmup"]),
    }
    configs = {}
    for shape, cfg in shapes.items():
        configs[shape] = dataclasses.asdict(cfg)
        for r in bench_all(cfg):
            nbytes = cfg.forward_bytes() * (1 if r.bench.startswith("forward") else 2)
            rows.append(Row("embedding", f"{r.bench} | {shape}", r.impl, r.samples_ms, BASELINE[r.bench], nbytes,
                            cfg.batch, "samples", torch.get_num_threads()))
    # Sweeps for the plots: forward, ours against FBGEMM's TBE.
    sweeps: Dict[str, List[Dict[str, Any]]] = {}
    base = mode["sweep_base"]
    for axis, points in (mode["sweep"] if with_sweeps else {}).items():
        sweeps[axis] = []
        for p in points:
            kw = dict(base)
            if axis == "zipf":
                kw["zipf_alpha"] = p
            else:
                kw[axis] = p
            cfg = ExperimentConfig(**kw, reps=max(2, mode["reps"] // 2), warmup=1)
            res = {r.impl: statistics.median(r.samples_ms) for r in bench_all(cfg, ["forward"])}
            sweeps[axis].append({"x": p, "ms": res, "samples": cfg.batch})
    return {"rows": rows, "configs": configs, "sweeps": sweeps}


# -- hashtable ---------------------------------------------------------------------------


def hashtable(mode: Dict[str, Any]) -> Dict[str, Any]:
    from recis_torchrec.modules import HashTableOptions
    from recis_torchrec.tables.hash_table import HashTable

    rows: List[Row] = []
    threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    reps = max(2, mode["reps"] // 2)
    queries = 1_000_000 if mode is not MODES["smoke"] else 20_000
    for size in mode["table_sizes"]:
        for load in mode["loads"]:
            n = int(size * load)
            keys = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64))
            table = HashTable(f"bench_{size}_{load}", 1, options=HashTableOptions(initial_capacity=size))
            t0 = time.perf_counter()
            table.find_or_insert(keys)  # insert: every key new
            insert_s = time.perf_counter() - t0
            q = keys[torch.from_numpy(rng.integers(0, n, queries))]
            fresh = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, queries // 2, dtype=np.int64))
            mixed = torch.cat([q[: queries // 2], fresh])
            sorted_keys, _ = torch.sort(keys)

            def remap():  # the plain baseline: a sorted key array and searchsorted
                pos = torch.searchsorted(sorted_keys, q).clamp_(max=n - 1)
                return torch.where(sorted_keys[pos] == q, pos, -1)

            bench = f"{size:,} keys reserved, {load:.2f} filled"
            s = _round_robin({"find": lambda: table.find(q), "remap": remap}, reps, 1)
            rows.append(Row("hashtable", f"find | {bench}", "recis_torchrec", s["find"], "sorted_searchsorted",
                            16 * queries, queries, "keys", threads))
            rows.append(Row("hashtable", f"find | {bench}", "sorted_searchsorted", s["remap"], "sorted_searchsorted",
                            16 * queries, queries, "keys", threads))
            um = cpp_baselines.unordered_map(keys, q)
            rows.append(Row("hashtable", f"find | {bench}", "std_unordered_map", [float(um[1]) * 1e3],
                            "sorted_searchsorted", 16 * queries, queries, "keys", 1))
            rows.append(Row("hashtable", f"insert | {bench}", "recis_torchrec", [insert_s * 1e3], "std_unordered_map",
                            16 * n, n, "keys", threads))
            rows.append(Row("hashtable", f"insert | {bench}", "std_unordered_map", [float(um[0]) * 1e3],
                            "std_unordered_map", 16 * n, n, "keys", 1))
            times = []
            for _ in range(reps):
                fresh = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, queries // 2, dtype=np.int64))
                mixed = torch.cat([q[: queries // 2], fresh])
                t0 = time.perf_counter()
                table.find_or_insert(mixed)
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append(Row("hashtable", f"find_or_insert (half new) | {bench}", "recis_torchrec", times,
                            "recis_torchrec", 16 * queries, queries, "keys", threads))
            table = keys = sorted_keys = None  # free them before the next size (the closures read them)
    return {"rows": rows}


# -- features ------------------------------------------------------------------------------


def features(mode: Dict[str, Any]) -> Dict[str, Any]:
    from benchmarks.bench_features import criteo_batch, criteo_specs
    from recis_torchrec import ops
    from recis_torchrec.features import FeatureEngine
    from recis_torchrec.testing import feature_reference as ref
    from recis_torchrec.testing.feature_reference import reference_engine

    B = mode["feature_batch"]
    kjt, dense = criteo_batch(B)
    v, l = kjt.values(), kjt.lengths().long()
    F = 26
    per = l.view(F, B).sum(1).tolist()
    parts = [(x, l[f * B : (f + 1) * B]) for f, x in enumerate(torch.split(v, per))]
    bounds = [0.0] + [float(2**k) for k in range(15)]
    flat = torch.tensor(bounds * 13)
    offs = [16 * i for i in range(14)]
    dense_keys = [f"int_{i}" for i in range(13)]
    engine = FeatureEngine(criteo_specs(), dense_keys=dense_keys)
    columns = {k: dense[:, i] for i, k in enumerate(dense_keys)}
    # Chains: each fused into its op's one pass over the ids, as a single op is.
    from torchrec import KeyedJaggedTensor

    from recis_torchrec.features import Cross, Feature

    cats = [f"cat_{i}" for i in range(F)]
    truncate_mod = FeatureEngine([Feature(c).truncate(1, side="last").mod(2**24) for c in cats])
    cross_hash = FeatureEngine([Cross(a, b).hash(salt=7).mod(2**24) for a, b in
                                (("cat_0", "cat_1"), ("cat_2", "cat_5"), ("cat_3", "cat_9"))])
    # Truncation that cuts: Criteo's bags hold 0 or 1 ids, so truncating them to 1 cuts nothing (the
    # program then copies each feature whole); these bags hold 0-6 ids and most are cut to 2.
    g = torch.Generator().manual_seed(0)
    long_lengths = torch.randint(0, 7, (F * B,), generator=g)
    long_kjt = KeyedJaggedTensor(cats, torch.randint(0, 2**62, (int(long_lengths.sum()),), generator=g),
                                 lengths=long_lengths, stride=B)
    truncate_cut = FeatureEngine([Feature(c).truncate(2, side="last").mod(2**24) for c in cats])
    n = v.numel()
    cases = {
        "hash+mod (26 features)": (
            lambda: ops.feature_hash(v, l, None, F, range(F), [7] * F, [2**24] * F),
            lambda: [ref.umod(ref.hash_ids(x, 7), 2**24) for x, _ in parts], 16 * n, n),
        "mod (26 features)": (
            lambda: ops.feature_mod(v, l, None, F, range(F), [2**24] * F),
            lambda: [ref.umod(x, 2**24) for x, _ in parts], 16 * n, n),
        "multi_hash x2 (26 features)": (
            lambda: ops.feature_multi_hash(v, l, None, F, range(F), [7] * F, [0] * F, 2),
            lambda: [ref.hash_ids(x, 7 + r * ref.SEED_STEP) for x, _ in parts for r in range(2)], 24 * n, n),
        "truncate to 1, last (26 features)": (
            lambda: ops.feature_truncate(v, l, None, F, range(F), [1] * F, [1] * F),
            lambda: [ref.truncate(x, ln, None, 1, True) for x, ln in parts], 16 * n, n),
        "cross (3 pairs)": (
            lambda: ops.feature_cross(v, l, None, F, [0, 2, 3], [1, 5, 9], [0] * 3, [2**24] * 3),
            lambda: [ref.cross(parts[a][0], parts[a][1], None, parts[b][0], parts[b][1], None, 0)
                     for a, b in ((0, 1), (2, 5), (3, 9))], 48 * B, 3 * B),
        "bucketize (13 columns x 16 boundaries)": (
            lambda: ops.feature_bucketize(dense, range(13), flat, offs),
            lambda: [ref.bucketize(dense[:, i], bounds) for i in range(13)], 12 * 13 * B, 13 * B),
        "engine: Criteo spec (26 hash+mod, 13 bucketize, 3 crosses)": (
            lambda: engine(kjt, dense=dense), lambda: reference_engine(engine.specs, kjt, columns), None, B),
        "engine chain: truncate to 1 (last) then mod (26 features)": (
            lambda: truncate_mod(kjt), lambda: reference_engine(truncate_mod.specs, kjt, {}), None, B),
        "engine chain: cross then hash then mod (3 pairs)": (
            lambda: cross_hash(kjt), lambda: reference_engine(cross_hash.specs, kjt, {}), None, B),
        "engine chain: truncate to 2 (last) then mod, bags of 0-6 ids (26 features)": (
            lambda: truncate_cut(long_kjt), lambda: reference_engine(truncate_cut.specs, long_kjt, {}), None, B),
    }
    for chain, inp in ((truncate_mod, kjt), (cross_hash, kjt), (truncate_cut, long_kjt)):  # fused == reference
        got, want = chain(inp), reference_engine(chain.specs, inp, {})
        if got.keys() != want.keys() or not torch.equal(got.values(), want.values()) \
                or not torch.equal(got.lengths(), want.lengths()):
            raise AssertionError(f"features: the engine and the reference differ on {chain.specs}")
    rows = []
    for name, (ours, base, nbytes, items) in cases.items():
        s = _round_robin({"ours": ours, "base": base}, mode["reps"], mode["warmup"])
        rows.append(Row("features", name, "recis_torchrec", s["ours"], "per_feature_torch", nbytes, items, "ids",
                        torch.get_num_threads()))
        rows.append(Row("features", name, "per_feature_torch", s["base"], "per_feature_torch", nbytes, items, "ids",
                        torch.get_num_threads()))
    return {"rows": rows, "batch": B}


# -- loader ----------------------------------------------------------------------------------


def loader(mode: Dict[str, Any], tmp: str) -> Dict[str, Any]:
    from benchmarks import bench_io

    path = os.path.join(tmp, "criteo_like.parquet")
    bench_io.generate(path, mode["loader_rows"])
    rows = []
    samples = {"ours": [], "plain": []}
    for _ in range(2 if mode is MODES["smoke"] else 3):
        o = bench_io.bench_ours(path, 8192)
        p = bench_io.bench_plain(path, 8192)
        samples["ours"].append(o["seconds"] * 1e3)
        samples["plain"].append(p["seconds"] * 1e3)
    n = mode["loader_rows"]
    rows.append(Row("loader", f"Parquet -> Batch with a KJT, {n:,} Criteo-shaped rows", "recis_torchrec",
                    samples["ours"], "pyarrow_pandas_kjt", None, n, "rows", torch.get_num_threads()))
    rows.append(Row("loader", f"Parquet -> Batch with a KJT, {n:,} Criteo-shaped rows", "pyarrow_pandas_kjt",
                    samples["plain"], "pyarrow_pandas_kjt", None, n, "rows", torch.get_num_threads()))
    return {"rows": rows}


# -- dmp ---------------------------------------------------------------------------------------


def dmp(mode: Dict[str, Any]) -> Dict[str, Any]:
    from benchmarks.bench_dmp import DmpConfig, run

    cfg = DmpConfig(zipf_alpha=1.15, reps=mode["reps"], warmup=mode["warmup"])
    if mode is MODES["quick"]:
        cfg = dataclasses.replace(cfg, rows=20_000, batch=512)
    result = run(cfg)
    rows = []
    for impl, s in result["samples_ms"].items():
        rows.append(Row("dmp", f"2-rank DLRM step, T={cfg.tables} x E={cfg.rows:,} x D={cfg.dim}, B={cfg.batch}/rank",
                        impl, s, "torchrec_row_wise", result["bytes_sent_rank0"][impl], 2 * cfg.batch, "samples", 1))
    return {"rows": rows, "config": dataclasses.asdict(cfg)}


# -- report ---------------------------------------------------------------------------------------


def report(results: Dict[str, Any]) -> str:
    ceiling = results["memory"]["gb_s"]
    info = results["machine"]
    lines = [
        f"# Benchmark report ({results['mode']}, {results['date']})",
        "",
        f"{info['cpu']}, {info['cores']} cores, {info.get('memory_gb', '?')} GB, GPU: {info['gpu'] or 'none'}; "
        f"torch {info['torch']}, fbgemm_gpu {info['fbgemm_gpu']}, torchrec {info['torchrec']}; "
        f"{info['torch_threads']} threads by default.",
        f"Memory ceiling (copy, read + write): {ceiling:.1f} GB/s. Ratios are ours / baseline "
        "(below 1: we are faster). MBU = effective GB/s over the ceiling.",
    ]
    if results.get("threading"):
        from benchmarks.threading_env import describe

        lines.append(describe(results["threading"]))
    if results.get("memory_gpu"):
        lines.append(f"GPU copy bandwidth (device to device, read + write): {results['memory_gpu']['gb_s']:.1f} GB/s; "
                     "the gpu section's MBU is against it.")
    for section in ("embedding", "hashtable", "features", "loader", "paths", "dmp", "gpu"):
        rows = [Row(**r) if isinstance(r, dict) else r for r in results.get(section, {}).get("rows", [])]
        if not rows:
            continue
        section_ceiling = results["memory_gpu"]["gb_s"] if section == "gpu" else ceiling
        lines += ["", f"## {section}", "",
                  "| benchmark | implementation | median ms | p10 | p90 | ratio | throughput | GB/s | MBU |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        medians = {(r.bench, r.impl): statistics.median(r.samples_ms) for r in rows}
        for r in rows:
            st = _stats(r.samples_ms)
            base = medians.get((r.bench, r.baseline))
            ratio = f"{st['median'] / base:.2f}" if base and r.impl != r.baseline else "1.00" if base else "-"
            if section == "hashtable":
                per_core = r.items / (st["median"] * 1e-3) / max(r.threads, 1)
                thr = f"{per_core / 1e6:.1f} M {r.unit}/s/core"
            elif section == "gpu" and r.unit == "keys":
                thr = f"{r.items / (st['median'] * 1e-3) / 1e9:.2f} B keys/s"
            elif r.items:
                thr = f"{r.items / (st['median'] * 1e-3) / 1e6:.2f} M {r.unit}/s"
            else:
                thr = "-"
            if r.nbytes and section != "dmp":
                gbs = r.nbytes / (st["median"] * 1e-3) / 1e9
                bw, mbu = f"{gbs:.1f}", f"{100 * gbs / section_ceiling:.0f}%"
            elif section == "dmp":
                bw, mbu = f"{r.nbytes:,} B sent", "-"
            else:
                bw, mbu = "-", "-"
            lines.append(f"| {r.bench} | {r.impl} | {st['median']:.3f} | {st['p10']:.3f} | {st['p90']:.3f} | "
                         f"{ratio} | {thr} | {bw} | {mbu} |")
    mem = results.get("paths", {}).get("memory_per_id")
    if mem:
        lines += ["", "Memory per id, one table of {:,} ids, D=64, row-wise Adagrad (rows, state, metadata, IdMap, "
                  "block slack): ".format(results["paths"]["config"]["ids"])
                  + ", ".join(f"{k} {mem[k]:.0f} B (row stride {mem[k + '_row_bytes']} B)" for k in ("FP32", "FP16", "BF16"))
                  + f"; FP16 / FP32 = {mem['FP16'] / mem['FP32']:.2f}."]
    breakdown = results.get("paths", {}).get("memory_breakdown")
    if breakdown:
        parts = list(breakdown[0]["per_id"])
        lines += ["", "Bytes per id by what holds them, one float32 table of {:,} ids, against FBGEMM TBE's "
                  "E x (D + state) x 4:".format(results["paths"]["config"]["ids"]), "",
                  "| optimizer | D | " + " | ".join(p.replace("_", " ") for p in parts) + " | total | TBE | ratio |",
                  "|---|---:|" + "---:|" * (len(parts) + 3)]
        for b in breakdown:
            lines.append(f"| {b['optimizer']} | {b['dim']} | " + " | ".join(f"{b['per_id'][p]:.1f}" for p in parts)
                         + f" | {b['total']:.1f} | {b['tbe']} | {b['ratio']:.2f} |")
    if results.get("plots"):
        lines += ["", "Plots: " + ", ".join(os.path.basename(p) for p in results["plots"])]
    return "\n".join(lines) + "\n"


def plots(results: Dict[str, Any], prefix: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    sweeps = results.get("embedding", {}).get("sweeps", {})
    labels = {"batch": "batch size", "pooling": "pooling factor", "rows": "rows per table", "zipf": "Zipf exponent"}
    for axis, points in sweeps.items():
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for impl in ("recis_torchrec", "fbgemm_tbe", "torchrec_ebc"):
            xs = [p["x"] for p in points if impl in p["ms"]]
            if axis == "zipf":
                ys = [p["samples"] / (p["ms"][impl] * 1e-3) for p in points if impl in p["ms"]]
            else:
                ys = [p["ms"][impl] for p in points if impl in p["ms"]]
            ax.plot(xs, ys, marker="o", label=impl)
        ax.set_xlabel(labels[axis])
        ax.set_ylabel("samples / s (forward)" if axis == "zipf" else "forward ms")
        if axis in ("batch", "rows", "pooling"):
            ax.set_xscale("log")
        ax.set_title(f"embedding forward vs {labels[axis]}")
        ax.legend()
        fig.tight_layout()
        path = f"{prefix}-{axis}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out


# Sections timed in this process at each of the run's thread counts (the others start their own
# processes or threads: the loader's pyarrow pool, the 2-rank dmp step, the GPU).
THREADED_SECTIONS = ("embedding", "hashtable", "features", "paths")


def default_thread_counts() -> List[int]:
    """1 and torch's default where that is more: the two columns a result may differ in."""
    return sorted({1, torch.get_num_threads()})


def threading_info(thread_counts: List[int]) -> Dict[str, Any]:
    from benchmarks.threading_env import wakeup_probe

    return {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "thread_counts": list(thread_counts),
            "threads": max(thread_counts), "interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(), "wakeup": wakeup_probe(max(thread_counts))}


def _run_section(section: str, mode: Dict[str, Any], mode_name: str, tmp: str, with_sweeps: bool) -> Dict[str, Any]:
    if section == "embedding":
        return embedding(mode, with_sweeps)
    if section == "hashtable":
        return hashtable(mode)
    if section == "features":
        return features(mode)
    if section == "loader":
        return loader(mode, tmp)
    if section == "paths":
        from benchmarks.bench_paths import paths

        return paths(mode_name)
    if section == "dmp":
        return dmp(mode)
    from benchmarks.bench_cuda import gpu

    return gpu(mode_name)


def run(mode_name: str, sections: Optional[List[str]] = None, out_dir: str = RESULTS_DIR,
        thread_counts: Optional[List[int]] = None) -> Dict[str, Any]:
    mode = MODES[mode_name]
    from recis_torchrec.ops.devices import cuda_tables_available
    from benchmarks.threading_env import describe

    thread_counts = sorted(set(thread_counts or default_thread_counts()))
    if min(thread_counts) < 1:
        raise SystemExit(f"benchmarks: --threads must be >= 1, got {thread_counts}")

    want = sections or ["embedding", "hashtable", "features", "loader", "paths"] + (["dmp"] if mode["dmp"] else [])
    if sections is None and cuda_tables_available():
        want.append("gpu")
    if "gpu" in want and not cuda_tables_available():
        raise SystemExit("benchmarks: the gpu section needs a GPU and an extension built with RECIS_CUDA=1")
    results: Dict[str, Any] = {"mode": mode_name, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                               "machine": machine(), "memory": copy_bandwidth(mode["copy_mb"]),
                               "config": {k: v for k, v in mode.items()},
                               "threading": threading_info(thread_counts)}
    print(f"[benchmarks] {describe(results['threading'])}", flush=True)
    if torch.cuda.is_available():
        results["memory_gpu"] = copy_bandwidth(mode["copy_mb"], device="cuda")
    timings = {}
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        for section in want:
            t0 = time.perf_counter()
            counts = thread_counts if section in THREADED_SECTIONS else [default_threads]
            merged: Dict[str, Any] = {}
            for n in counts:
                print(f"[benchmarks] {section} ({n} thread{'s' if n > 1 else ''}) ...", flush=True)
                torch.set_num_threads(n)
                try:
                    part = _run_section(section, mode, mode_name, tmp, with_sweeps=n == max(counts))
                finally:
                    torch.set_num_threads(default_threads)
                if len(counts) > 1:  # each row's benchmark names its thread count: the ratios pair within it
                    for r in part["rows"]:
                        r.bench = f"{r.bench} | {n} thread{'s' if n > 1 else ''}"
                rows = merged.get("rows", []) + part["rows"]
                merged.update(part)
                merged["rows"] = rows
            results[section] = merged
            timings[section] = time.perf_counter() - t0
    results["section_seconds"] = timings
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    suffix = "" if mode_name == "full" else f"-{mode_name}"
    prefix = os.path.join(out_dir, f"{stamp}-{socket.gethostname()}{suffix}")
    results["plots"] = plots(results, prefix)
    for section in want:
        results[section]["rows"] = [r.to_dict() for r in results[section]["rows"]]
    with open(prefix + ".json", "w") as f:
        json.dump(results, f, indent=1)
    text = report(results)
    with open(prefix + ".md", "w") as f:
        f.write(text)
    results["files"] = {"json": prefix + ".json", "report": prefix + ".md"}
    return results


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions (a few minutes)")
    g.add_argument("--smoke", action="store_true", help="tiny shapes: checks the suite end to end in seconds")
    p.add_argument("--only", nargs="*", choices=["embedding", "hashtable", "features", "loader", "paths", "dmp", "gpu"],
                   help="run only these sections")
    p.add_argument("--out", default=RESULTS_DIR, help="where the JSON, report and plots go")
    p.add_argument("--threads", default=None,
                   help="thread counts the in-process sections run at, comma-separated (default: 1 and torch's "
                        "default); every implementation of a row runs at its count")
    p.add_argument("--omp-wait-policy", choices=POLICIES, default=DEFAULT_POLICY,
                   help="OpenMP's wait policy, pinned before torch loads (python -m benchmarks re-runs itself "
                        "with OMP_WAIT_POLICY set; from Python, set it in the environment first)")
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    try:
        counts = [int(x) for x in args.threads.split(",")] if args.threads else None
    except ValueError:
        p.error(f"--threads: expected comma-separated integers, got {args.threads!r}")
    have = os.environ.get("OMP_WAIT_POLICY", "").lower()
    if have != args.omp_wait_policy:
        print(f"[benchmarks] warning: OMP_WAIT_POLICY is {have or '(unset)'}, not {args.omp_wait_policy}: torch "
              "was already loaded (run `python -m benchmarks`, which pins it, or set it before starting Python)",
              flush=True)
    results = run(mode, args.only, args.out, counts)
    with open(results["files"]["report"]) as f:
        print(f.read())
    print(f"wrote {results['files']['json']}, {results['files']['report']} and {len(results['plots'])} plots")


if __name__ == "__main__":
    main()
