# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Train a TorchRec model on hash tables from a TOML config.

    python -m recis_torchrec.train --config examples/synthetic_dlrm.toml
    torchrun --standalone --nproc_per_node 2 -m recis_torchrec.train --config examples/synthetic_dlrm.toml
    torchrun --standalone --nproc_per_node 2 -m recis_torchrec.train --config examples/synthetic_dlrm.toml \\
        --data train.tsv --eval-data dev.tsv,test.tsv          # the same job on Criteo files

Under torchrun (WORLD_SIZE > 1) the model is wrapped in TorchRec's
DistributedModelParallel with recis_torchrec's sharders over gloo and trained
with TrainPipelineSparseDist; alone, its EmbeddingBagCollections are converted
to hash tables and trained with a plain loop. A run resumes from the newest
checkpoint in its output_dir (also after torchrun --max-restarts restarts it).

The config (TOML) has these sections; every error names the key it is about.
"""

import argparse
import gc
import json
import sys
from typing import List, Optional

from recis_torchrec.train import config as config_mod


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recis_torchrec.train",
        description=__doc__ + config_mod.__doc__.split("::", 1)[1].split("Every error")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="the run's TOML config (see examples/)")
    p.add_argument(
        "--data",
        default=None,
        help="train on these files: in place of the training files of a config with [data].source = 'files' "
        "(its schema reads them), else as Criteo files (raw TSV, Parquet, ORC or CSV); a comma-separated list, "
        "a directory or a glob",
    )
    p.add_argument("--eval-data", default=None, help="with --data: the held-out files (comma-separated)")
    p.add_argument("--output-dir", default=None, help="overrides [trainer].output_dir")
    p.add_argument("--steps", type=int, default=None, help="overrides [trainer].steps")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even where the config differs from the checkpoint's in what shapes the model or its "
        "training (by default only data files, batching, learning rates and [trainer] may change)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="overrides one config value; VALUE is read as TOML (repeatable)",
    )
    return p.parse_args(argv)


def overrides_from(args: argparse.Namespace, cfg: Optional[dict] = None) -> dict:
    """The command line's overrides of the config, as ``{"section.key": value}``.

    ``--data`` replaces the training files of a ``source = "files"`` config
    (keeping its schema, format and the rest), and the whole ``[data]`` section
    of other configs (keeping its batch_size and shuffle) with Criteo files.
    """
    import tomllib

    out = {}
    if args.data is not None:
        paths = [p for p in args.data.split(",") if p]
        if not paths:
            raise config_mod.ConfigError("--data: no files given")
        old = (cfg or {}).get("data", {})
        if config_mod.data_source(old) == "files":
            # the config's own files: keep its schema, format and the rest (a [data.schema] without
            # `source = "files"` was replaced by Criteo's layout without a word)
            data = {k: v for k, v in old.items() if k not in ("train", "windows", "eval")}
            data.update(source="files", train=paths if len(paths) > 1 else paths[0])
        else:
            data = {k: old[k] for k in ("batch_size", "shuffle") if k in old}
            data.update(source="files", schema="criteo", train=paths if len(paths) > 1 else paths[0])
        if args.eval_data:
            evals = [p for p in args.eval_data.split(",") if p]
            data["eval"] = evals if len(evals) > 1 else evals[0]
        out["data"] = data
    elif args.eval_data is not None:
        raise config_mod.ConfigError("--eval-data needs --data")
    if args.output_dir is not None:
        out["trainer.output_dir"] = args.output_dir
    if args.steps is not None:
        out["trainer.steps"] = args.steps
        out["trainer.epochs"] = None
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise config_mod.ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw  # a bare string
    return out


def check_resume_config(cfg: dict, overrides: dict, output_dir: str, allow: bool, rank: int) -> None:
    """Compares the run's config with the one stored in the checkpoint it would resume from: a
    difference in what shapes the model or its training (features and their order, dims, tables,
    model and its sizes, optimizers, tasks) is refused, naming every difference; the others (data
    files, batching, learning rates, [trainer]) are reported."""
    import os

    from recis_torchrec import checkpoint
    from recis_torchrec.checkpoint.files import read_index

    root = os.path.join(output_dir, "checkpoints")
    if not checkpoint.checkpoints(root):
        return
    directory = checkpoint.resolve(root)
    extra = read_index(directory).get("extra") or {}
    if "config" not in extra:
        return
    old = config_mod.apply_overrides(extra["config"], extra.get("overrides") or {})
    shaping, safe = config_mod.config_changes(old, config_mod.apply_overrides(cfg, overrides))
    if shaping and not allow:
        raise config_mod.ConfigError(
            f"the run would resume from {directory}, whose config differs in what shapes the model or its training:\n  "
            + "\n  ".join(shaping)
            + "\ntrain into a new output directory, set trainer.resume=false to start over there, or pass "
            "--allow-config-change to resume anyway")
    if (shaping or safe) and rank == 0:
        print(f"resuming from {directory} with changed settings: {'; '.join(shaping + safe)}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist

    from recis_torchrec.train.trainer import Trainer, backend_for, init_distributed, resolve_device

    try:
        cfg = config_mod.load_config(args.config)
        overrides = overrides_from(args, cfg)
        choice = overrides.get("trainer.device", cfg.get("trainer", {}).get("device", "auto"))
        try:
            device = resolve_device(choice)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            raise config_mod.ConfigError(f"config [trainer].device = {choice!r}: {e}") from None
        init_distributed(backend_for(device), device)
        rank = dist.get_rank() if dist.is_initialized() else 0
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        run = config_mod.build_run(cfg, rank, world_size, overrides)
        if run.args.resume:
            check_resume_config(cfg, overrides, run.args.output_dir, args.allow_config_change, rank)
        if rank == 0:
            mode = (f"sharded over {world_size} ranks ({backend_for(device)}, {device.type})" if world_size > 1
                    else f"unsharded ({device.type})")
            shown = run.model.model if isinstance(run.model, config_mod.ConstantDense) else run.model
            name = type(shown).__name__
            print(f"{name} on {run.description}, {mode}, tasks "
                  f"{[t.name for t in run.tasks]}, output {run.args.output_dir}", flush=True)
        trainer = Trainer(
            run.model,
            run.args,
            run.train_data,
            run.eval_data,
            tasks=run.tasks,
            dense_optimizer=run.dense_optimizer,
            fused_params=run.fused_params,
            table_options=run.table_options,
        )
        try:
            trainer.checkpoint_extra = json.loads(json.dumps({"config": cfg, "overrides": overrides}))
        except (TypeError, ValueError):  # a TOML date, say: checkpoints then carry no config
            trainer.checkpoint_extra = None
        if run.windows is not None:
            trainer.fit_windows(run.train_data, names=run.windows)
        else:
            trainer.fit()
        trainer.close()
        del trainer, run  # freed now, while the process group is alive (see Trainer.close)
        gc.collect()
        if dist.is_initialized():
            # Every rank is done with its collectives before any tears the group down: a rank
            # destroying its gloo pairs while a peer still reads them makes the peer fail.
            dist.barrier()
    except config_mod.ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
