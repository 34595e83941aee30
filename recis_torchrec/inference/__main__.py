# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Inference packages from the command line.

    python -m recis_torchrec.inference export CKPT OUT [--quantize int8] [--unseen init|zero] [--config C]
        [--aot-inductor]
    python -m recis_torchrec.inference predict OUT data.parquet [--output preds.parquet] [--batch-size 512]
    python -m recis_torchrec.inference info OUT

``export`` rebuilds the model from the config the training run stored in its checkpoints (or
``--config``), loads the checkpoint (any world size) and writes the package; ``predict`` reads
files with the training run's data schema and writes one ``prediction`` per row (a probability)
as Parquet; ``info`` prints the manifest and the tables' memory.
"""

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from recis_torchrec.inference.package import InferenceError, export, load, read_manifest


def _run_from(config: Dict[str, Any], overrides: Dict[str, Any], tmp: str):
    from recis_torchrec.train import config as config_mod

    overrides = dict(overrides, **{"trainer.output_dir": tmp})
    return config_mod.build_run(config, overrides=overrides)


def _model_of(run) -> Tuple[torch.nn.Module, bool]:
    """The run's model with hash tables (as the single-process Trainer builds it) and whether it
    returns probabilities."""
    import recis_torchrec as rt
    from recis_torchrec.train.trainer import TaskModel, drop_table_weights, outputs_probabilities

    probabilities = outputs_probabilities(run.model, run.args.model_output)
    task_model = TaskModel(run.model, run.tasks, run.args.bf16, probabilities)
    if not run.args.import_weights:
        drop_table_weights(task_model)
    rt.convert(task_model, fused_params=run.fused_params, options=run.table_options,
               import_weights=run.args.import_weights, share_tables=run.args.share_tables)
    return task_model, probabilities


def cmd_export(args) -> int:
    from recis_torchrec import checkpoint
    from recis_torchrec.checkpoint.files import read_index
    from recis_torchrec.train import config as config_mod

    directory = checkpoint.resolve(args.checkpoint)
    extra = read_index(directory).get("extra") or {}
    if args.config is not None:
        config, overrides = config_mod.load_config(args.config), {}
    elif "config" in extra:
        config, overrides = extra["config"], extra.get("overrides") or {}
    else:
        raise InferenceError(f"{directory}: the checkpoint carries no training config; pass --config")
    with tempfile.TemporaryDirectory() as tmp:
        run = _run_from(config, overrides, tmp)
        task_model, probabilities = _model_of(run)
        checkpoint.load(directory, task_model)
        data = run.eval_data if run.eval_data is not None else run.train_data
        if isinstance(data, list):  # an online-learning run: its windows' datasets, the newest last
            data = data[-1]
        batch = next(iter(data))
        example = (batch.dense_features, batch.sparse_features)
        metadata = {"config": config, "overrides": overrides, "output": "probabilities" if probabilities else "logits"}
        schema = getattr(data, "declared_schema", None)
        if schema is not None:  # with the statistics taken from the training files: predict needs no training file
            metadata["schema"] = schema.to_dict()
        export(task_model.model, args.output, example, quantize=args.quantize, unseen=args.unseen, metadata=metadata,
               aot_inductor=args.aot_inductor)
    print(f"wrote {args.output} ({args.quantize}{', with an AOTInductor program' if args.aot_inductor else ''}) "
          f"from {directory}")
    return 0


def cmd_predict(args) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recis_torchrec.train import config as config_mod
    from recis_torchrec.train.config import ConfigError

    predictor = load(args.package)
    meta = predictor.manifest.get("metadata") or {}
    if "config" not in meta:
        raise InferenceError(f"{args.package}: the package carries no data schema (exported from Python without "
                             "metadata={'config': ...}); predict from Python with inference.load")
    # The data section as trained (the config with its overrides).
    data_cfg = config_mod.apply_overrides(meta["config"], meta.get("overrides") or {}).get("data") or {}
    if config_mod.data_source(data_cfg) == "synthetic":
        raise InferenceError(f"{args.package}: the model was trained on generated data ([data].source = 'synthetic'), "
                             "which has no file schema for predict to read files with; predict from Python with "
                             "inference.load, or train on files")
    overrides = dict(meta.get("overrides") or {})
    # The files to predict as the held-out data: read once, in order, the last partial batch kept.
    # A package from before the schema was stored rebuilds it from the training files (their
    # statistics, such as a dense column's standardisation).
    paths = [p for p in args.data.split(",") if p]
    if not paths:
        raise InferenceError("predict: no data files given")
    for path in paths:
        if not os.path.exists(path):
            raise InferenceError(f"{path}: no such file")
    if args.batch_size <= 0:
        raise InferenceError(f"--batch-size must be > 0, got {args.batch_size}")
    overrides.update({"data.eval": paths, "data.batch_size": args.batch_size})
    if "schema" in meta and config_mod.data_source(data_cfg) == "files":
        # The schema as trained, its statistics included: the files to predict stand in for the
        # training files, which need not exist any more.
        data_cfg = {k: v for k, v in data_cfg.items() if k not in ("train", "windows", "eval", "schema")}
        overrides["data"] = dict(data_cfg, train=paths, eval=paths, schema=meta["schema"],
                                 batch_size=args.batch_size)
    out: List[torch.Tensor] = []
    rows, t0 = 0, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run = _run_from(meta["config"], overrides, tmp)
        except ConfigError as e:  # the flag, not the config key it sets
            raise ConfigError(str(e).replace("config [data].batch_size", f"--batch-size {args.batch_size}")) from None
        for batch in run.eval_data:
            pred = predictor(batch.dense_features, batch.sparse_features).float().reshape(batch.labels.shape[0], -1)
            out.append(pred if meta.get("output") == "probabilities" else torch.sigmoid(pred))
            rows += pred.shape[0]
            if args.progress:
                rate = rows / max(time.perf_counter() - t0, 1e-9)
                print(f"\rpredicted {rows:,} rows ({rate:,.0f} rows/s)", end="", file=sys.stderr, flush=True)
    if args.progress:
        print(file=sys.stderr)
    preds = torch.cat(out) if out else torch.empty(0, 1)
    columns = {"prediction" if preds.shape[1] == 1 else f"prediction_{k}": pa.array(preds[:, k].numpy())
               for k in range(preds.shape[1])}
    output = args.output or os.path.splitext(paths[0])[0] + ".predictions.parquet"
    pq.write_table(pa.table(columns), output)
    print(f"wrote {rows:,} predictions to {output}")
    return 0


def cmd_info(args) -> int:
    manifest = read_manifest(args.package)
    predictor = load(args.package)
    print(f"{args.package}: format {manifest['format']}, quantization {manifest['quantization']}, unseen ids read "
          f"{'their initial rows' if manifest['unseen'] == 'init' else 'zeros'}")
    print(f"  versions: {manifest['versions']}; deltas applied since export: none (a package is read-only)")
    print(f"  features: {manifest['features']}")
    for key, t in predictor.tables.items():
        n = len(t)
        print(f"  table {key}: {n:,} ids x dim {t.dim}, {t.nbytes:,} bytes ({t.nbytes / max(n, 1):.1f} B/id)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recis_torchrec.inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a training checkpoint -> an inference package")
    e.add_argument("checkpoint", help="a checkpoint directory or a root of them (the newest complete one)")
    e.add_argument("output")
    e.add_argument("--quantize", default="fp32", choices=["fp32", "fp16", "bf16", "int8"])
    e.add_argument("--unseen", default="init", choices=["init", "zero"])
    e.add_argument("--config", default=None, help="the training config (default: the one the checkpoint carries)")
    e.add_argument("--aot-inductor", action="store_true",
                   help="also compile the dense part with AOTInductor, for recis-serve (C++) and --dense aoti")
    r = sub.add_parser("predict", help="predictions for a data file, written as Parquet")
    r.add_argument("package")
    r.add_argument("data", help="the files to predict (comma-separated; predictions in their order)")
    r.add_argument("--output", default=None)
    r.add_argument("--batch-size", type=int, default=512)
    r.add_argument("--no-progress", dest="progress", action="store_false")
    i = sub.add_parser("info", help="what a package holds")
    i.add_argument("package")
    args = p.parse_args(argv)
    from recis_torchrec.checkpoint import CheckpointError
    from recis_torchrec.train.config import ConfigError

    try:
        return {"export": cmd_export, "predict": cmd_predict, "info": cmd_info}[args.command](args)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
