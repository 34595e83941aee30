# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
from recis_torchrec.optim.fused import HashFusedOptimizer, SparseOptimizerConfig, parse_fused_params

__all__ = ["HashFusedOptimizer", "SparseOptimizerConfig", "parse_fused_params"]
