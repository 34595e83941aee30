# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Tables larger than memory: one table with its rows on disk (``HashTableOptions(storage="ssd")``)
against the same table in memory.

- ``compare``: a table of ``--ids`` ids (D=64, row-wise Adagrad, one feature, B=2048 bags of L=20 ids
  a step) is filled with every id, then trained on a Zipf(1.05) id stream. The same steps run on the
  table in memory and on tables whose cache holds 20% and 5% of the rows, each with the prefetch
  pipeline (the next batch's rows come in on a worker thread) and without it. Reported per case: ms
  per step (median) and against memory, rows and bytes read and written per step, the rows each step
  had to read itself, ``memory_bytes`` (cache + the disk's index) and the growth of the process's own
  resident memory (RssAnon) and of the rows file's pages mapped by reads (RssFile, page cache).
  Every case trains the same ids in the same order, and the runs' final losses are checked equal.
- ``large`` (``--large-ids N``): a table whose rows and state do not fit the memory budget trains
  with a cache of ``--cache-gb``: the fill's rate, steps/s, bytes per step, RSS and the file's size.
  It checks free disk space first, and the rows file is unlinked when the table is created, so it
  goes when the process ends.

The rows file sits in ``--dir`` (default: a directory under the system's temporary directory). Where
the file fits the page cache, reads come from memory through the kernel; the report says how big the
file was against the memory the machine has.

    python -m benchmarks.bench_storage [--ids 10000000] [--steps 30] [--large-ids 0] [--cache-gb 2]
        [--threads 1] [--dir DIR] [--out DIR]

Writes ``<out>/<date>-storage.json`` and ``.md``. Run under ``OMP_WAIT_POLICY=active`` like the suite (it
re-runs itself so).
"""

import argparse
import datetime
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
BATCH, POOLING, DIM = 2048, 20, 64
ZIPF = 1.05
FILL_CHUNK = 1 << 20


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_split() -> Dict[str, int]:
    """The process's resident memory by kind: ``anon`` (its own memory) and ``file`` (pages of mapped files,
    here the rows file's pages that reads touched: page cache, which the kernel reclaims as it needs)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line[3:7].lower()] = int(line.split()[1]) * 1024
    return out


def mem_total_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def id_of(rank: np.ndarray) -> np.ndarray:
    """Spreads ranks over the int64 range (hot ids are not neighbours in the IdMap or on disk)."""
    return (rank.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) >> np.uint64(1)).astype(np.int64)


def zipf_batches(ids: int, steps: int, seed: int = 0) -> List[torch.Tensor]:
    """`steps` batches of B*L ids drawn from Zipf(1.05) over `ids` ranks (inverse CDF)."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, ids + 1, dtype=np.float64) ** -ZIPF)
    cdf /= cdf[-1]
    out = []
    for _ in range(steps):
        rank = np.minimum(np.searchsorted(cdf, rng.random(BATCH * POOLING)), ids - 1)
        out.append(torch.from_numpy(id_of(rank)))
    del cdf
    return out


def make_model(options):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagConfig

    import recis_torchrec as rt

    config = EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=1 << 20, feature_names=["f"])
    return rt.HashEmbeddingBagCollection(
        [config], fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05},
        options=options,
    )


class _Task(torch.nn.Module):
    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):
        out = self.ebc(kjt).values()
        return out.square().mean(), out.detach()


def kjt_of(values: torch.Tensor):
    from torchrec import KeyedJaggedTensor

    return KeyedJaggedTensor(keys=["f"], values=values, lengths=torch.full((BATCH,), POOLING, dtype=torch.int64))


def fill(model, ids: int) -> float:
    """Inserts every id (ranks 0..ids-1); returns keys/s."""
    table = model.tables()["t"]
    t0 = time.perf_counter()
    for start in range(0, ids, FILL_CHUNK):
        table.find_or_insert(torch.from_numpy(id_of(np.arange(start, min(ids, start + FILL_CHUNK)))))
    table.prefetch(torch.zeros(0, dtype=torch.int64))  # the last chunk's rows beyond the cache go to disk
    return ids / (time.perf_counter() - t0)


def train_case(options, ids: int, batches: List[torch.Tensor], pipelined: bool, warmup: int = 3) -> Dict[str, Any]:
    import recis_torchrec as rt

    gc.collect()
    rss0 = rss_split()
    model = make_model(options)
    task = _Task(model)
    fill_rate = fill(model, ids)
    table = model.tables()["t"]
    info0 = table.info()
    kjts = [kjt_of(b) for b in batches]
    times, losses = [], []
    if pipelined:
        pipe = rt.PrefetchTrainPipeline(task)
        it = iter(kjts)
        for _ in kjts:
            t0 = time.perf_counter()
            pipe.progress(it)
            times.append(time.perf_counter() - t0)
        pipe.close()
        losses = [float(task(kjts[-1])[0])]
    else:
        for kjt in kjts:
            t0 = time.perf_counter()
            loss, _ = task(kjt)
            loss.backward()
            times.append(time.perf_counter() - t0)
        losses = [float(task(kjts[-1])[0])]
    info = table.info()
    steps = len(kjts)
    res: Dict[str, Any] = {
        "fill_keys_per_s": fill_rate,
        "ms_per_step": 1000 * statistics.median(times[warmup:]),
        "final_loss": losses[-1],
        "rows": info["rows"],
        "memory_bytes": info["memory_bytes"],
        "rss_growth_bytes": rss_split()["anon"] - rss0["anon"],
        "rss_file_growth_bytes": rss_split()["file"] - rss0["file"],
    }
    if table.on_disk:
        row = info["row_bytes"]
        read = info["disk_bytes_read"] - info0["disk_bytes_read"]
        written = info["disk_bytes_written"] - info0["disk_bytes_written"]
        record = DIM * 4 + 4
        res.update({
            "cache_budget_rows": info["cache_budget_rows"],
            "rows_read_per_step": read / record / steps,
            "rows_written_per_step": written / record / steps,
            "bytes_read_per_step": read / steps,
            "bytes_written_per_step": written / steps,
            "rows_read_by_steps_per_step": table.rows_read_at_lookup / steps,
            "disk_index_bytes": info["disk_index_bytes"],
            "disk_file_bytes": info["disk_file_bytes"],
            "cache_row_bytes": row,
        })
    del model, task, table
    gc.collect()
    return res


def compare(ids: int, steps: int, directory: str) -> Dict[str, Any]:
    from recis_torchrec import HashTableOptions

    batches = zipf_batches(ids, steps)
    distinct = len(torch.cat(batches).unique())
    cases: Dict[str, Any] = {}
    print(f"compare: {ids:,} ids, {steps} steps of {BATCH * POOLING:,} ids ({distinct:,} distinct)", flush=True)
    cases["memory"] = train_case(HashTableOptions(), ids, batches, pipelined=False)
    print("memory", cases["memory"], flush=True)
    probe = make_model(HashTableOptions()).tables()["t"].info()["row_bytes"]
    for share in (0.2, 0.05):
        for pipelined in (True, False):
            options = HashTableOptions(storage="ssd", storage_path=directory,
                                       cache_bytes=int(share * ids) * (probe + 32))
            name = f"ssd cache {int(share * 100)}%{' + prefetch' if pipelined else ''}"
            cases[name] = train_case(options, ids, batches, pipelined)
            cases[name]["vs_memory"] = cases[name]["ms_per_step"] / cases["memory"]["ms_per_step"]
            print(name, cases[name], flush=True)
    losses = {k: v["final_loss"] for k, v in cases.items()}
    return {"ids": ids, "steps": steps, "distinct_ids_in_steps": distinct, "cases": cases,
            "same_final_loss": len(set(losses.values())) == 1, "final_losses": losses}


def large(ids: int, cache_gb: float, steps: int, directory: str) -> Dict[str, Any]:
    from recis_torchrec import HashTableOptions

    record = DIM * 4 + 4
    need = ids * record
    free = shutil.disk_usage(directory).free
    if need > 0.8 * free:
        raise SystemExit(f"bench_storage: {ids:,} rows need {need / 2**30:.1f} GiB on disk; {directory} has "
                         f"{free / 2**30:.1f} GiB free")
    batches = zipf_batches(ids, steps, seed=1)
    options = HashTableOptions(storage="ssd", storage_path=directory, cache_bytes=int(cache_gb * 2**30))
    res = train_case(options, ids, batches, pipelined=True)
    res.update({"ids": ids, "cache_gb": cache_gb, "rows_and_state_gib": need / 2**30,
                "machine_memory_gib": mem_total_bytes() / 2**30, "steps_per_s": 1000 / res["ms_per_step"]})
    return res


def markdown(res: Dict[str, Any]) -> str:
    lines = [f"# Tables on disk ({res['date']}, {res['threads']} thread(s))", ""]
    c = res.get("compare")
    if c:
        mem = c["cases"]["memory"]
        lines += [
            f"{c['ids']:,} ids, D={DIM}, row-wise Adagrad, Zipf({ZIPF}), {c['steps']} steps of B={BATCH} x L={POOLING} "
            f"({c['distinct_ids_in_steps']:,} distinct ids). Final losses equal in every case: "
            f"{c['same_final_loss']}. The rows file: {max(v.get('disk_file_bytes', 0) for v in c['cases'].values()) / 2**30:.2f} GiB "
            f"(machine memory {mem_total_bytes() / 2**30:.0f} GiB: it fits the page cache).",
            "",
            "| case | ms/step | vs memory | rows read/step | rows written/step | read by the step itself | memory_bytes | "
            "RssAnon growth | RssFile growth |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, v in c["cases"].items():
            lines.append(
                f"| {name} | {v['ms_per_step']:.1f} | {v.get('vs_memory', 1.0):.2f} | "
                f"{v.get('rows_read_per_step', 0):,.0f} | {v.get('rows_written_per_step', 0):,.0f} | "
                f"{v.get('rows_read_by_steps_per_step', 0):,.0f} | {v['memory_bytes'] / 2**20:,.0f} MiB | "
                f"{v['rss_growth_bytes'] / 2**20:,.0f} MiB | {v['rss_file_growth_bytes'] / 2**20:,.0f} MiB |")
        lines.append("")
        lines.append(f"Fill (insert every id): memory {mem['fill_keys_per_s'] / 1e6:.2f} M keys/s; "
                     + ", ".join(f"{k} {v['fill_keys_per_s'] / 1e6:.2f} M keys/s" for k, v in c["cases"].items()
                                 if k != "memory"))
        lines.append("")
    g = res.get("large")
    if g:
        lines += [
            f"Large: {g['ids']:,} ids ({g['rows_and_state_gib']:.1f} GiB of rows and state; machine memory "
            f"{g['machine_memory_gib']:.0f} GiB), cache {g['cache_gb']} GiB: {g['steps_per_s']:.2f} steps/s, "
            f"{g['bytes_read_per_step'] / 2**20:.1f} MiB read and {g['bytes_written_per_step'] / 2**20:.1f} MiB written "
            f"per step, memory_bytes {g['memory_bytes'] / 2**30:.2f} GiB (index {g['disk_index_bytes'] / 2**30:.2f} "
            f"GiB), RssAnon growth {g['rss_growth_bytes'] / 2**30:.2f} GiB (RssFile, the rows file's mapped pages: "
            f"{g['rss_file_growth_bytes'] / 2**30:.2f} GiB), fill {g['fill_keys_per_s'] / 1e6:.2f} M keys/s.",
            "",
        ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=10_000_000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--large-ids", type=int, default=0)
    p.add_argument("--cache-gb", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None)
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    directory = args.dir or tempfile.mkdtemp(prefix="recis-storage-")
    res: Dict[str, Any] = {"date": datetime.date.today().isoformat(), "threads": args.threads}
    try:
        if args.ids:
            res["compare"] = compare(args.ids, args.steps, directory)
        if args.large_ids:
            res["large"] = large(args.large_ids, args.cache_gb, args.steps, directory)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{res['date']}-storage")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    return res


if __name__ == "__main__":
    from benchmarks.threading_env import pinned_environment, requested_policy

    env = pinned_environment(os.environ, requested_policy([]))
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_storage", *sys.argv[1:]], env)
    main()
