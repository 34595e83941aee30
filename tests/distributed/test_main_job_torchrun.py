# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The main job under real torchrun: DLRM sharded over 2 ranks with our sharder."""

import os
import subprocess
import sys


def test_torchrun_two_ranks_trains_dlrm():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "recis_torchrec.examples.train_dlrm",
        "--steps",
        "80",
        "--batch-size",
        "256",
        "--log-every",
        "40",
        "--eval-batches",
        "4",
    ]
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded over 2 ranks" in proc.stdout
    assert "final      eval log loss" in proc.stdout
