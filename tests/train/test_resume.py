# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Exact resume: a rank SIGKILLed mid-run, restarted by torchrun --max-restarts,
continues from the last checkpoint with the same logits as an uninterrupted run."""

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "examples", "synthetic_dlrm.toml")
WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")


def _torchrun(out, logits, kill_at, max_restarts, extra=()):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    os.makedirs(logits, exist_ok=True)
    cmd = [
        torchrun, "--standalone", "--nproc_per_node", "2", "--max-restarts", str(max_restarts),
        WORKER, CONFIG, out, logits, str(kill_at),
        "trainer.steps=20", "trainer.save_every=10", "trainer.eval_every=0", "trainer.log_every=5",
        "data.batch_size=128", "data.eval_batches=2",
        # Blocking saves: the step-10 checkpoint is complete before the kill at step 14 (a background
        # save could still be writing then; tests/checkpoint kills background saves on purpose).
        "trainer.async_save=false",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_sigkill_then_torchrun_restart_continues_exactly(tmp_path):
    _torchrun(str(tmp_path / "straight"), str(tmp_path / "straight_logits"), kill_at=0, max_restarts=0)
    _torchrun(str(tmp_path / "killed"), str(tmp_path / "killed_logits"), kill_at=14, max_restarts=1)

    killed = set(os.listdir(tmp_path / "killed_logits"))
    # The first attempt got past step 14 on rank 0 at most; the restart began after the step-10 checkpoint.
    assert "attempt0_rank1_step14.pt" in killed and "attempt0_rank1_step15.pt" not in killed
    assert "attempt1_rank0_step10.pt" not in killed and "attempt1_rank0_step11.pt" in killed
    for rank in (0, 1):
        for step in (11, 12, 13, 20):
            want = torch.load(tmp_path / "straight_logits" / f"attempt0_rank{rank}_step{step}.pt")
            got = torch.load(tmp_path / "killed_logits" / f"attempt1_rank{rank}_step{step}.pt")
            assert torch.equal(got, want), (rank, step, (got - want).abs().max())


def test_tables_on_disk_under_dmp_resume_after_sigkill_as_a_run_in_memory(tmp_path):
    """Each rank's shard keeps its rows on disk behind a small cache (its own files); a rank SIGKILLed
    at step 14 and restarted from the step-10 checkpoint gives the same logits as an uninterrupted
    run whose tables are in memory."""
    rows = tmp_path / "rows"
    rows.mkdir()
    ssd = ['tables.options.storage="ssd"', f'tables.options.storage_path="{rows}"',
           "tables.options.cache_bytes=65536"]  # about 650 rows of D=16 a table: most rows live on disk
    _torchrun(str(tmp_path / "memory"), str(tmp_path / "memory_logits"), kill_at=0, max_restarts=0)
    _torchrun(str(tmp_path / "killed"), str(tmp_path / "killed_logits"), kill_at=14, max_restarts=1, extra=ssd)
    killed = set(os.listdir(tmp_path / "killed_logits"))
    assert "attempt0_rank1_step14.pt" in killed and "attempt1_rank0_step11.pt" in killed
    for rank in (0, 1):
        for step in (5, 11, 20):
            attempt = 0 if step < 11 else 1
            want = torch.load(tmp_path / "memory_logits" / f"attempt0_rank{rank}_step{step}.pt")
            got = torch.load(tmp_path / "killed_logits" / f"attempt{attempt}_rank{rank}_step{step}.pt")
            assert torch.equal(got, want), (rank, step, (got - want).abs().max())
    assert list(rows.iterdir()) == []  # the rows files were unlinked when they were created
    for rank in (0, 1):
        tables = json.load(open(tmp_path / "killed_logits" / f"tables_attempt1_rank{rank}.json"))
        assert tables and all(t["disk_rows"] > 0 and t["disk_bytes_read"] > 0 for t in tables.values()), tables
