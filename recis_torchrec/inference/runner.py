# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The C++ runner, ``recis-serve`` (``csrc/serving/runner.cpp``): serves an inference package
exported with ``aot_inductor=True`` without Python, linking libtorch (AOTInductor's package loader)
and the serving lookup library (``csrc/ops/serving_cpu.cpp``, built as ``librecis_serving.so``; the
Python extension compiles the same source).

    python -m recis_torchrec.inference.runner build   # what setup runs
    recis-serve PACKAGE BATCH [--repeat N]            # see write_batch for BATCH
"""

import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BIN_DIR = os.path.join(HERE, "bin")
BINARY = os.path.join(BIN_DIR, "recis-serve")
LIBRARY = os.path.join(BIN_DIR, "librecis_serving.so")
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")


class RunnerError(RuntimeError):
    """The C++ runner is not built, or failed to build."""


def binary() -> str:
    """The built runner's path; raises if setup has not built it."""
    if not os.path.exists(BINARY):
        raise RunnerError(f"{BINARY} is not built: run `python -m recis_torchrec.inference.runner build` (make setup does)")
    return BINARY


def _flags() -> List[str]:
    from torch.utils import cpp_extension

    flags = ["-std=c++20", "-O3", "-fopenmp", "-fno-math-errno", "-DNDEBUG", "-fPIC",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if os.environ.get("RECIS_PORTABLE", "0") != "1" and platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")  # as the extension is built (setup.py)
    return flags + [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{CSRC}", f"-I{_json_include()}"]


def _json_include() -> str:
    """nlohmann-json's headers, from its pinned PyPI package (found without importing it: its
    ``get_include`` needs ``importlib_resources``)."""
    import importlib.util

    spec = importlib.util.find_spec("nlohmann_json")
    include = os.path.join(spec.submodule_search_locations[0], "include") if spec else ""
    if not os.path.exists(os.path.join(include, "nlohmann", "json.hpp")):
        raise RunnerError("nlohmann-json is not installed (the runner reads JSON with it): "
                          "pip install -r .ci/requirements.txt (make setup does)")
    return include


def build(cxx: Optional[str] = None, verbose: bool = False) -> str:
    """Compiles the lookup library and the runner into ``recis_torchrec/inference/bin``."""
    from torch.utils import cpp_extension

    if not os.path.isdir(os.path.join(CSRC, "serving")):
        raise RunnerError(f"{CSRC}/serving is not here: the runner builds from a source checkout")
    cxx = cxx or os.environ.get("CXX", "g++")
    os.makedirs(BIN_DIR, exist_ok=True)
    torch_lib = cpp_extension.library_paths()[0]
    # DT_RPATH, not RUNPATH: the compiled model the loader dlopens finds libtorch through it too.
    link = [f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", "-Wl,--disable-new-dtags", f"-Wl,-rpath,{torch_lib}",
            "-fopenmp"]
    lib_obj = LIBRARY + ".o"
    run_obj = BINARY + ".o"
    flags = _flags()
    compiles = [
        [cxx, *flags, "-c", os.path.join(CSRC, "ops", "serving_cpu.cpp"), "-o", lib_obj],
        [cxx, *flags, "-c", os.path.join(CSRC, "serving", "runner.cpp"), "-o", run_obj],
    ]

    def run(cmd: List[str]) -> None:
        if verbose:
            print(" ".join(cmd), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RunnerError(f"building the C++ runner failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")

    with ThreadPoolExecutor(2) as pool:  # the two compiles are independent
        list(pool.map(run, compiles))
    run([cxx, "-shared", lib_obj, "-o", LIBRARY, *link])
    run([cxx, run_obj, "-o", BINARY, f"-L{BIN_DIR}", "-lrecis_serving", f"-Wl,-rpath,{BIN_DIR}", *link])
    for obj in (lib_obj, run_obj):
        os.remove(obj)
    return BINARY


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["build"] and argv != ["build", "-v"]:
        print("usage: python -m recis_torchrec.inference.runner build [-v]", file=sys.stderr)
        return 2
    print(build(verbose="-v" in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
