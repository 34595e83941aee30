# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Builds the recis_torchrec._C extension.

Build without isolation, against the installed torch:
    pip install --no-build-isolation --no-deps -e .
Set RECIS_PORTABLE=1 to build without -march=native (for a binary that must
run on another CPU model). Set RECIS_CUDA=1 to also build the CUDA kernels
(csrc/features/*.cu) and register the ops' CUDA dispatch; it needs nvcc and a
CUDA build of torch.
"""

import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cxx_flags():
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-DNDEBUG", "-Wall", "-Wno-unused-function"]
    if os.environ.get("RECIS_PORTABLE", "0") != "1" and platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    return flags


sources = sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")))
WITH_CUDA = os.environ.get("RECIS_CUDA", "0") == "1"
if WITH_CUDA:
    sources += sorted(glob.glob(os.path.join("csrc", "features", "*.cu")))
    sources += [os.path.join("csrc", "features", "features_cuda_ops.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    sources += [os.path.join("csrc", "cuda", "gpu_table_ops.cpp")]
Extension = CUDAExtension if WITH_CUDA else CppExtension
compile_args = {"cxx": _cxx_flags()}
if WITH_CUDA:
    # -fmad=false: no fused multiply-adds, so a GPU table's initial rows equal the CPU's bit for bit.
    compile_args["nvcc"] = ["-O3", "-DNDEBUG", "-fmad=false"]

setup(
    packages=find_packages(include=["recis_torchrec", "recis_torchrec.*"]),
    ext_modules=[
        Extension(
            name="recis_torchrec._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
