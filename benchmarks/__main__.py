# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``python -m benchmarks [--quick | --smoke]``: the whole suite, one report (see benchmarks/suite.py).

The OpenMP wait policy is pinned before torch (and its OpenMP runtime) loads: OMP_WAIT_POLICY is read
once, at the runtime's start, so the suite re-runs itself with it set when the environment differs
(``--omp-wait-policy``, default ``active``: on these VMs a passively waiting thread wakes milliseconds
late, which made every multi-threaded baseline look 10-50x slower than it is)."""

import os
import sys

from benchmarks.threading_env import pinned_environment, requested_policy

if __name__ == "__main__":
    env = pinned_environment(os.environ, requested_policy(sys.argv[1:]))
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]], env)
    from benchmarks.suite import main

    main()
