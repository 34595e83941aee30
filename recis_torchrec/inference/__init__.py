# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Inference: export a trained model with its hash tables, load it as a :class:`Predictor`."""

from recis_torchrec.inference.package import (
    InferenceError,
    Predictor,
    export,
    export_dense,
    load,
    read_manifest,
    write_batch,
)
from recis_torchrec.inference.tables import FORMATS, ServingTable, dequantize_rows, quantize_rows

__all__ = ["FORMATS", "InferenceError", "Predictor", "ServingTable", "dequantize_rows", "export", "export_dense", "load",
           "quantize_rows", "read_manifest", "write_batch"]
