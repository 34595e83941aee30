# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""C++ baselines the benchmarks time (``benchmarks/csrc``), built here on first use with the system
C++ compiler into ``benchmarks/.build`` and loaded with ctypes: they are not part of the shipped
extension, and need no torch headers (a build takes a second or two)."""

import ctypes
import functools
import os
import subprocess

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(HERE, ".build")


@functools.lru_cache(maxsize=None)
def _library(name: str) -> ctypes.CDLL:
    src = os.path.join(HERE, "csrc", f"{name}.cpp")
    lib = os.path.join(BUILD, f"lib{name}.so")
    if not os.path.exists(lib) or os.path.getmtime(lib) < os.path.getmtime(src):
        os.makedirs(BUILD, exist_ok=True)
        tmp = f"{lib}.{os.getpid()}.tmp"
        cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O3", "-DNDEBUG", "-shared", "-fPIC", src, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {src} failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


def unordered_map(insert_keys: torch.Tensor, find_keys: torch.Tensor) -> torch.Tensor:
    """``std::unordered_map<int64, int64>`` (reserved, one thread) inserts ``insert_keys``, then finds
    ``find_keys``: float64 (insert seconds, find seconds, keys found, checksum)."""
    for name, t in (("insert_keys", insert_keys), ("find_keys", find_keys)):
        if t.dtype != torch.int64 or t.dim() != 1 or t.device.type != "cpu":
            raise ValueError(f"unordered_map: {name} must be a 1-D int64 CPU tensor, got {t.dtype} {tuple(t.shape)} "
                             f"on {t.device}")
    ins, fnd = insert_keys.contiguous(), find_keys.contiguous()
    out = torch.zeros(4, dtype=torch.float64)
    ptr = ctypes.POINTER(ctypes.c_int64)
    f = _library("unordered_map").recis_bench_unordered_map
    f.restype = None
    f(ctypes.cast(ins.data_ptr(), ptr), ctypes.c_int64(ins.numel()), ctypes.cast(fnd.data_ptr(), ptr),
      ctypes.c_int64(fnd.numel()), ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_double)))
    return out
