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


def _check(tmp_path, name, flags=(), args=()):
    """Builds tests/hashtable/cpp/<name>.cc against the core's headers with g++ -Wall -Werror and runs it;
    it prints "ok" when every check passed."""
    exe = str(tmp_path / name)
    src = os.path.join(ROOT, "tests", "hashtable", "cpp", f"{name}.cc")
    build = subprocess.run(
        [CXX, "-std=c++17", "-O2", *flags, "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc", "hashtable"), src,
         "-o", exe],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
@pytest.mark.parametrize("isa", ["-mavx2", "-mno-avx2"])
def test_id_map_matches_unordered_map(tmp_path, isa):
    _check(tmp_path, "id_map_check", [isa])


def _has_f16c() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " f16c" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(CXX is None or not _has_f16c(), reason="needs g++ and a CPU with F16C")
def test_portable_half_conversions_match_f16c(tmp_path):
    _check(tmp_path, "row_types_check", ["-mf16c"])


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
def test_a_custom_eviction_policy_from_cpp(tmp_path):
    _check(tmp_path, "eviction_check")


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
@pytest.mark.parametrize("reads", ["map", "pread"])
def test_disk_rows_match_a_map_of_records(tmp_path, reads):
    scratch = tmp_path / "rows"
    scratch.mkdir()
    _check(tmp_path, "disk_rows_check", ["-pthread"], [str(scratch), reads])
    assert list(scratch.iterdir()) == []  # the rows file was unlinked when it was created
