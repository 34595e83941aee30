# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""2-rank sharded sequence embeddings: hash sharding (deduplicated ids, rows back) vs TorchRec's
row-wise ``EmbeddingCollection`` sharding.

Both sides train the same model under DistributedModelParallel on gloo (CPU):
an ``EmbeddingCollection`` with one item table read by a behaviour history
(L ids per sample, Zipf 1.15 over the rows, so ids repeat) and a candidate (1
id per sample); a position-weighted sum of the unpooled embeddings feeds a
linear layer. Ours: ``rt.sharders``/``rt.plan`` with fused exact SGD; TorchRec:
``EmbeddingCollectionSharder`` with row-wise, fused (FBGEMM TBE) tables and
exact SGD. Ids stay below ``num_embeddings``. Steps alternate between the
two models after a barrier. Reported: the median step time (the slower
rank's) and the bytes each rank sends to other ranks per step in the
embedding collectives, forward and backward (counted by wrapping the
torch.distributed calls; DDP's dense all-reduce, the same for both, is not
counted).

    python -m benchmarks.bench_sequence_dmp
    python -m benchmarks.bench_sequence_dmp --quick
"""

import argparse
import dataclasses
import datetime
import json
import os
import socket
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from benchmarks.bench_dmp import measure_steps, run_workers

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


@dataclass(frozen=True)
class SeqDmpConfig:
    rows: int = 100_000
    dim: int = 64
    batch: int = 64  # per rank
    length: int = 500  # history ids per sample
    zipf_alpha: float = 1.15
    reps: int = 10
    warmup: int = 2
    world_size: int = 2


def _batches(cfg: SeqDmpConfig, rank: int, n: int):
    from torchrec import KeyedJaggedTensor

    from recis_torchrec.testing import zipf_ids

    out = []
    for step in range(n):
        rng = np.random.default_rng([rank, step, 11])
        hist = zipf_ids(cfg.batch * cfg.length, cfg.rows, cfg.zipf_alpha, rng)
        cand = zipf_ids(cfg.batch, cfg.rows, cfg.zipf_alpha, rng)
        lengths = np.concatenate([np.full(cfg.batch, cfg.length), np.ones(cfg.batch, dtype=np.int64)])
        kjt = KeyedJaggedTensor(
            keys=["hist", "cand"],
            values=torch.from_numpy(np.concatenate([hist, cand])),
            lengths=torch.from_numpy(lengths),
        )
        labels = torch.from_numpy((rng.random(cfg.batch) < 0.3).astype(np.float32))
        out.append((kjt, labels))
    return out


class SeqModel(torch.nn.Module):
    def __init__(self, cfg: SeqDmpConfig, device: torch.device):
        from torchrec import EmbeddingCollection, EmbeddingConfig

        super().__init__()
        self.ec = EmbeddingCollection(
            [EmbeddingConfig(name="item", embedding_dim=cfg.dim, num_embeddings=cfg.rows, feature_names=["hist", "cand"])],
            device=device,
        )
        self.head = torch.nn.Linear(2 * cfg.dim, 1)
        self.batch = cfg.batch
        self.length = cfg.length
        w = 1.0 / (1.0 + torch.arange(cfg.length, dtype=torch.float32))
        self.register_buffer("pos", w.view(1, cfg.length, 1), persistent=False)

    def forward(self, kjt):
        out = self.ec(kjt)
        hist = out["hist"].values().view(self.batch, self.length, -1)
        cand = out["cand"].values()
        return self.head(torch.cat([(hist * self.pos).sum(1), cand], 1)).squeeze(-1)


def _models(cfg: SeqDmpConfig, world_size: int):
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingPlan

    import recis_torchrec as rt

    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.01}
    torch.manual_seed(0)
    ours = SeqModel(cfg, torch.device("meta"))
    ours = DistributedModelParallel(ours, sharders=rt.sharders(fused), plan=rt.plan(ours, world_size))
    torch.manual_seed(0)
    theirs = SeqModel(cfg, torch.device("meta"))
    plan = ShardingPlan(
        {
            "ec": construct_module_sharding_plan(
                theirs.ec,
                {"item": row_wise(compute_kernel=EmbeddingComputeKernel.FUSED.value)},
                local_size=world_size,
                world_size=world_size,
                device_type="cpu",
            )
        }
    )
    theirs = DistributedModelParallel(theirs, sharders=[EmbeddingCollectionSharder(fused_params=fused)], plan=plan)
    return {"recis_torchrec": ours, "torchrec_row_wise": theirs}


def _worker(rank: int, world_size: int, cfg: SeqDmpConfig, out_path: str) -> None:
    models = _models(cfg, world_size)
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.01) for name, m in models.items()}
    batches = _batches(cfg, rank, 4)
    distinct = int(torch.unique(batches[1][0].values()).numel())
    values = int(batches[1][0].values().numel())

    def step(name: str, batch) -> None:
        kjt, labels = batch
        model, opt = models[name], opts[name]
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
        loss.backward()
        opt.step()

    samples, sent = measure_steps(models, step, batches, cfg.reps, cfg.warmup)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(
                {"samples_ms": samples, "bytes_sent_rank0": sent, "values_rank0": values, "distinct_rank0": distinct},
                f,
            )


def run(cfg: SeqDmpConfig) -> Dict[str, object]:
    return run_workers(_worker, cfg)


def markdown(cfg: SeqDmpConfig, result: Dict[str, object]) -> str:
    samples, sent = result["samples_ms"], result["bytes_sent_rank0"]
    base = statistics.median(samples["torchrec_row_wise"])
    base_bytes = sent["torchrec_row_wise"]
    lines = [
        f"{cfg.world_size} ranks (gloo), EC with one table E={cfg.rows:,} x D={cfg.dim}, B={cfg.batch}/rank, "
        f"history L={cfg.length} + 1 candidate, ids Zipf {cfg.zipf_alpha} ({result['distinct_rank0']:,} distinct of "
        f"{result['values_rank0']:,} ids on rank 0), exact SGD, {cfg.reps} steps",
        "",
        "| sharding | median step ms | p10 | p90 | ratio | bytes sent per step (rank 0) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("recis_torchrec", "torchrec_row_wise"):
        s = samples[name]
        lines.append(
            f"| {name} | {statistics.median(s):.1f} | {np.quantile(s, 0.1):.1f} | {np.quantile(s, 0.9):.1f} | "
            f"{statistics.median(s) / base:.2f} | {sent[name]:,} | {sent[name] / max(base_bytes, 1):.3f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--zipf", type=float, nargs="*", default=[1.15, 0.0])
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    runs = []
    for alpha in args.zipf:
        cfg = SeqDmpConfig(zipf_alpha=alpha)
        if args.quick:
            cfg = dataclasses.replace(cfg, rows=5_000, batch=16, length=50, reps=3, warmup=1)
        if args.reps:
            cfg = dataclasses.replace(cfg, reps=args.reps)
        result = run(cfg)
        print(markdown(cfg, result), "\n", flush=True)
        runs.append({"config": dataclasses.asdict(cfg), **result})
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out = os.path.join(
        RESULTS_DIR, f"{stamp}-{socket.gethostname()}-sequence-dmp{'-quick' if args.quick else ''}.json"
    )
    with open(out, "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
