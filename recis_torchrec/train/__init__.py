# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The training workflow: ``Trainer``, ``TrainingArguments``, ``Task`` and TOML run configs.

    python -m recis_torchrec.train --config examples/synthetic_dlrm.toml
    torchrun --nproc_per_node 2 -m recis_torchrec.train --config examples/criteo_dlrm.toml
"""

from recis_torchrec.train.args import Task, TrainingArguments
from recis_torchrec.train.config import ConfigError, Run, build_run, load_config
from recis_torchrec.train.trainer import BatchStream, TaskModel, Trainer, init_distributed, seed_all, summary_line

__all__ = [
    "BatchStream",
    "ConfigError",
    "Run",
    "Task",
    "TaskModel",
    "Trainer",
    "TrainingArguments",
    "build_run",
    "init_distributed",
    "load_config",
    "seed_all",
    "summary_line",
]
