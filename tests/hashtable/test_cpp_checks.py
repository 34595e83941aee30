# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The torch-free C++ core on its own, compiled with g++: the IdMap against std::unordered_map, built
with and without AVX2 so that both bucket compares are checked (the extension is built with
-march=native, so the tests through torch only reach one of them); the portable float16 conversions
against F16C; a custom eviction policy; the disk tier's store against a map of records."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CXX = shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
@pytest.mark.parametrize("isa", ["-mavx2", "-mno-avx2"])
def test_id_map_matches_unordered_map(tmp_path, isa):
    exe = str(tmp_path / "id_map_check")
    src = os.path.join(ROOT, "tests", "hashtable", "cpp", "id_map_check.cc")
    build = subprocess.run(
        [CXX, "-std=c++17", "-O2", isa, "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc", "hashtable"), src, "-o", exe],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def _has_f16c() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " f16c" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(CXX is None or not _has_f16c(), reason="needs g++ and a CPU with F16C")
def test_portable_half_conversions_match_f16c(tmp_path):
    exe = str(tmp_path / "row_types_check")
    src = os.path.join(ROOT, "tests", "hashtable", "cpp", "row_types_check.cc")
    build = subprocess.run(
        [CXX, "-std=c++17", "-O2", "-mf16c", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc", "hashtable"), src,
         "-o", exe],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
def test_a_custom_eviction_policy_from_cpp(tmp_path):
    exe = str(tmp_path / "eviction_check")
    src = os.path.join(ROOT, "tests", "hashtable", "cpp", "eviction_check.cc")
    build = subprocess.run(
        [CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc", "hashtable"), src, "-o", exe],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
def test_disk_rows_match_a_map_of_records(tmp_path):
    exe = str(tmp_path / "disk_rows_check")
    src = os.path.join(ROOT, "tests", "hashtable", "cpp", "disk_rows_check.cc")
    build = subprocess.run(
        [CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-pthread", "-I", os.path.join(ROOT, "csrc", "hashtable"), src,
         "-o", exe],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    scratch = tmp_path / "rows"
    scratch.mkdir()
    run = subprocess.run([exe, str(scratch)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
    assert list(scratch.iterdir()) == []  # the rows file was unlinked when it was created
