# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The CUDA feature kernels: they compile wherever nvcc is (CI); with a GPU, they match the CPU ops."""

import os
import shutil
import subprocess

import pytest
import torch

from recis_torchrec import ops

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_cuda_kernels_compile(tmp_path):
    cmd = [NVCC, "-std=c++17", "-O2", "-c", os.path.join(ROOT, "csrc", "features", "features_cuda.cu"),
           "-I", os.path.join(ROOT, "csrc"), "-o", str(tmp_path / "features_cuda.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc (and the CUDA headers) are not installed")
def test_cuda_op_registration_compiles():
    from torch.utils.cpp_extension import include_paths

    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))]
    found = [os.path.join(h, "include") for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_runtime_api.h"))]
    if not found:
        pytest.skip("the CUDA runtime headers are not found (set CUDA_HOME)")
    cuda_include = found[0]
    cmd = ["g++", "-std=c++20", "-fsyntax-only", *[f"-I{p}" for p in include_paths()], f"-I{cuda_include}",
           f"-I{os.path.join(ROOT, 'csrc')}", os.path.join(ROOT, "csrc", "features", "features_cuda_ops.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _has_cuda_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        ops.feature_mod(torch.tensor([1], device="cuda"), torch.tensor([1], device="cuda"), None, 1, [0], [2])
        return True
    except NotImplementedError:
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda_kernels(), reason="needs a GPU and an extension built with RECIS_CUDA=1")
def test_cuda_ops_match_cpu():
    g = torch.Generator().manual_seed(0)
    F, B = 3, 64
    lengths = torch.randint(0, 5, (F * B,), generator=g)
    values = torch.randint(-(2**62), 2**62, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g)
    dense = torch.randn(B, 4, generator=g)
    dense[3, 1] = float("nan")
    cases = [
        ("feature_hash", (values, lengths, weights, F, [2, 0], [5, 0], [0, 1000])),
        ("feature_mod", (values, lengths, None, F, [1], [97])),
        ("feature_multi_hash", (values, lengths, weights, F, [0, 2], [1, 2], [0, 0], 3)),
        ("feature_truncate", (values, lengths, weights, F, [0, 1], [2, 1], [0, 1])),
        ("feature_cross", (values, lengths, weights, F, [0, 1], [2, 2], [3, 4], [0, 2**20])),
    ]
    for name, args in cases:
        cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        want, got = getattr(ops, name)(*args), getattr(ops, name)(*cuda_args)
        for w, x in zip(want, got):
            assert (w is None) == (x is None), name
            if w is not None:
                assert torch.equal(w, x.cpu()), name
    bounds = torch.tensor([-1.0, 0.0, 0.0, 1.0, 0.5])
    want = ops.feature_bucketize(dense, [1, 3], bounds, [0, 4, 5])
    got = ops.feature_bucketize(dense.cuda(), [1, 3], bounds, [0, 4, 5])
    assert all(torch.equal(w, x.cpu()) for w, x in zip(want, got))
