# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Declarative feature specs and the fused ``FeatureEngine`` that runs them.

    from recis_torchrec.features import Cross, Feature, FeatureEngine

    engine = FeatureEngine([
        Feature("user_id").hash(salt=True).mod(2**40),
        Feature("price").bucketize([1.0, 5.0, 20.0]),
        Cross("user_id", "item_id").mod(2**20),
        Feature("clicks").truncate(50, side="last"),
    ], dense_keys=["price"])
    kjt = engine(raw_kjt, dense=dense)   # a KeyedJaggedTensor with keys user_id, price, user_id_x_item_id, clicks
"""

from recis_torchrec.features.engine import FeatureEngine
from recis_torchrec.features.spec import (
    Bucketize,
    Cross,
    Feature,
    FeatureSpecError,
    Hash,
    Mod,
    MultiHash,
    Truncate,
    spec_from_dict,
)

__all__ = [
    "Bucketize",
    "Cross",
    "Feature",
    "FeatureEngine",
    "FeatureSpecError",
    "Hash",
    "Mod",
    "MultiHash",
    "Truncate",
    "spec_from_dict",
]
