# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
from recis_torchrec.datasets.synthetic import SyntheticClicks, SyntheticConfig, synthetic_schema, write_parquet

__all__ = ["SyntheticClicks", "SyntheticConfig", "synthetic_schema", "write_parquet"]
