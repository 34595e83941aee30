# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The device of a hash-backed module."""

from typing import Any, Optional

import torch

from recis_torchrec.ops.devices import require_cuda


def module_device(device: Optional[Any], who: str) -> torch.device:
    """The device of a hash-backed module: CPU (None, outside a ``torch.device("meta")`` context),
    CUDA, or meta (configs only: the tables are built when the module is moved off it)."""
    if device is None:
        default = torch.get_default_device()
        return torch.device("meta") if default.type == "meta" else torch.device("cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda", "meta"):
        raise NotImplementedError(f"{who}: device {device} is not supported; use 'cpu', 'cuda' or 'meta'")
    if device.type == "cuda":
        require_cuda(who)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device
