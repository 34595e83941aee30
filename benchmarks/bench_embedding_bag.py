# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Pooled embedding lookup, head to head: ours vs FBGEMM TBE (CPU), TorchRec's EBC
and nn.EmbeddingBag(sparse=True).

Every implementation sees the same KJT, the same initial weights and the same
output gradient, and the measurements are interleaved (one call of each per
round), so machine noise hits them alike. Reported: median and p10/p90 ms,
the ratio to the baseline of the row, and FBGEMM's effective bandwidth
(forward bytes = B*sum(D)*L*4 + B*sum(D)*4; training counts twice that).

    python -m benchmarks.bench_embedding_bag            # DESIGN.md shape
    python -m benchmarks.bench_embedding_bag --quick    # a small shape, for a smoke run
"""

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

import recis_torchrec as rt
from recis_torchrec.testing import zipf_ids

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


@dataclass(frozen=True)
class ExperimentConfig:
    tables: int = 8
    rows: int = 100_000
    dim: int = 64
    batch: int = 2048
    pooling: int = 20
    zipf_alpha: float = 0.0  # 0: uniform
    reps: int = 15
    warmup: int = 3

    def forward_bytes(self) -> int:
        return self.batch * self.tables * self.dim * self.pooling * 4 + self.batch * self.tables * self.dim * 4


@dataclass(frozen=True)
class ExperimentResult:
    bench: str  # "forward", "forward_eval", "train_sgd", "train_rowwise_adagrad", "train_adam"
    impl: str
    samples_ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.samples_ms, q))


def make_kjt(cfg: ExperimentConfig, seed: int) -> KeyedJaggedTensor:
    rng = np.random.default_rng(seed)
    n = cfg.tables * cfg.batch * cfg.pooling
    ids = zipf_ids(n, cfg.rows, cfg.zipf_alpha, rng)
    return KeyedJaggedTensor(
        keys=[f"f{t}" for t in range(cfg.tables)],
        values=torch.from_numpy(ids),
        lengths=torch.full((cfg.tables * cfg.batch,), cfg.pooling, dtype=torch.int64),
    )


def table_configs(cfg: ExperimentConfig) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{t}", embedding_dim=cfg.dim, num_embeddings=cfg.rows, feature_names=[f"f{t}"])
        for t in range(cfg.tables)
    ]


def make_tbe(cfg: ExperimentConfig, ebc: EmbeddingBagCollection, optimizer: EmbOptimType, lr: float):
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(cfg.rows, cfg.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * cfg.tables,
        optimizer=optimizer,
        learning_rate=lr,
        pooling_mode=PoolingMode.SUM,
    )
    with torch.no_grad():
        for w, c in zip(tbe.split_embedding_weights(), ebc.embedding_bag_configs()):
            w.copy_(ebc.embedding_bags[c.name].weight)
    return tbe


class SparseBags(torch.nn.Module):
    """nn.EmbeddingBag(sparse=True) per table: the plain-PyTorch sparse baseline."""

    def __init__(self, ebc: EmbeddingBagCollection):
        super().__init__()
        self.bags = torch.nn.ModuleList()
        for c in ebc.embedding_bag_configs():
            bag = torch.nn.EmbeddingBag(c.num_embeddings, c.embedding_dim, mode="sum", sparse=True)
            bag.weight.data.copy_(ebc.embedding_bags[c.name].weight.detach())
            self.bags.append(bag)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        outs = []
        for bag, jt in zip(self.bags, kjt.to_dict().values()):
            outs.append(bag(jt.values(), jt.offsets()[:-1]))
        return torch.cat(outs, dim=1)


def run_round_robin(impls: Dict[str, Callable[[], None]], reps: int, warmup: int) -> Dict[str, List[float]]:
    samples = {name: [] for name in impls}
    for r in range(warmup + reps):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                samples[name].append(dt)
    return samples


def bench_all(cfg: ExperimentConfig, which: Optional[List[str]] = None) -> List[ExperimentResult]:
    torch.manual_seed(0)
    kjts = [make_kjt(cfg, s) for s in range(4)]
    ebc = EmbeddingBagCollection(table_configs(cfg))
    grad = torch.randn(cfg.batch, cfg.tables * cfg.dim)
    results: List[ExperimentResult] = []
    counter = {"i": 0}

    def next_kjt() -> KeyedJaggedTensor:
        counter["i"] += 1
        return kjts[counter["i"] % len(kjts)]

    def ours(fused) -> rt.HashEmbeddingBagCollection:
        return rt.convert(copy.deepcopy(ebc), fused_params=fused)

    def want(name: str) -> bool:
        return which is None or name in which

    # -- forward --------------------------------------------------------------
    if want("forward"):
        hebc = ours({"optimizer": EmbOptimType.EXACT_SGD})
        tbe = make_tbe(cfg, ebc, EmbOptimType.EXACT_SGD, 0.01)
        kjt = kjts[0]
        impls = {
            "recis_torchrec": lambda: hebc(kjt),
            "fbgemm_tbe": lambda: tbe(kjt.values(), kjt.offsets()),
            "torchrec_ebc": lambda: ebc(kjt),
        }
        with torch.no_grad():
            for name, s in run_round_robin(impls, cfg.reps, cfg.warmup).items():
                results.append(ExperimentResult("forward", name, s))
        del hebc, tbe

    # -- forward, eval under torch.inference_mode: a dense table's forward-only fast path ----------
    if want("forward_eval"):
        hebc = ours({"optimizer": EmbOptimType.EXACT_SGD})
        kjt = kjts[0]
        with torch.no_grad():
            hebc(kjt)  # every id gets its row (a training forward inserts them)
        hebc.eval()
        bags = SparseBags(ebc)
        impls = {"recis_torchrec": lambda: hebc(kjt), "nn_embeddingbag_inference_mode": lambda: bags(kjt)}
        with torch.inference_mode():
            for name, s in run_round_robin(impls, cfg.reps, cfg.warmup).items():
                results.append(ExperimentResult("forward_eval", name, s))
        del hebc, bags

    # -- forward + backward + SGD / row-wise Adagrad ----------------------------
    def bench_fused_vs_dense(bench: str, optimizer: EmbOptimType, dense_optimizer) -> None:
        lr = 0.01
        hebc = ours({"optimizer": optimizer, "learning_rate": lr})
        tbe = make_tbe(cfg, ebc, optimizer, lr)
        ref = copy.deepcopy(ebc)
        ref_opt = dense_optimizer(ref.parameters(), lr=lr)

        def ours_step():
            hebc(next_kjt()).values().backward(grad)

        def tbe_step():
            k = next_kjt()
            tbe(k.values(), k.offsets()).backward(grad)

        def ebc_step():
            ref_opt.zero_grad()
            ref(next_kjt()).values().backward(grad)
            ref_opt.step()

        impls = {"recis_torchrec": ours_step, "fbgemm_tbe": tbe_step, "torchrec_ebc": ebc_step}
        for name, s in run_round_robin(impls, cfg.reps, cfg.warmup).items():
            results.append(ExperimentResult(bench, name, s))

    if want("train_sgd"):
        bench_fused_vs_dense("train_sgd", EmbOptimType.EXACT_SGD, torch.optim.SGD)
    if want("train_rowwise_adagrad"):
        bench_fused_vs_dense("train_rowwise_adagrad", EmbOptimType.EXACT_ROWWISE_ADAGRAD, RowWiseAdagrad)

    # -- forward + backward + Adam ----------------------------------------------
    if want("train_adam"):
        lr = 1e-3
        hebc = ours({"optimizer": EmbOptimType.ADAM, "learning_rate": lr})
        base = SparseBags(ebc)
        base_opt = torch.optim.SparseAdam(base.parameters(), lr=lr)

        def ours_step():
            hebc(next_kjt()).values().backward(grad)

        def base_step():
            base_opt.zero_grad()
            base(next_kjt()).backward(grad)
            base_opt.step()

        impls = {"recis_torchrec": ours_step, "nn_embeddingbag_sparseadam": base_step}
        for name, s in run_round_robin(impls, cfg.reps, cfg.warmup).items():
            results.append(ExperimentResult("train_adam", name, s))
    return results


BASELINE = {
    "forward": "fbgemm_tbe",
    "forward_eval": "nn_embeddingbag_inference_mode",
    "train_sgd": "fbgemm_tbe",
    "train_rowwise_adagrad": "fbgemm_tbe",
    "train_adam": "nn_embeddingbag_sparseadam",
}


def machine() -> Dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import fbgemm_gpu
    import torchrec

    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
        "torchrec": getattr(torchrec, "__version__", "?"),
        "python": platform.python_version(),
    }


def markdown(cfg: ExperimentConfig, results: List[ExperimentResult]) -> str:
    by = {(r.bench, r.impl): r for r in results}
    fwd_bytes = cfg.forward_bytes()
    lines = [
        f"T={cfg.tables} tables x E={cfg.rows:,} rows x D={cfg.dim}, B={cfg.batch}, L={cfg.pooling}, "
        f"ids {'uniform' if cfg.zipf_alpha <= 0 else f'Zipf {cfg.zipf_alpha}'}, {cfg.reps} reps",
        "",
        "| benchmark | implementation | median ms | p10 ms | p90 ms | ratio to baseline | GB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = by.get((r.bench, BASELINE[r.bench]))
        ratio = r.median / base.median if base else float("nan")
        nbytes = fwd_bytes if r.bench.startswith("forward") else 2 * fwd_bytes
        gbs = nbytes / (r.median * 1e-3) / 1e9
        lines.append(
            f"| {r.bench} | {r.impl} | {r.median:.1f} | {r.quantile(0.1):.1f} | {r.quantile(0.9):.1f} | "
            f"{ratio:.2f} | {gbs:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small shape and few reps")
    p.add_argument("--zipf", type=float, nargs="*", default=[0.0, 1.15], help="Zipf exponents (0 = uniform)")
    p.add_argument("--bench", nargs="*", default=None, help="subset of: " + ", ".join(BASELINE))
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<date>-<host>-embedding_bag.json)")
    args = p.parse_args(argv)

    runs = []
    for alpha in args.zipf:
        cfg = ExperimentConfig(zipf_alpha=alpha)
        if args.quick:
            cfg = dataclasses.replace(cfg, tables=2, rows=10_000, batch=256, reps=3, warmup=1)
        if args.reps:
            cfg = dataclasses.replace(cfg, reps=args.reps)
        results = bench_all(cfg, args.bench)
        print(markdown(cfg, results), flush=True)
        print(flush=True)
        runs.append({"config": dataclasses.asdict(cfg), "results": [dataclasses.asdict(r) for r in results]})

    info = machine()
    print(f"machine: {info}")
    out = args.out
    if out is None:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d")
        out = os.path.join(RESULTS_DIR, f"{stamp}-{info['host']}-embedding_bag{'-quick' if args.quick else ''}.json")
    with open(out, "w") as f:
        json.dump({"machine": info, "runs": runs}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
