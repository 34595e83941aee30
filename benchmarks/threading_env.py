# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The suite's threading method: a pinned OpenMP wait policy (set before torch loads), the thread
counts each section runs at, and a probe of how late a waiting worker thread wakes.

Standard library only at import: ``benchmarks/__main__.py`` reads it before torch is imported."""

import statistics
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

POLICIES = ("active", "passive")
DEFAULT_POLICY = "active"


def requested_policy(argv: Sequence[str]) -> str:
    """The ``--omp-wait-policy`` value in ``argv`` (argparse validates it later), else the default."""
    for i, a in enumerate(argv):
        if a == "--omp-wait-policy" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--omp-wait-policy="):
            return a.split("=", 1)[1]
    return DEFAULT_POLICY


def pinned_environment(environ: Mapping[str, str], policy: str) -> Optional[Dict[str, str]]:
    """The environment to re-run the suite in, or None when ``environ`` already pins ``policy``."""
    if policy not in POLICIES:
        return None  # argparse names the bad value
    if environ.get("OMP_WAIT_POLICY", "").lower() == policy:
        return None
    return dict(environ, OMP_WAIT_POLICY=policy.upper())


def wakeup_probe(threads: int, reps: int = 200, gap_s: float = 0.002) -> Dict[str, Any]:
    """A ``torch.add`` of 1M floats after ``gap_s`` of idleness, at ``threads`` and at 1 thread: the
    median and p90 milliseconds of each. Waiting workers that sleep (a passive wait policy) wake late:
    the multi-threaded p90 then far exceeds the 1-thread median."""
    import torch

    a, b = torch.rand(1 << 20), torch.rand(1 << 20)
    out = torch.empty_like(a)
    before = torch.get_num_threads()
    result: Dict[str, Any] = {"elements": 1 << 20, "gap_ms": gap_s * 1e3, "reps": reps}
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            times: List[float] = []
            for _ in range(reps):
                time.sleep(gap_s)
                t0 = time.perf_counter()
                torch.add(a, b, out=out)
                times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            result[f"{n}_threads"] = {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * len(times))]}
    finally:
        torch.set_num_threads(before)
    many = result[f"{threads}_threads"]
    result["late"] = threads > 1 and wakes_late(result["1_threads"]["median_ms"], many["median_ms"], many["p90_ms"])
    return result


def wakes_late(one_median: float, many_median: float, many_p90: float) -> bool:
    """Whether N threads wake late: their p90 over 3x the 1-thread median, or their median no faster
    than one thread on an add that splits evenly (the wake-up costs what the work does)."""
    return many_p90 > 3 * one_median or many_median > 0.9 * one_median


def describe(info: Dict[str, Any]) -> str:
    """One report line on the threading of the run, with a warning when workers woke late."""
    probe = info["wakeup"]
    n = info["threads"]
    many = probe[f"{n}_threads"]
    line = (f"Threading: OMP_WAIT_POLICY={info['omp_wait_policy'] or '(unset)'}, sections at "
            f"{', '.join(map(str, info['thread_counts']))} thread(s) (ours and every baseline alike, in one "
            f"process); wake-up probe (1M-float add after {probe['gap_ms']:.0f} ms idle): 1 thread median "
            f"{probe['1_threads']['median_ms']:.3f} ms, {n} threads median {many['median_ms']:.3f} ms, "
            f"p90 {many['p90_ms']:.3f} ms.")
    if probe["late"]:
        line += (f" WARNING: worker threads wake late here ({n} threads no faster than 1, or their p90 over 3x the "
                 "1-thread median): multi-threaded timings carry that delay; compare the 1-thread rows, or run "
                 "with --omp-wait-policy active.")
    return line
