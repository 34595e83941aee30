# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The one dict form of the config dataclasses (recis_torchrec._serial.DictConfig): a round trip
through JSON gives the same config; unknown fields and versions this code does not read are named."""

import json

import pytest

from recis_torchrec import HashTableOptions
from recis_torchrec.io import Schema
from recis_torchrec.train.args import TrainingArguments


CONFIGS = [
    HashTableOptions(admit_threshold=2, ttl_steps=10, initializer="normal", init_std=0.05),
    Schema(dense=["a", "b"], sparse={"u": "user", "h": ["h1", "h2"]}, labels=["y"], masks={"h": ["m1", "m2"]},
           dense_stats={"a": (0.5, 2.0)}, dense_transform={"a": "standardize"}, list_delimiter={"user": "^"}),
    TrainingArguments(output_dir="runs/x", steps=5, eval_every=0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_a_config_round_trips_through_json_and_refuses_what_it_cannot_read(config):
    cls = type(config)
    d = config.to_dict()
    assert cls.from_dict(json.loads(json.dumps(d))) == config
    assert d["version"] == 1
    with pytest.raises(ValueError, match=rf"{cls.__name__}.from_dict: unknown fields \['colour'\]"):
        cls.from_dict(dict(d, colour="red"))
    with pytest.raises(ValueError, match=rf"{cls.__name__}.from_dict: version 2 is not supported"):
        cls.from_dict(dict(d, version=2))
    with pytest.raises(ValueError, match="expected a mapping"):
        cls.from_dict([("version", 1)])
    no_version = {k: v for k, v in d.items() if k != "version"}
    assert cls.from_dict(no_version) == config  # written before the field: the current version
