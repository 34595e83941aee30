# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``python -m benchmarks [--quick | --smoke]``: the whole suite, one report (see benchmarks/suite.py)."""

from benchmarks.suite import main

if __name__ == "__main__":
    main()
