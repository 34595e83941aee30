# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The benchmark suite runs end to end on a tiny shape (no timing assertions)."""

from benchmarks.bench_embedding_bag import BASELINE, ExperimentConfig, bench_all, markdown


def test_bench_embedding_bag_smoke():
    cfg = ExperimentConfig(tables=2, rows=500, dim=8, batch=16, pooling=3, zipf_alpha=1.15, reps=2, warmup=1)
    results = bench_all(cfg)
    got = {(r.bench, r.impl) for r in results}
    for bench, baseline in BASELINE.items():
        assert (bench, "recis_torchrec") in got and (bench, baseline) in got
    assert all(len(r.samples_ms) == 2 and min(r.samples_ms) > 0 for r in results)
    table = markdown(cfg, results)
    assert table.count("recis_torchrec") == len(BASELINE)
