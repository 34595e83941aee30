# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Read-only served tables: ids, densely packed (optionally quantized) rows and a compact index."""

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from recis_torchrec import _ext  # noqa: F401  (registers torch.ops.recis)

# Row formats, as the serving op numbers them.
FORMATS = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3}


def quantize_rows(weights: torch.Tensor, quantization: str) -> torch.Tensor:
    """(n, dim) float32 rows in a served format: float32/float16/bfloat16 (n, dim), or row-wise INT8
    (n, dim + 8) uint8 in FBGEMM's fused 8-bit layout (dim bytes, float scale, float bias)."""
    weights = weights.float().contiguous()
    if quantization == "fp32":
        return weights
    if quantization == "fp16":
        return weights.half()
    if quantization == "bf16":
        return weights.bfloat16()
    if quantization == "int8":
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

        if weights.shape[0] == 0:
            return torch.empty(0, weights.shape[1] + 8, dtype=torch.uint8)
        return torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(weights)
    raise ValueError(f"unknown quantization {quantization!r} (one of {sorted(FORMATS)})")


def dequantize_rows(rows: torch.Tensor, quantization: str) -> torch.Tensor:
    """The float32 rows a served format holds."""
    if quantization == "int8":
        import fbgemm_gpu  # noqa: F401

        if rows.shape[0] == 0:
            return torch.empty(0, rows.shape[1] - 8)
        return torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(rows)
    return rows.float()


@dataclass(frozen=True)
class ServingTable:
    """One table as served: immutable; :meth:`updated` builds the next version."""

    key: str
    dim: int
    quantization: str
    rows: torch.Tensor  # (n, width): row i holds the i-th id given to build()
    index_keys: torch.Tensor  # the index (the ids live only here)
    index_rows: torch.Tensor
    init: Optional[Dict[str, Any]]  # the initializer unseen ids read; None: zeros

    @staticmethod
    def build(key: str, dim: int, quantization: str, ids: torch.Tensor, rows: torch.Tensor,
              init: Optional[Dict[str, Any]]) -> "ServingTable":
        if quantization not in FORMATS:
            raise ValueError(f"table {key!r}: unknown quantization {quantization!r}")
        width = dim + 8 if quantization == "int8" else dim
        if ids.dim() != 1 or ids.dtype != torch.int64 or rows.dim() != 2 or rows.shape != (ids.numel(), width):
            raise ValueError(f"table {key!r}: ids {tuple(ids.shape)} {ids.dtype} and rows {tuple(rows.shape)} do not "
                             f"make a {quantization} table of dim {dim}")
        index_keys, index_rows = torch.ops.recis.serving_index(ids.contiguous())
        return ServingTable(key, dim, quantization, rows.contiguous(), index_keys, index_rows, init)

    @property
    def ids(self) -> torch.Tensor:
        """(n,) int64: the id of each row, read back from the index."""
        used = self.index_rows >= 0
        out = torch.empty(self.rows.shape[0], dtype=torch.int64)
        out[self.index_rows[used].long()] = self.index_keys[used]
        return out

    def _init_args(self):
        if self.init is None:
            return -1, 0.0, 0.0, 0
        seed = self.init["seed"]
        return self.init["kind"], self.init["a"], self.init["b"], seed - 2**64 if seed >= 2**63 else seed

    def pooled(self, ids: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor],
               mode: int) -> torch.Tensor:
        """Bags of ids pooled (mode 0 sum, 1 mean): (B, dim) float32."""
        return torch.ops.recis.serving_pooled(
            self.index_keys, self.index_rows, self.rows, FORMATS[self.quantization], ids, offsets, weights, mode,
            *self._init_args(),
        )

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Each id's row, (N, dim) float32."""
        offsets = torch.arange(ids.numel() + 1, dtype=torch.int64)
        return self.pooled(ids, offsets, None, 0)

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: the rows and the index (ids included)."""
        return sum(t.numel() * t.element_size() for t in (self.rows, self.index_keys, self.index_rows))

    def updated(self, ids: torch.Tensor, rows: torch.Tensor, evicted: torch.Tensor) -> "ServingTable":
        """A new version: `ids` get `rows` (inserted or replaced), `evicted` ids are dropped."""
        old = self.ids
        drop = torch.cat([ids, evicted])
        keep = ~torch.isin(old, drop)
        new_ids = torch.cat([old[keep], ids])
        new_rows = torch.cat([self.rows[keep], rows.to(self.rows.dtype)])
        order = torch.argsort(new_ids)
        return ServingTable.build(self.key, self.dim, self.quantization, new_ids[order], new_rows[order], self.init)
