# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""How the hash-backed modules appear to ``torch.fx``, ``torch.export`` and TorchScript.

A hash module's forward reads Python state (the tables, the key layout cache, the fused
optimizer) that no tracer can see through. Its ``forward`` is therefore one call of
:func:`hash_forward`, which ``torch.fx.wrap`` makes a single node of an fx graph: symbolic tracing
(``torch.fx.symbolic_trace``, ``torchrec.fx.symbolic_trace``) of a model holding our modules
records one ``call_function`` per module, with the module's :class:`ForwardRef` child as a
``get_attr`` argument, so the ``GraphModule`` holds the module and runs its eager forward (train
or eval as the module is set). ``torch.export`` (non-strict) traces through the eager forward,
which has no data-dependent Python branch: its ops check lengths and ids themselves. TorchScript
cannot compile the tables; scripting raises and says to use ``torch.export``.
"""

from typing import Any

import torch
from torch import nn


class ForwardRef(nn.Module):
    """A child of a hash module through which fx graphs call it (it holds no parameters or state)."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle in named_modules()

    @property
    def owner(self) -> nn.Module:
        return self._owner

    def __fx_create_arg__(self, tracer: torch.fx.Tracer) -> torch.fx.node.Argument:
        # A get_attr of this child: the GraphModule copies it, and with it the owner.
        return tracer.create_node("get_attr", tracer.path_of_module(self), (), {})

    def __prepare_scriptable__(self) -> "ForwardRef":
        refuse_scripting(self._owner)
        return self

    def __repr__(self) -> str:
        return f"ForwardRef({type(self._owner).__name__})"


def hash_forward(ref: ForwardRef, *args: Any) -> Any:
    """The eager forward of the module ``ref`` belongs to (one fx node)."""
    return ref.owner._forward_impl(*args)


def refuse_scripting(module: nn.Module) -> None:
    raise RuntimeError(
        f"{type(module).__name__} cannot be compiled by TorchScript: its embedding rows live in dynamic "
        "hash tables that TorchScript cannot see. Use torch.export.export(model, args, strict=False) "
        "(or torch.fx.symbolic_trace / torch.compile) instead."
    )


__all__ = ["ForwardRef", "hash_forward", "refuse_scripting"]
