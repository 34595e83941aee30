# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The fused FeatureEngine against the same chains written as per-feature torch ops.

A Criteo-shaped batch: 26 categorical features (one raw id per sample, Zipf
over 1e6 values, some missing) hashed with a per-feature salt and modded to
2**24; 13 dense columns bucketized against 16 boundaries each (log-spaced, as
Criteo's counts are); 3 crosses of categorical pairs, modded to 2**24. Batch
4096. The baseline is ``recis_torchrec.testing.feature_reference.reference_engine``: the same
specs, one feature and one torch op at a time (the hashes as torch integer
arithmetic), which is what a user writes without the engine. Both produce the
same KJT (checked). Runs alternate; medians of the runs.

    python -m benchmarks.bench_features
    python -m benchmarks.bench_features --quick
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from recis_torchrec.features import Cross, Feature, FeatureEngine
from recis_torchrec.testing.feature_reference import reference_engine

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def criteo_specs() -> List:
    cats = [f"cat_{i}" for i in range(26)]
    bounds = [0.0] + [float(2**k) for k in range(15)]
    return (
        [Feature(c).hash(salt=True).mod(2**24) for c in cats]
        + [Feature(f"int_{i}").bucketize(bounds) for i in range(13)]
        + [Cross("cat_0", "cat_1").mod(2**24), Cross("cat_2", "cat_5").mod(2**24), Cross("cat_3", "cat_9").mod(2**24)]
    )


def criteo_batch(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = (rng.random((26, batch)) > 0.05).astype(np.int64)  # about 5% missing
    ranks = rng.zipf(1.2, int(lengths.sum())) % 1_000_000
    values = (ranks * 2654435761 + 12345).astype(np.int64)
    kjt = KeyedJaggedTensor([f"cat_{i}" for i in range(26)], torch.from_numpy(values),
                            lengths=torch.from_numpy(lengths.reshape(-1)), stride=batch)
    dense = torch.from_numpy(np.floor(rng.exponential(20.0, (batch, 13))).astype(np.float32))
    return kjt, dense


def _time(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def run(batch: int, rounds: int, reps: int) -> Dict[str, object]:
    specs = criteo_specs()
    kjt, dense = criteo_batch(batch)
    dense_keys = [f"int_{i}" for i in range(13)]
    engine = FeatureEngine(specs, dense_keys=dense_keys)
    columns = {k: dense[:, i] for i, k in enumerate(dense_keys)}
    fused = engine(kjt, dense=dense)
    ref = reference_engine(specs, kjt, columns)
    assert fused.keys() == ref.keys() and torch.equal(fused.values(), ref.values())
    assert torch.equal(fused.lengths(), ref.lengths())
    samples: Dict[str, List[float]] = {"fused": [], "per_feature_torch": []}
    for _ in range(rounds):
        samples["fused"].append(_time(lambda: engine(kjt, dense=dense), reps))
        samples["per_feature_torch"].append(_time(lambda: reference_engine(specs, kjt, columns), reps))
    return {"batch": batch, "values": int(kjt.values().numel()), "threads": torch.get_num_threads(),
            "samples_ms": samples}


def markdown(result: Dict[str, object]) -> str:
    s = result["samples_ms"]
    fused, base = statistics.median(s["fused"]), statistics.median(s["per_feature_torch"])
    return "\n".join([
        f"Criteo-shaped batch: B={result['batch']}, 26 hashed+modded ids ({result['values']:,} values), "
        f"13 bucketized columns, 3 crosses; {result['threads']} threads",
        "",
        "| | median ms | speedup |",
        "|---|---:|---:|",
        f"| per-feature torch ops | {base:.3f} | 1.00 |",
        f"| FeatureEngine (fused) | {fused:.3f} | {base / fused:.2f} |",
    ])


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=4096)
    args = p.parse_args(argv)
    rounds, reps = (3, 5) if args.quick else (7, 30)
    result = run(args.batch, rounds, reps)
    print(markdown(result), flush=True)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    out = os.path.join(RESULTS_DIR, f"{stamp}-{socket.gethostname()}-features{'-quick' if args.quick else ''}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
