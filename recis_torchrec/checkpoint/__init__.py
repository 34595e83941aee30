# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints: safetensors shards of hash tables plus dense state, resharded on load."""

from recis_torchrec.checkpoint.dcp import DCPLoadPlanner
from recis_torchrec.checkpoint.delta import apply_delta, export_delta
from recis_torchrec.checkpoint.files import CheckpointError
from recis_torchrec.checkpoint.saver import checkpoints, load, release_buffers, resolve, save, wait

__all__ = ["CheckpointError", "DCPLoadPlanner", "apply_delta", "checkpoints", "export_delta", "load", "release_buffers", "resolve", "save", "wait"]
