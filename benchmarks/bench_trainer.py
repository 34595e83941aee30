# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The Trainer against a hand-written loop, and the main job's data wait.

Both sides train the main job's model (``examples/synthetic_dlrm.toml``:
TorchRec's DLRM, 8 hash tables of dim 16, batch 512 per rank) on the same
batches, generated up front so that data costs nothing on either side:

- hand: ``for batch in batches: opt.zero_grad(); loss, _ = model(batch);
  loss.backward(); opt.step(); float(loss)`` on the same ``TaskModel`` and,
  on 2 ranks, the same ``DistributedModelParallel``;
- trainer: ``Trainer.fit`` with progress bar off and no evaluation or
  saving inside the measured steps, but with its per-step work (train AUC,
  callbacks) and its logging every ``log_every`` steps (table statistics
  all-reduced, JSON lines): once with its plain loop and, on 2 ranks, once
  with TorchRec's ``TrainPipelineSparseDist``.

Rounds alternate between the variants (fresh models, the same seed), so
machine noise hits all alike. A step's time is the mean interval between
consecutive steps after a warm-up, on rank 0 (ranks move in lockstep).

The data wait is the main job's own figure (``summary["data_wait_fraction"]``):
the time the loop waits for its next batch over the loop's time, 2 ranks, with
the synthetic stream and with the same data read from Parquet by the loader.

    python -m benchmarks.bench_trainer            # 200 steps x 3 rounds
    python -m benchmarks.bench_trainer --quick
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "synthetic_dlrm.toml")
WARMUP = 10


def _run(rank: int, world_size: int, out_dir: str, **overrides):
    from recis_torchrec.train import build_run, load_config

    base = {"trainer.output_dir": out_dir, "trainer.progress": False, "trainer.eval_every": 0,
            "trainer.save_every": 0}
    return build_run(load_config(CONFIG), rank, world_size, dict(base, **overrides))


def _hand_loop(run, batches, world_size: int) -> List[float]:
    import recis_torchrec as rt
    from recis_torchrec.train import TaskModel

    model = TaskModel(run.model, run.tasks)
    if world_size > 1:
        from torchrec.distributed.model_parallel import DistributedModelParallel

        model = DistributedModelParallel(
            model, sharders=rt.sharders(run.fused_params, run.table_options),
            plan=rt.plan(model, world_size), device=torch.device("cpu"),
        )
    else:
        rt.convert(model, fused_params=run.fused_params, options=run.table_options)
    opt = run.dense_optimizer([p for p in model.parameters() if p.requires_grad])
    stamps = []
    for batch in batches:
        opt.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        opt.step()
        float(loss)
        stamps.append(time.perf_counter())
    return stamps


def _trainer_loop(run, batches, pipeline: bool, out_dir: str) -> List[float]:
    import dataclasses

    from recis_torchrec.train import Trainer

    args = dataclasses.replace(run.args, steps=len(batches), pipeline=pipeline, output_dir=out_dir)
    stamps: List[float] = []
    trainer = Trainer(
        run.model, args, list(batches), tasks=run.tasks, dense_optimizer=run.dense_optimizer,
        fused_params=run.fused_params, table_options=run.table_options,
        callbacks=[lambda *a: stamps.append(time.perf_counter())],
    )
    trainer.fit()
    trainer.close()
    return stamps


def _step_ms(stamps: List[float]) -> float:
    s = stamps[WARMUP:]
    return (s[-1] - s[0]) / (len(s) - 1) * 1e3


def _overhead_worker(rank: int, world_size: int, steps: int, rounds: int, out_path: str) -> None:
    from recis_torchrec.train import seed_all

    tmp = tempfile.mkdtemp(prefix=f"bench_trainer_{rank}_")
    run = _run(rank, world_size, tmp)
    batches = [run.train_data.batch(k) for k in range(steps)]
    variants = ["hand", "trainer_plain"] + (["trainer_pipelined"] if world_size > 1 else [])
    samples: Dict[str, List[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            seed_all(0)
            run = _run(rank, world_size, os.path.join(tmp, f"{v}_{r}"))  # a fresh model, same seed
            if world_size > 1:
                dist.barrier()
            if v == "hand":
                stamps = _hand_loop(run, batches, world_size)
            else:
                stamps = _trainer_loop(run, batches, v == "trainer_pipelined", os.path.join(tmp, f"{v}_{r}"))
            samples[v].append(_step_ms(stamps))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(samples, f)


def overhead(world_size: int, steps: int, rounds: int) -> Dict[str, List[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        if world_size == 1:
            _overhead_worker(0, 1, steps, rounds, path)
        else:
            from recis_torchrec.testing.multiprocess import run_ranks

            run_ranks(_overhead_worker, world_size=world_size, args=(steps, rounds, path), timeout=1800)
        with open(path) as f:
            return json.load(f)


def _data_wait_worker(rank: int, world_size: int, steps: int, out_path: str) -> None:
    from recis_torchrec.datasets import write_parquet
    from recis_torchrec.datasets.synthetic import SyntheticClicks, synthetic_schema
    from recis_torchrec.io import ColumnarDataset
    from recis_torchrec.train import Trainer

    tmp = tempfile.mkdtemp(prefix=f"bench_wait_{rank}_")
    results = {}
    for source in ("synthetic stream", "Parquet via ColumnarDataset"):
        run = _run(rank, world_size, os.path.join(tmp, source.split()[0]), **{"trainer.steps": steps})
        data = run.train_data
        if source.startswith("Parquet"):
            stream = run.train_data
            path = os.path.join(os.path.dirname(out_path), "data.parquet")  # shared by the ranks
            if rank == 0:
                syn = SyntheticClicks(stream.config, stream.batch_size, stream_seed=0)
                write_parquet(syn, path, steps * world_size)
            dist.barrier()
            data = ColumnarDataset(path, synthetic_schema(stream.config), stream.batch_size, rank, world_size,
                                   shuffle=True, drop_last=True)
        trainer = Trainer(run.model, run.args, data, tasks=run.tasks, dense_optimizer=run.dense_optimizer,
                          fused_params=run.fused_params, table_options=run.table_options)
        summary = trainer.fit()
        trainer.close()
        results[source] = {"data_wait_fraction": summary["data_wait_fraction"],
                           "examples_per_s": summary["examples_per_s"]}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def data_wait(steps: int) -> Dict[str, Dict[str, float]]:
    from recis_torchrec.testing.multiprocess import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        run_ranks(_data_wait_worker, world_size=2, args=(steps, path), timeout=1800)
        with open(path) as f:
            return json.load(f)


def markdown(results: Dict[str, Any], steps: int, rounds: int) -> str:
    lines = [
        f"Main-job model (DLRM, 8 hash tables x dim 16, batch 512 per rank), {steps} steps x {rounds} rounds, "
        f"mean step after {WARMUP} warm-up steps; ratio to the hand loop in the same rounds",
        "",
        "| ranks | loop | step ms (median of rounds) | ratio to hand loop |",
        "|---:|---|---:|---:|",
    ]
    for ws in ("1", "2"):
        samples = results["overhead"][ws]
        base = statistics.median(samples["hand"])
        for name, s in samples.items():
            lines.append(f"| {ws} | {name} | {statistics.median(s):.2f} | {statistics.median(s) / base:.3f} |")
    lines += ["", "| main job, 2 ranks | data wait | examples/s |", "|---|---:|---:|"]
    for source, r in results["data_wait"].items():
        lines.append(f"| {source} | {100 * r['data_wait_fraction']:.1f}% | {r['examples_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    steps, rounds = (30, 1) if args.quick else (args.steps, args.rounds)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # as each of the 2 ranks gets
    results = {
        "overhead": {"1": overhead(1, steps, rounds), "2": overhead(2, steps, rounds)},
        "data_wait": data_wait(max(steps, 100)),
    }
    print(markdown(results, steps, rounds), flush=True)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out = os.path.join(RESULTS_DIR, f"{stamp}-{socket.gethostname()}-trainer{'-quick' if args.quick else ''}.json")
    with open(out, "w") as f:
        json.dump({"steps": steps, "rounds": rounds, **results}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
