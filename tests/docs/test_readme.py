# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Every Python block of the README runs as written, each in a fresh interpreter in an empty directory
(the blocks that call ``dist.init_process_group`` get the environment a one-rank ``torchrun`` gives)."""

import os
import re
import subprocess
import sys

import pytest

from recis_torchrec.testing.multiprocess import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def python_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 8


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    code = python_blocks()[index]
    env = dict(os.environ, PYTHONPATH=ROOT)
    if "init_process_group" in code:  # as under `torchrun --nproc_per_node 1`
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"README block {index}:\n{code}\n{proc.stderr[-4000:]}"
