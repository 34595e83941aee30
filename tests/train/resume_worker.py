# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""A torchrun worker for the exact-resume test.

    torchrun ... tests/train/resume_worker.py CONFIG OUTPUT_DIR LOGITS_DIR KILL_AT_STEP [--set K=V ...]

Trains the config through the Trainer, saving every step's logits to
LOGITS_DIR/attempt{A}_rank{R}_step{S}.pt. On the first attempt
(TORCHELASTIC_RESTART_COUNT 0), rank 1 SIGKILLs itself right after step
KILL_AT_STEP (0: never).
"""

import json
import os
import signal
import sys
import tomllib

import torch
import torch.distributed as dist

from recis_torchrec.train import config
from recis_torchrec.train.trainer import Trainer, hash_tables, init_distributed


def main() -> None:
    cfg_path, out, logits_dir, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    overrides = {"trainer.output_dir": out, "trainer.progress": False}
    for item in sys.argv[5:]:
        key, _, value = item.partition("=")
        overrides[key] = tomllib.loads(f"v = {value}")["v"]  # as the CLI's --set reads a value
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    run = config.build_run(config.load_config(cfg_path), rank, world, overrides)

    def record(trainer, step, logits, labels):
        torch.save(logits.clone(), os.path.join(logits_dir, f"attempt{attempt}_rank{rank}_step{step}.pt"))
        if attempt == 0 and kill_at and step == kill_at and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(
        run.model, run.args, run.train_data, run.eval_data, tasks=run.tasks,
        dense_optimizer=run.dense_optimizer, fused_params=run.fused_params,
        table_options=run.table_options, callbacks=[record],
    )
    trainer.fit()
    # Where each table's rows were, for the test to check that the options reached the sharded tables.
    tables = {ref.key: ref.table.info() for ref in hash_tables(trainer.model)}
    with open(os.path.join(logits_dir, f"tables_attempt{attempt}_rank{rank}.json"), "w") as f:
        json.dump(tables, f)
    trainer.close()
    del trainer, run
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
