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
