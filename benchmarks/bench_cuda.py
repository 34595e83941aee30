# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""GPU benchmarks: the CUDA tables against PyTorch on the same GPU (the suite's ``gpu`` section).

- pooled lookup forward (D=128, fp32): ours (the table kernel over found rows, and the whole eval
  forward with the hash probe) against ``nn.EmbeddingBag`` on the GPU; effective GB/s and MBU
  against the GPU's measured device-to-device copy bandwidth (target: >= 70%);
- hashtable find at a 64M-key table, load factor 0.5, in billions of keys per second (HierarchicalKV
  publishes 3.9 B find/s on an H100; target >= 2 B/s), against ``torch.searchsorted`` over the
  sorted keys;
- forward + backward + Adam: ``HashEmbeddingBagCollection(device="cuda")`` with fused Adam against
  ``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SparseAdam`` (target: >= 3x faster).

FBGEMM's CUDA TBE is not a baseline here: the pinned fbgemm is the CPU build.

Needs a GPU and an extension built with RECIS_CUDA=1:

    RECIS_CUDA=1 .venv/bin/pip install --no-build-isolation --no-deps -e .
    .venv/bin/python -m benchmarks --only gpu
"""

from typing import Any, Callable, Dict, List

import torch

GPU_MODES = {
    "smoke": dict(tables=2, rows=10_000, dim=128, batch=256, pooling=8, hash_keys=1 << 16, reps=3, warmup=1),
    "quick": dict(tables=8, rows=1_000_000, dim=128, batch=8192, pooling=20, hash_keys=1 << 24, reps=10, warmup=3),
    # Dense baselines hold T x E x D floats per copy (and SparseAdam two more): E=1e6 keeps them at 16 GB.
    "full": dict(tables=8, rows=1_000_000, dim=128, batch=16384, pooling=20, hash_keys=1 << 26, reps=20, warmup=5),
}


def _time_gpu(impls: Dict[str, Callable[[], Any]], reps: int, warmup: int) -> Dict[str, List[float]]:
    """Round-robin over the implementations, each call timed with CUDA events (ms)."""
    samples: Dict[str, List[float]] = {name: [] for name in impls}
    for r in range(warmup + reps):
        for name, fn in impls.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            if r >= warmup:
                samples[name].append(start.elapsed_time(end))
    return samples


def _kjt(cfg: Dict[str, Any], generator: torch.Generator):
    from torchrec import KeyedJaggedTensor

    n = cfg["tables"] * cfg["batch"] * cfg["pooling"]
    values = torch.randint(0, cfg["rows"], (n,), generator=generator)
    lengths = torch.full((cfg["tables"] * cfg["batch"],), cfg["pooling"], dtype=torch.int64)
    return KeyedJaggedTensor(keys=[f"f{t}" for t in range(cfg["tables"])], values=values, lengths=lengths).to("cuda")


def _configs(cfg: Dict[str, Any]):
    from torchrec import EmbeddingBagConfig

    return [EmbeddingBagConfig(name=f"t{t}", embedding_dim=cfg["dim"], num_embeddings=cfg["rows"],
                               feature_names=[f"f{t}"]) for t in range(cfg["tables"])]


def _shape(cfg: Dict[str, Any]) -> str:
    return f"T={cfg['tables']}, E={cfg['rows']:,}, D={cfg['dim']}, B={cfg['batch']}, L={cfg['pooling']}"


def _forward_rows(cfg: Dict[str, Any], kjt) -> List[Any]:
    import recis_torchrec as rt
    from benchmarks.suite import Row
    from recis_torchrec import ops
    from recis_torchrec.modules.kjt import offsets_from_lengths

    T, E, D, B, L = cfg["tables"], cfg["rows"], cfg["dim"], cfg["batch"], cfg["pooling"]
    rows: List[Any] = []
    hebc = rt.HashEmbeddingBagCollection(_configs(cfg), device="cuda")
    hebc.train()
    hebc(kjt)  # inserts every id once
    hebc.eval()
    table = hebc.tables()["t0"]
    t0_values, t0_offsets = kjt["f0"].values(), offsets_from_lengths(kjt["f0"].lengths())
    t0_rows = table.find(t0_values)
    bags = [torch.nn.EmbeddingBag(E, D, mode="sum").cuda() for _ in range(T)]
    per_key = [kjt[f"f{t}"] for t in range(T)]
    # Bag starts by torch ops, once, outside the timed calls (JaggedTensor.offsets() is an FBGEMM op).
    starts = [offsets_from_lengths(jt.lengths())[:-1] for jt in per_key]
    with torch.no_grad():
        s = _time_gpu({
            "recis_torchrec (kernel, 1 table)": lambda: ops.pooled_forward(
                [table], t0_values, t0_rows, t0_offsets, None, [0], [ops.POOLING_SUM], [0], D),
            "nn.EmbeddingBag (1 table)": lambda: bags[0](per_key[0].values(), starts[0]),
        }, cfg["reps"], cfg["warmup"])
        for name, samples in s.items():
            rows.append(Row("gpu", f"pooled forward kernel (E={E:,}, D={D}, B={B}, L={L})", name, samples,
                            "nn.EmbeddingBag (1 table)", B * L * D * 4 + B * D * 4, B, "samples"))
        s = _time_gpu({
            "recis_torchrec (eval forward: find + pool)": lambda: hebc(kjt),
            "nn.EmbeddingBag x T": lambda: [bags[t](per_key[t].values(), starts[t]) for t in range(T)],
        }, cfg["reps"], cfg["warmup"])
    for name, samples in s.items():
        rows.append(Row("gpu", f"EBC forward ({_shape(cfg)})", name, samples, "nn.EmbeddingBag x T",
                        T * B * (L + 1) * D * 4, B, "samples"))
    return rows


def _train_rows(cfg: Dict[str, Any], kjt) -> List[Any]:
    import recis_torchrec as rt
    from benchmarks.suite import Row
    from recis_torchrec.modules.kjt import offsets_from_lengths

    T, E, D, B, L = cfg["tables"], cfg["rows"], cfg["dim"], cfg["batch"], cfg["pooling"]
    hebc = rt.HashEmbeddingBagCollection(_configs(cfg), device="cuda",
                                         fused_params={"optimizer": "adam", "learning_rate": 0.01})
    sparse_bags = [torch.nn.EmbeddingBag(E, D, mode="sum", sparse=True).cuda() for _ in range(T)]
    adam = torch.optim.SparseAdam([p for b in sparse_bags for p in b.parameters()], lr=0.01)
    per_key = [kjt[f"f{t}"] for t in range(T)]
    # Bag starts by torch ops, once, outside the timed calls (JaggedTensor.offsets() is an FBGEMM op).
    starts = [offsets_from_lengths(jt.lengths())[:-1] for jt in per_key]

    def ours_step():
        hebc(kjt).values().sum().backward()

    def torch_step():
        adam.zero_grad()
        torch.cat([sparse_bags[t](per_key[t].values(), starts[t]) for t in range(T)], 1).sum().backward()
        adam.step()

    s = _time_gpu({"recis_torchrec (fused Adam)": ours_step, "nn.EmbeddingBag(sparse) + SparseAdam": torch_step},
                  cfg["reps"], cfg["warmup"])
    return [Row("gpu", f"fwd+bwd+Adam ({_shape(cfg)})", name, samples, "nn.EmbeddingBag(sparse) + SparseAdam",
                2 * T * B * (L + 1) * D * 4, B, "samples") for name, samples in s.items()]


def _hashtable_rows(cfg: Dict[str, Any], g: torch.Generator) -> List[Any]:
    import recis_torchrec as rt
    from benchmarks.suite import Row

    n = cfg["hash_keys"]
    keys = torch.randint(-(2**62), 2**62, (n,), generator=g).cuda()
    ht = rt.HashTable("bench", 1, 0, rt.HashTableOptions(initial_capacity=n, block_rows=1 << 20), device="cuda")
    for chunk in keys.split(1 << 22):
        ht.find_or_insert(chunk)
    probe = keys[torch.randperm(n, generator=g).cuda()]
    sorted_keys = torch.sort(keys).values
    s = _time_gpu({
        "recis_torchrec find": lambda: ht.find(probe),
        "torch.searchsorted (sorted keys)": lambda: torch.searchsorted(sorted_keys, probe),
    }, max(3, cfg["reps"] // 2), 1)
    return [Row("gpu", f"hashtable find ({n:,} keys, load factor 0.5)", name, samples,
                "torch.searchsorted (sorted keys)", n * 16, n, "keys") for name, samples in s.items()]


def gpu(mode_name: str) -> Dict[str, Any]:
    """The suite's gpu section: rows for the report (each part frees its GPU memory on return)."""
    cfg = GPU_MODES[mode_name]
    g = torch.Generator().manual_seed(0)
    kjt = _kjt(cfg, g)
    rows = _forward_rows(cfg, kjt) + _train_rows(cfg, kjt) + _hashtable_rows(cfg, g)
    return {"rows": rows, "config": dict(cfg)}


__all__ = ["GPU_MODES", "gpu"]
