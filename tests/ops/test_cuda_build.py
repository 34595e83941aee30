# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The CUDA tables (csrc/cuda/) compile wherever nvcc is, and without them a CUDA table says how to
get them. What the CUDA code computes is tested where each subject is, on every device
(tests/devices.py); those cases run where a GPU and a ``RECIS_CUDA=1`` build are:

    RECIS_CUDA=1 .venv/bin/pip install --no-build-isolation --no-deps -e . && .venv/bin/python -m pytest tests
"""

import os
import shutil
import subprocess

import pytest
from torchrec import EmbeddingBagConfig

import recis_torchrec as rt
from tests.devices import HAS_CUDA_TABLES

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", [None, "sm_90"])
def test_gpu_table_compiles(tmp_path, arch):
    cmd = [NVCC, "-std=c++17", "-O2", "-fmad=false", "-c", os.path.join(ROOT, "csrc", "cuda", "gpu_table.cu"),
           "-I", os.path.join(ROOT, "csrc"), "-o", str(tmp_path / "gpu_table.o")]
    if arch:
        cmd += [f"-arch={arch}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc (and the CUDA headers) are not installed")
def test_gpu_table_op_registration_compiles():
    from torch.utils.cpp_extension import include_paths

    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))]
    found = [os.path.join(h, "include") for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_runtime_api.h"))]
    if not found:
        pytest.skip("the CUDA runtime headers are not found (set CUDA_HOME)")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", *[f"-I{p}" for p in include_paths()], f"-I{found[0]}",
           f"-I{os.path.join(ROOT, 'csrc')}", os.path.join(ROOT, "csrc", "cuda", "gpu_table_ops.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_without_cuda_tables_the_error_says_how_to_get_them():
    if HAS_CUDA_TABLES:
        pytest.skip("this build has CUDA tables")
    with pytest.raises((NotImplementedError, RuntimeError), match="RECIS_CUDA=1|needs a GPU|need a GPU"):
        rt.HashEmbeddingBagCollection(
            [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])], device="cuda"
        )
