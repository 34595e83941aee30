# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Inference packages against TorchRec's quantized path, in one process:

- throughput: a DLRM served by ``inference.load`` (INT8 package) against the same model with
  TorchRec's ``quantize_embeddings`` (INT8, FBGEMM's quantized TBE), batch 512, the same rows and
  bounded ids, interleaved rounds;
- bytes per id of the served tables per quantization, against the FP32 training table (row-wise
  Adagrad) and TorchRec's quantized EBC holding the same rows;
- AUC of the INT8 and FP32 packages of a model trained on the main job's synthetic data, on its
  eval set;
- checks: what export's read-back of the package and a request's checks cost.

    python -m benchmarks.bench_inference [--rows 100000] [--tables 8] [--dim 64]
"""

import argparse
import copy
import itertools
import statistics
import tempfile
import time
from typing import List, Optional

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM

import recis_torchrec as rt
from recis_torchrec import inference


def _quant_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def dlrm_pair(args):
    """A TorchRec DLRM (``args.tables`` tables of ``args.rows`` x ``args.dim``), the same model with our
    hash tables holding the same rows, both in eval mode, and ``batch(b)``: a request of b samples,
    ``args.pooling`` ids per feature, uniform over the rows."""
    torch.manual_seed(0)
    keys = [f"f{i}" for i in range(args.tables)]
    cfg = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=args.rows, feature_names=[k])
           for i, k in enumerate(keys)]
    theirs = DLRM(EmbeddingBagCollection(cfg), 13, [128, args.dim], [128, 64, 1])
    ours = copy.deepcopy(theirs)
    rt.convert(ours, fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01},
               import_weights=True)  # the same rows, now in hash tables
    theirs.eval()
    ours.eval()
    g = torch.Generator().manual_seed(1)

    def batch(b):
        lengths = torch.full((len(keys) * b,), args.pooling, dtype=torch.int64)
        return torch.rand(b, 13, generator=g), KeyedJaggedTensor(
            keys=keys, values=torch.randint(0, args.rows, (int(lengths.sum()),), generator=g), lengths=lengths)

    return ours, theirs, batch


def throughput(args) -> None:
    ours, theirs, batch = dlrm_pair(args)
    from torchrec.inference.modules import quantize_embeddings

    quantized = quantize_embeddings(copy.deepcopy(theirs), dtype=torch.qint8, inplace=True)

    with tempfile.TemporaryDirectory() as tmp:
        package = inference.export(ours, tmp + "/p", batch(8), quantize="int8", aot_inductor=True)
        predictor = inference.load(package)
        compiled = inference.load(package, dense="aoti")
        reqs = [batch(args.batch) for _ in range(8)]
        with torch.no_grad():
            err = max(float((predictor(*r) - quantized(*r)).abs().max()) for r in reqs[:2])
            rounds = {"ours": [], "aoti": [], "torchrec": []}
            for _ in range(args.rounds):
                for name, fn in (("ours", predictor), ("aoti", compiled), ("torchrec", quantized)):
                    t0 = time.perf_counter()
                    for r in reqs:
                        fn(*r)
                    rounds[name].append(len(reqs) * args.batch / (time.perf_counter() - t0))
        ours_rps, theirs_rps = statistics.median(rounds["ours"]), statistics.median(rounds["torchrec"])
        aoti_rps = statistics.median(rounds["aoti"])
        print(f"DLRM, {args.tables} tables x {args.rows:,} rows x dim {args.dim}, batch {args.batch} x {args.pooling} "
              f"ids per feature (uniform over the rows); {args.rounds} interleaved rounds of {len(reqs)} requests")
        print(f"  predictions/s: ours (INT8 package) {ours_rps:,.0f}, TorchRec quantize_embeddings (INT8) "
              f"{theirs_rps:,.0f}: ratio {ours_rps / theirs_rps:.2f}; largest |difference| {err:.2e}")
        print(f"  predictions/s with the AOTInductor-compiled dense part (load(dense='aoti')): {aoti_rps:,.0f} = "
              f"{aoti_rps / ours_rps:.2f}x the exported program's, {aoti_rps / theirs_rps:.2f}x TorchRec's")
        cpp_runner(package, reqs, compiled, args)
        # Bytes per id, each format, against the training table and TorchRec's quantized EBC.
        train_table = ours.sparse_arch.embedding_bag_collection.tables()["t0"]
        train_bytes = train_table.info()["memory_bytes"] / len(train_table)
        quant_ebc = quantized.sparse_arch.embedding_bag_collection
        tr_bytes = _quant_bytes(quant_ebc) / (args.rows * args.tables)
        print(f"  bytes per id (dim {args.dim}): FP32 training table (row-wise Adagrad) {train_bytes:.1f}; "
              f"TorchRec quantized EBC (INT8) {tr_bytes:.1f}")
        for q in ("fp32", "fp16", "bf16", "int8"):
            p = inference.load(inference.export(ours, f"{tmp}/{q}", batch(8), quantize=q))
            t = p.tables["sparse_arch.embedding_bag_collection/t0"]
            b = t.nbytes / len(t)
            print(f"    served {q}: {b:.1f} B/id = {b / train_bytes:.2f}x the training table, "
                  f"{b / tr_bytes:.2f}x TorchRec's INT8 EBC")


def cpp_runner(package: str, reqs, compiled, args) -> None:
    """The C++ runner against the Python predictor (both with the AOTInductor dense part) on the same
    batches, in interleaved rounds: each round serves every batch `repeat` times in each; the runner's
    time excludes its start (loading the package)."""
    import re
    import subprocess

    from recis_torchrec.inference import runner

    repeat = 10
    with tempfile.TemporaryDirectory() as tmp:
        files = [inference.write_batch(f"{tmp}/b{i}.safetensors", *r) for i, r in enumerate(reqs)]
        py, cpp = [], []
        for _ in range(args.rounds):
            with torch.no_grad():
                t0 = time.perf_counter()
                for r in reqs:
                    for _ in range(repeat):
                        compiled(*r)
                py.append(len(reqs) * repeat * args.batch / (time.perf_counter() - t0))
            seconds = 0.0
            for f in files:
                done = subprocess.run([runner.binary(), package, f, "--repeat", str(repeat)], capture_output=True,
                                      text=True, check=True)
                seconds += float(re.search(r"in ([0-9.]+) s", done.stderr).group(1))
            cpp.append(len(reqs) * repeat * args.batch / seconds)
        first = subprocess.run([runner.binary(), package, files[0]], capture_output=True, text=True, check=True)
        printed = torch.tensor([float(x) for line in first.stdout.splitlines()[1:] for x in line.split()])
        same = torch.equal(printed, compiled(*reqs[0]).reshape(-1).double().float())
    py_rps, cpp_rps = statistics.median(py), statistics.median(cpp)
    print(f"  C++ runner (recis-serve, same package and batches): {cpp_rps:,.0f} predictions/s against the Python "
          f"predictor's {py_rps:,.0f} (dense='aoti'): ratio {cpp_rps / py_rps:.2f}; predictions equal: {same}")


def auc(args) -> None:
    from torchmetrics.classification import BinaryAUROC

    from recis_torchrec.inference.__main__ import _run_from
    from recis_torchrec.train import config as config_mod
    from recis_torchrec.train.trainer import Trainer

    cfg = config_mod.load_config("examples/synthetic_dlrm.toml")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"trainer.steps": args.train_steps, "trainer.epochs": None, "trainer.progress": False,
                     "trainer.save_every": 0, "trainer.eval_every": 0}
        run = _run_from(cfg, overrides, tmp + "/run")
        trainer = Trainer(run.model, run.args, run.train_data, run.eval_data, tasks=run.tasks,
                          dense_optimizer=run.dense_optimizer, fused_params=run.fused_params,
                          table_options=run.table_options)
        trainer.fit()
        model = trainer.model.model
        model.eval()
        batches = list(itertools.islice(iter(run.eval_data), run.args.eval_batches or 50))  # a synthetic stream is endless
        example = (batches[0].dense_features, batches[0].sparse_features)
        scores = {}
        for q in ("fp32", "int8"):
            p = inference.load(inference.export(model, f"{tmp}/{q}", example, quantize=q))
            metric = BinaryAUROC()
            for b in batches:
                metric.update(torch.sigmoid(p(b.dense_features, b.sparse_features).reshape(-1)), b.labels.reshape(-1).long())
            scores[q] = float(metric.compute())
        trainer.close()
    print(f"main job's synthetic data, {args.train_steps} training steps, eval set of {len(batches)} batches: "
          f"AUC FP32 package {scores['fp32']:.4f}, INT8 package {scores['int8']:.4f} "
          f"(difference {scores['int8'] - scores['fp32']:+.4f})")


def checks(args) -> None:
    """What the checks against silent results cost: export's read-back of the written package (the
    example batch through it and the eval model) and a request's checks against the manifest's request
    spec (features, lengths, dense dtypes, shapes and batch sizes), each against the same call without
    it, interleaved."""
    from recis_torchrec.inference import package as pkg

    torch.manual_seed(0)
    keys = [f"f{i}" for i in range(args.tables)]
    cfg = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=args.rows, feature_names=[k])
           for i, k in enumerate(keys)]
    model = DLRM(EmbeddingBagCollection(cfg), 13, [128, args.dim], [128, 64, 1])
    rt.convert(model, fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01},
               import_weights=True)
    model.eval()
    g = torch.Generator().manual_seed(1)

    def batch(b):
        lengths = torch.full((len(keys) * b,), args.pooling, dtype=torch.int64)
        return torch.rand(b, 13, generator=g), KeyedJaggedTensor(
            keys=keys, values=torch.randint(0, args.rows, (int(lengths.sum()),), generator=g), lengths=lengths)

    real = pkg._check_package
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for r, on in itertools.product(range(args.rounds), (True, False)):
                pkg._check_package = real if on else (lambda *a, **k: None)
                t0 = time.perf_counter()
                package = inference.export(model, f"{tmp}/p{r}{on}", batch(8))
                times[on].append(time.perf_counter() - t0)
        finally:
            pkg._check_package = real
        with_, without = statistics.median(times[True]), statistics.median(times[False])
        print(f"export ({args.tables} x {args.rows:,} rows x D={args.dim}, fp32): {with_ * 1e3:.0f} ms with the "
              f"read-back check, {without * 1e3:.0f} ms without ({with_ / without:.2f}x)")
        predictor = inference.load(package)
        spec = predictor.manifest["request"]
        req = batch(args.batch)
        lat = {True: [], False: []}
        for _, on in itertools.product(range(50 * args.rounds), (True, False)):
            predictor.manifest["request"] = spec if on else None
            t0 = time.perf_counter()
            predictor(*req)
            lat[on].append(time.perf_counter() - t0)
        predictor.manifest["request"] = spec
    a, b = statistics.median(lat[True]), statistics.median(lat[False])
    print(f"request of {args.batch} rows: {a * 1e3:.3f} ms with the request checks, {b * 1e3:.3f} ms without "
          f"({a / b:.3f}x), {torch.get_num_threads()} threads")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--pooling", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--only", choices=["throughput", "auc", "checks"], default=None)
    args = p.parse_args(argv)
    if args.only in (None, "throughput"):
        throughput(args)
    if args.only in (None, "auc"):
        auc(args)
    if args.only in (None, "checks"):
        checks(args)


if __name__ == "__main__":
    main()
