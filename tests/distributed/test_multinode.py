# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Two nodes of two processes each (``torchrun --nnodes 2 --node_rank ...`` with a c10d rendezvous on
localhost) train the main job's model exactly as one node of four processes does."""

import json
import os
import subprocess
import sys

from recis_torchrec.testing.multiprocess import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
ARGS = ["-m", "recis_torchrec.train", "--config", os.path.join(ROOT, "examples", "synthetic_dlrm.toml"),
        "--steps", "24", "--set", "data.batch_size=64", "--set", "trainer.log_every=8", "--set", "trainer.eval_every=0",
        "--set", "trainer.save_every=0", "--set", "data.eval_batches=2", "--set", "trainer.progress=false"]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    train = [(r["step"], r["loss"], r["train_auc"]) for r in recs if "loss" in r]
    return train, recs[-1]["summary"]["eval"]


def test_two_nodes_equal_one_node(tmp_path):
    one = str(tmp_path / "one")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "4", *ARGS, "--output-dir", one],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = str(tmp_path / "two")
    port = free_port()
    nodes = [
        subprocess.Popen(
            [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(node), "--rdzv_backend", "c10d",
             "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "multinode-test", *ARGS, "--output-dir", two],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    outputs = [n.communicate(timeout=600) for n in nodes]
    for n, (out, err) in zip(nodes, outputs):
        assert n.returncode == 0, err[-4000:]
    assert "sharded over 4 ranks" in "".join(o for o, _ in outputs)
    single, multi = records(one), records(two)
    assert [s for s, _, _ in single[0]] == [8, 16, 24]
    assert single == multi, (single, multi)
