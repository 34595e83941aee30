# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""2-rank DMP training step: hash sharding vs TorchRec's row-wise sharding.

Both sides train TorchRec's DLRM on the same per-rank batches, under
DistributedModelParallel on gloo (CPU), with fused row-wise Adagrad: ours via
``rt.sharders``/``rt.plan``, TorchRec's via its ``EmbeddingBagCollectionSharder``
with row-wise, fused (FBGEMM TBE) tables. Ids stay below ``num_embeddings`` so
TorchRec's bounded tables can hold them. Steps alternate between the two
models, after a barrier, so machine noise hits both alike. Reported: the
median step time (the slower rank's), and the bytes each rank sends to other
ranks per step in the embedding collectives (counted by wrapping the
torch.distributed calls; DDP's dense all-reduce, the same for both, is not
counted).

    python -m benchmarks.bench_dmp            # T=8, E=1e5, D=64, B=1024/rank, L=20
    python -m benchmarks.bench_dmp --quick
"""

import argparse
import contextlib
import inspect
import dataclasses
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


@dataclass(frozen=True)
class DmpConfig:
    tables: int = 8
    rows: int = 100_000
    dim: int = 64
    batch: int = 1024  # per rank
    pooling: int = 20
    zipf_alpha: float = 0.0
    reps: int = 10
    warmup: int = 3
    world_size: int = 2


_COUNTED = ("all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "reduce_scatter",
            "reduce_scatter_tensor")


@contextlib.contextmanager
def count_collective_bytes(counter: Dict[str, int]):
    """Adds to counter["bytes"] the bytes this rank sends to other ranks in
    the torch.distributed collectives called inside the block."""
    originals = {name: getattr(dist, name) for name in _COUNTED}

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def sent(name, args, kwargs):
        a = inspect.signature(originals[name]).bind(*args, **kwargs).arguments
        group = a.get("group")
        ws, rank = dist.get_world_size(group), dist.get_rank(group)
        if name == "all_to_all_single":
            inp, in_splits = a["input"], a.get("input_split_sizes")
            row = nbytes(inp) // max(inp.shape[0], 1) if inp.dim() else nbytes(inp)
            own = (in_splits[rank] * row) if in_splits else nbytes(inp) // ws
            return nbytes(inp) - own
        if name in ("all_to_all", "reduce_scatter"):
            return sum(nbytes(t) for j, t in enumerate(a["input_list"]) if j != rank)
        if name == "all_gather":
            return nbytes(a["tensor"]) * (ws - 1)
        if name == "all_gather_into_tensor":
            return nbytes(a["input_tensor"]) * (ws - 1)
        if name == "reduce_scatter_tensor":
            return nbytes(a["input"]) * (ws - 1) // ws
        return 0

    def wrap(name):
        fn = originals[name]

        def counted(*args, **kwargs):
            counter["bytes"] += sent(name, args, kwargs)
            return fn(*args, **kwargs)

        return counted

    for name in _COUNTED:
        setattr(dist, name, wrap(name))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _batches(cfg: DmpConfig, rank: int, n: int):
    from torchrec import KeyedJaggedTensor
    from torchrec.datasets.utils import Batch

    from recis_torchrec.testing import zipf_ids

    out = []
    for step in range(n):
        rng = np.random.default_rng([rank, step, 7])
        ids = zipf_ids(cfg.tables * cfg.batch * cfg.pooling, cfg.rows, cfg.zipf_alpha, rng)
        kjt = KeyedJaggedTensor(
            keys=[f"f{t}" for t in range(cfg.tables)],
            values=torch.from_numpy(ids),
            lengths=torch.full((cfg.tables * cfg.batch,), cfg.pooling, dtype=torch.int64),
        )
        dense = torch.from_numpy(rng.normal(size=(cfg.batch, 13)).astype(np.float32))
        labels = torch.from_numpy((rng.random(cfg.batch) < 0.3).astype(np.float32))
        out.append(Batch(dense_features=dense, sparse_features=kjt, labels=labels))
    return out


def _models(cfg: DmpConfig, world_size: int):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingPlan
    from torchrec.models.dlrm import DLRM

    import recis_torchrec as rt

    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01}

    def dlrm():
        torch.manual_seed(0)
        tables = [
            EmbeddingBagConfig(name=f"t{t}", embedding_dim=cfg.dim, num_embeddings=cfg.rows, feature_names=[f"f{t}"])
            for t in range(cfg.tables)
        ]
        return DLRM(
            embedding_bag_collection=EmbeddingBagCollection(tables, device=torch.device("meta")),
            dense_in_features=13,
            dense_arch_layer_sizes=[64, cfg.dim],
            over_arch_layer_sizes=[64, 1],
        )

    ours = dlrm()
    ours = DistributedModelParallel(ours, sharders=rt.sharders(fused), plan=rt.plan(ours, world_size))
    theirs = dlrm()
    ebc = theirs.sparse_arch.embedding_bag_collection
    plan = ShardingPlan(
        {
            "sparse_arch.embedding_bag_collection": construct_module_sharding_plan(
                ebc,
                {
                    c.name: row_wise(compute_kernel=EmbeddingComputeKernel.FUSED.value)
                    for c in ebc.embedding_bag_configs()
                },
                local_size=world_size,
                world_size=world_size,
                device_type="cpu",
            )
        }
    )
    theirs = DistributedModelParallel(theirs, sharders=[EmbeddingBagCollectionSharder(fused_params=fused)], plan=plan)
    return {"recis_torchrec": ours, "torchrec_row_wise": theirs}


def measure_steps(models: Dict[str, Any], step, batches: List[Any], reps: int, warmup: int):
    """Alternates training steps of the models after a barrier; returns (samples_ms, bytes_sent):
    per model, the slower rank's step times, and the bytes this rank sent to other ranks in one
    counted step (after a warm-up step)."""
    samples: Dict[str, List[float]] = {name: [] for name in models}
    sent: Dict[str, int] = {}
    for name in models:
        step(name, batches[0])
        counter = {"bytes": 0}
        with count_collective_bytes(counter):
            step(name, batches[1])
        sent[name] = counter["bytes"]
    for r in range(warmup + reps):
        for name in models:
            batch = batches[r % len(batches)]
            dist.barrier()
            t0 = time.perf_counter()
            step(name, batch)
            dt = torch.tensor([(time.perf_counter() - t0) * 1e3])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step ends when the slower rank's does
            if r >= warmup:
                samples[name].append(float(dt))
    return samples, sent


def _worker(rank: int, world_size: int, cfg: DmpConfig, out_path: str) -> None:
    models = _models(cfg, world_size)
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.01) for name, m in models.items()}
    batches = _batches(cfg, rank, 4)

    def step(name: str, batch) -> None:
        model, opt = models[name], opts[name]
        opt.zero_grad()
        logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        opt.step()

    samples, sent = measure_steps(models, step, batches, cfg.reps, cfg.warmup)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"samples_ms": samples, "bytes_sent_rank0": sent}, f)


def run_workers(worker, cfg) -> Dict[str, object]:
    """Runs ``worker(rank, world_size, cfg, out_path)`` on ``cfg.world_size`` ranks; returns the JSON rank 0 wrote."""
    from recis_torchrec.testing.multiprocess import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        run_ranks(worker, world_size=cfg.world_size, args=(cfg, path), timeout=1200)
        with open(path) as f:
            return json.load(f)


def run(cfg: DmpConfig) -> Dict[str, object]:
    return run_workers(_worker, cfg)


def markdown(cfg: DmpConfig, result: Dict[str, object]) -> str:
    samples = result["samples_ms"]
    sent = result["bytes_sent_rank0"]
    base = statistics.median(samples["torchrec_row_wise"])
    base_bytes = sent["torchrec_row_wise"]
    lines = [
        f"{cfg.world_size} ranks (gloo, 1 thread each), DLRM, T={cfg.tables} x E={cfg.rows:,} x D={cfg.dim}, "
        f"B={cfg.batch}/rank, L={cfg.pooling}, ids {'uniform' if cfg.zipf_alpha <= 0 else f'Zipf {cfg.zipf_alpha}'}, "
        f"fused row-wise Adagrad, {cfg.reps} steps",
        "",
        "| sharding | median step ms | p10 | p90 | ratio | bytes sent per step (rank 0) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("recis_torchrec", "torchrec_row_wise"):
        s = samples[name]
        lines.append(
            f"| {name} | {statistics.median(s):.1f} | {np.quantile(s, 0.1):.1f} | {np.quantile(s, 0.9):.1f} | "
            f"{statistics.median(s) / base:.2f} | {sent[name]:,} | {sent[name] / max(base_bytes, 1):.2f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--zipf", type=float, nargs="*", default=[0.0, 1.15])
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    runs = []
    for alpha in args.zipf:
        cfg = DmpConfig(zipf_alpha=alpha)
        if args.quick:
            cfg = dataclasses.replace(cfg, tables=2, rows=5_000, batch=128, reps=3, warmup=1)
        if args.reps:
            cfg = dataclasses.replace(cfg, reps=args.reps)
        result = run(cfg)
        print(markdown(cfg, result), "\n", flush=True)
        runs.append({"config": dataclasses.asdict(cfg), **result})
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out = os.path.join(RESULTS_DIR, f"{stamp}-{socket.gethostname()}-dmp{'-quick' if args.quick else ''}.json")
    with open(out, "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
