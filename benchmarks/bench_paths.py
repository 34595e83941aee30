# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""TorchRec's own paths on our modules, measured against our default path in the same run:

- FP16 / BF16 tables against FP32 ones: memory per id (``memory_bytes`` over the ids held: rows,
  optimizer state, metadata, IdMap, block slack) and the training step (forward + backward +
  row-wise Adagrad), D=64;
- the forward of a ``torch.export``-ed program (non-strict, dynamic batch) against eager.

    python -m benchmarks.bench_paths [--quick]
"""

import argparse
import statistics
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType

import recis_torchrec as rt
from recis_torchrec.testing import zipf_ids

SIZES = {"smoke": dict(ids=20_000, tables=2, rows=2_000, batch=64, pooling=5, reps=2, warmup=1),
         "quick": dict(ids=1_000_000, tables=4, rows=100_000, batch=1024, pooling=20, reps=7, warmup=2),
         "full": dict(ids=1_000_000, tables=8, rows=100_000, batch=2048, pooling=20, reps=15, warmup=3)}


def _round_robin(impls, reps, warmup) -> Dict[str, List[float]]:
    import time

    out = {k: [] for k in impls}
    for r in range(warmup + reps):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def _module(data_type: DataType, size: Dict[str, int], dim: int = 64) -> rt.HashEmbeddingBagCollection:
    configs = [EmbeddingBagConfig(name=f"t{t}", embedding_dim=dim, num_embeddings=size["rows"],
                                  feature_names=[f"f{t}"], data_type=data_type) for t in range(size["tables"])]
    return rt.HashEmbeddingBagCollection(
        configs, fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01}
    )


def _kjt(size: Dict[str, int], seed: int, batch: Optional[int] = None) -> KeyedJaggedTensor:
    batch = batch or size["batch"]
    n = size["tables"] * batch * size["pooling"]
    ids = zipf_ids(n, size["rows"], 1.15, np.random.default_rng(seed))
    return KeyedJaggedTensor(keys=[f"f{t}" for t in range(size["tables"])], values=torch.from_numpy(ids),
                             lengths=torch.full((size["tables"] * batch,), size["pooling"], dtype=torch.int64))


def memory_per_id(size: Dict[str, int], dim: int = 64) -> Dict[str, float]:
    """Bytes per id of one table holding ``size['ids']`` ids, per row dtype (row-wise Adagrad)."""
    out = {}
    ids = torch.arange(size["ids"], dtype=torch.int64) * 7919 + 13
    for data_type in (DataType.FP32, DataType.FP16, DataType.BF16):
        table = _module(data_type, dict(size, tables=1), dim).tables()["t0"]
        table.find_or_insert(ids)
        out[data_type.name] = table.memory_bytes() / size["ids"]
        out[f"{data_type.name}_row_bytes"] = table.info()["row_bytes"]
        del table
    return out


# TBE's bytes per row of optimizer state, as FBGEMM allocates it (momentum1/2), per dim.
_TBE_STATE = {"EXACT_SGD": lambda d: 0, "EXACT_ROWWISE_ADAGRAD": lambda d: 1, "ADAM": lambda d: 2 * d}


def memory_breakdown(n: int, dims=(16, 64, 128)) -> List[Dict[str, Any]]:
    """Bytes per id of one float32 table of ``n`` ids, by what holds them (``info()['memory']``),
    for each optimizer and dim, against FBGEMM TBE's E x (D + state) x 4 for the same rows."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    out = []
    ids = torch.arange(n, dtype=torch.int64) * 7919 + 13
    for opt, tbe_state in _TBE_STATE.items():
        for dim in dims:
            cfg = [EmbeddingBagConfig(name="t0", embedding_dim=dim, num_embeddings=n, feature_names=["f0"])]
            table = rt.HashEmbeddingBagCollection(
                cfg, fused_params={"optimizer": EmbOptimType[opt], "learning_rate": 0.01}).tables()["t0"]
            table.find_or_insert(ids)
            info = table.info()
            parts = {k: v / n for k, v in info["memory"].items()}
            tbe = (dim + tbe_state(dim)) * 4
            out.append({"optimizer": opt, "dim": dim, "per_id": parts, "total": info["memory_bytes"] / n,
                        "tbe": tbe, "ratio": info["memory_bytes"] / n / tbe, "row_bytes": info["row_bytes"]})
            del table
    return out


def paths(mode: str) -> Dict[str, Any]:
    from benchmarks.suite import Row

    size = SIZES[mode]
    rows: List[Any] = []
    shape = (f"T={size['tables']}, E={size['rows']:,}, D=64, B={size['batch']}, L={size['pooling']}, Zipf 1.15, "
             "row-wise Adagrad")
    # Training step, FP16 / BF16 against FP32.
    modules = {f"recis_{d.name.lower()}": _module(d, size) for d in (DataType.FP32, DataType.FP16, DataType.BF16)}
    kjts = [_kjt(size, s) for s in range(4)]
    grad = torch.randn(size["batch"], size["tables"] * 64)
    step = {"i": 0}

    def trainer(m):
        def run():
            step["i"] += 1
            m(kjts[step["i"] % len(kjts)]).values().backward(grad)
        return run

    samples = _round_robin({k: trainer(m) for k, m in modules.items()}, size["reps"], size["warmup"])
    for impl, s in samples.items():
        rows.append(Row("paths", f"train step, half-width rows | {shape}", impl, s, "recis_fp32", 0, size["batch"],
                        "samples", torch.get_num_threads()))
    del modules
    # torch.export's forward against eager (eval, the same module).
    ebc = _module(DataType.FP32, size)
    for k in kjts:
        ebc(k).values().sum().backward()
    ebc.eval()
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(ebc, (_kjt(size, 99),), dynamic_shapes=([{0: auto}, None, {0: auto}, None, None, None],),
                             strict=False).module()
    kjt = kjts[0]
    with torch.no_grad():
        torch.testing.assert_close(ep(kjt).values(), ebc(kjt).values(), atol=0, rtol=0)
        samples = _round_robin({"eager": lambda: ebc(kjt), "exported_program": lambda: ep(kjt)}, size["reps"],
                               size["warmup"])
    for impl, s in samples.items():
        rows.append(Row("paths", f"forward, torch.export vs eager | {shape}", impl, s, "eager", 0, size["batch"],
                        "samples", torch.get_num_threads()))
    return {"rows": rows, "memory_per_id": memory_per_id(size), "memory_breakdown": memory_breakdown(size["ids"]),
            "config": size}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    out = paths("quick" if args.quick else "full")
    for r in out["rows"]:
        print(f"{r.bench} | {r.impl}: median {statistics.median(r.samples_ms):.2f} ms")
    print(out["memory_per_id"])


if __name__ == "__main__":
    main()
