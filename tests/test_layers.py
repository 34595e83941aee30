# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The package's layers (pyproject.toml's import-linter contract): they hold, and an import the
wrong way (a low layer importing a higher one) breaks the check."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint(cwd):
    return subprocess.run([LINT, "--config", os.path.join(cwd, "pyproject.toml"), "--no-cache"], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=cwd), capture_output=True, text=True, timeout=300)


def test_the_layers_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_an_import_the_wrong_way_breaks_the_layers(tmp_path):
    shutil.copytree(os.path.join(ROOT, "recis_torchrec"), tmp_path / "recis_torchrec",
                    ignore=shutil.ignore_patterns("*.so", "bin", "__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    with open(tmp_path / "recis_torchrec" / "ops" / "hashtable.py", "a") as f:
        f.write("\nfrom recis_torchrec.modules.kjt import checked_kjt  # noqa\n")
    done = lint(str(tmp_path))
    assert done.returncode != 0
    assert "recis_torchrec.ops.hashtable -> recis_torchrec.modules.kjt" in done.stdout, done.stdout


def test_the_shipped_extension_holds_no_benchmark_code():
    """Benchmark baselines (``benchmarks/csrc``) are built by the benchmarks, not into ``recis_torchrec._C``."""
    import torch

    from recis_torchrec._ext import C

    with open(C.__file__, "rb") as f:
        assert b"recis_bench" not in f.read()
    assert not hasattr(torch.ops.recis_bench, "unordered_map")
