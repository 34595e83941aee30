# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The one loader of the compiled extension.

Importing it registers the ``torch.ops.recis`` ops and gives access to the
table-lifetime functions. A missing build fails here, with the command that
fixes it, instead of as an obscure ``AttributeError`` on ``torch.ops.recis``.
"""

import importlib

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    # By its full name: the root package is above this module's layer.
    _C = importlib.import_module("recis_torchrec._C")
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "recis_torchrec's C++ extension (recis_torchrec._C) is not built or does not "
        "match this torch. Build it from the repository root with "
        "`pip install --no-build-isolation --no-deps -e .` (or `make setup`). "
        f"Original error: {e}"
    ) from e

C = _C

__all__ = ["C"]
