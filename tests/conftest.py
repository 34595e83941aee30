# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("recis", max_examples=25, deadline=None)
settings.load_profile("recis")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """A test that runs on a GPU must carry the `cuda` marker (tests/devices.py), or `make gpu-check`
    (`-m cuda`) would not run it: a CUDA case of devices() or a test skipped for want of a GPU
    without the marker fails the collection, naming it."""
    unmarked = []
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_cuda = any(v == "cuda" for v in params.values() if isinstance(v, str))
        wants_gpu = any("GPU" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))
        if on_cuda or wants_gpu:
            unmarked.append(item.nodeid)
    if unmarked:
        raise pytest.UsageError("tests that run on a GPU without the `cuda` marker (use tests.devices.devices() "
                                f"or needs_cuda): {unmarked}")
