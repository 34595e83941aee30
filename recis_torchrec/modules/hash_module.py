# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""What the hash-backed modules share: their tables, fused optimizer, devices and dtypes, and
state-dict form."""

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from recis_torchrec.modules.device import module_device
from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.tables.state_dict import load_tables, save_tables
from recis_torchrec.tables.state_rows import Owner
from recis_torchrec.modules.tracing import refuse_scripting
from recis_torchrec.optim.fused import HashFusedOptimizer


class TableView:
    """``ebc.embedding_bags[name]`` / ``ec.embeddings[name]`` of a hash-backed module: what TorchRec
    code reads of a table (``weight.device``, ``weight.dtype``, ``embedding_dim``, the config), with
    the rows behind ``weight`` as a read-only copy (an inference tensor: writing to it raises). A
    hash table has no ``nn.Parameter`` per table (its rows and optimizer state live in the table and
    are updated in backward), so the parameter interfaces raise instead of returning nothing."""

    def __init__(self, owner: Any, config: Any) -> None:
        self._owner, self.config = owner, config
        self.embedding_dim = config.embedding_dim
        self.num_embeddings = config.num_embeddings

    @property
    def _table(self) -> Optional[HashTable]:
        return self._owner._tables.get(self.config.name)

    @property
    def device(self) -> torch.device:
        return self._owner.device

    @property
    def ids(self) -> torch.Tensor:
        """The ids the table holds, ordered as ``weight``'s rows."""
        table = self._table
        if table is None:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return table.export_rows()[0]

    @property
    def weight(self) -> torch.Tensor:
        """The rows the table holds (ordered as :attr:`ids`), on the module's device; a copy that
        cannot be written to."""
        table = self._table
        if table is None:  # the meta device: shapes only
            return torch.empty(0, self.embedding_dim, device=self.device)
        with torch.inference_mode():
            return table.export_rows()[1].to(self.device)

    def parameters(self, recurse: bool = True):
        raise RuntimeError(
            f"table {self.config.name!r} of a {type(self._owner).__name__} has no parameters: its rows and optimizer "
            "state are updated in backward by the fused optimizer (fused_params, or apply_optimizer_in_backward "
            "on the TorchRec module before rt.convert); read the rows with .weight")

    named_parameters = parameters

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"table {self.config.name!r} of a {type(self._owner).__name__} is a hash table: it has config, device, "
            f"embedding_dim, num_embeddings, weight (its rows, read-only) and ids, not {name!r}")

    def __repr__(self) -> str:
        return f"TableView({self.config.name!r}, dim={self.embedding_dim}, device={self.device})"


class HashTablesMixin:
    """What the hash-backed TorchRec modules share: their tables (``self._tables``), fused
    optimizer (``self._optim``), CPU device, and state-dict form ``{section}.{table}.weight``
    plus ``.ids`` (``_state_section``: ``"embedding_bags"`` for the EBC, ``"embeddings"`` for the EC)."""

    _state_section = "embedding_bags"
    # Whether this module holds one rank's shard of its tables (the sharded modules in
    # recis_torchrec.distributed): what the layers below `distributed` read instead of an isinstance.
    holds_a_shard = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "qconfig":
            refuse_torchrec_quantization(self)
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails. TorchRec's quantized collections' ``from_float``
        # asserts ``hasattr(module, "qconfig")`` first: called on ours, say why it cannot work
        # (a ``qconfig`` property would break torch.ao's walk, which reads it on every module).
        if name == "qconfig":
            refuse_torchrec_quantization(self)
        return super().__getattr__(name)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def fused_optimizer(self) -> HashFusedOptimizer:
        return self._optim

    @property
    def hash_optimizer(self) -> HashFusedOptimizer:
        """The fused optimizer of this module's hash tables (``fused_optimizer`` of a mixed plan's
        sharded module also holds TorchRec's)."""
        return self._optim

    def __prepare_scriptable__(self) -> "HashTablesMixin":
        refuse_scripting(self)
        return self

    def reset_parameters(self) -> None:
        """Re-initialises every row: each id keeps its row, with its initial value and zero optimizer
        state and metadata (as TorchRec re-initialises its weights). Admission counts and the eviction
        log are dropped."""
        for table in self._tables.values():
            ids = table.export()[0]
            table.clear()
            if ids.numel():
                table.import_(ids)

    # -- devices and dtypes: each either takes effect or raises ---------------------

    def _move(self, device: Optional[torch.device], how: str) -> None:
        if device is None:
            return
        device = torch.device(device)
        who = type(self).__name__
        if self._device.type == "meta":
            if device.type != "meta":  # materialise: build the (empty) tables there
                self._device = module_device(device, who)
                self._build()
            return
        if device.type == self._device.type and (device.index is None or device == self._device):
            return
        if device.type == "meta":
            raise RuntimeError(
                f"{who}.{how}(meta): moving a module with hash tables to the meta device would drop its rows; "
                "build it on meta instead (device='meta')"
            )
        raise RuntimeError(
            f"{who}.{how}({device}): its tables live on {self._device}; build the module on {device} "
            f"(device=...) or convert the TorchRec model there (rt.convert(model, device=...))"
        )

    def _check_dtype(self, dtype: Optional[torch.dtype], how: str) -> None:
        if dtype is not None and dtype != torch.float32:
            raise RuntimeError(
                f"{type(self).__name__}.{how}({dtype}): the tables' dtype comes from each config's data_type "
                "(EmbeddingBagConfig(data_type=...)); converting a module's tables is not supported"
            )

    def _apply(self, fn: Any, recurse: bool = True):  # type: ignore[override]
        """Where ``model.half()``, ``.double()``, ``.to(dtype or device)`` or ``.to_empty()`` on a model
        holding this module arrive (``nn.Module._apply``): the tables have no parameters for ``fn`` to
        convert, so what ``fn`` does is read off a probe tensor, and it takes effect or raises, never
        skips the tables."""
        probe = torch.zeros(1, device=self._device)
        out = fn(probe)
        if isinstance(out, torch.Tensor):
            try:
                if out.dtype != probe.dtype:
                    self._check_dtype(out.dtype, "to")
                if out.device != probe.device:
                    self._move(out.device, "to")
            except RuntimeError as e:
                raise RuntimeError(f"a cast or move of a model holding a {type(self).__name__} (model.half(), "
                                   f".double(), .to(...)) reached it: {e}{self._converted_before()}") from None
        return super()._apply(fn, recurse)

    def _converted_before(self) -> str:
        """Which modules of the model that is being cast were converted before the walk reached this
        one (``nn.Module._apply`` converts children depth first, in order): the refusal leaves them
        converted, and says so."""
        import sys

        root, frame = None, sys._getframe(1)
        while frame is not None:  # the outermost _apply on the stack is the model's
            if frame.f_code.co_name == "_apply" and isinstance(frame.f_locals.get("self"), torch.nn.Module):
                root = frame.f_locals["self"]
            frame = frame.f_back
        if root is None or root is self:
            return ""
        names, mine = [], None
        for name, m in root.named_modules():
            if m is self:
                mine = name
                break
            if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None:
                names.append(name)
        # An ancestor's own tensors convert after its children: not yet.
        names = [n for n in names if mine is None or not (mine == n or mine.startswith(n + ".") or n == "")]
        if not names:
            return ""
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        return (f". The modules the cast reached before it were converted and stay so ({shown}): convert them "
                "back, or rebuild the model")

    def to(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        self._check_dtype(dtype, "to")
        self._move(device, "to")
        return super().to(*args, **kwargs)  # children (a TorchRec child of a mixed plan) as usual

    def to_empty(self, *, device: Any, recurse: bool = True):  # type: ignore[override]
        if self._device.type != "meta":
            raise RuntimeError(
                f"{type(self).__name__}.to_empty({device}): the module holds tables with rows; to_empty "
                "materialises a module built on the meta device"
            )
        self._move(device, "to_empty")
        return self

    def cuda(self, device: Any = None):  # type: ignore[override]
        self._move(torch.device("cuda") if device is None else torch.device("cuda", device) if isinstance(device, int)
                   else torch.device(device), "cuda")
        return self

    def cpu(self):  # type: ignore[override]
        self._move(torch.device("cpu"), "cpu")
        return self

    def half(self):  # type: ignore[override]
        self._check_dtype(torch.float16, "half")
        return self

    def bfloat16(self):  # type: ignore[override]
        self._check_dtype(torch.bfloat16, "bfloat16")
        return self

    def double(self):  # type: ignore[override]
        self._check_dtype(torch.float64, "double")
        return self

    def float(self):  # type: ignore[override]
        return self

    def type(self, dst_type: Any):  # type: ignore[override]
        raise RuntimeError(f"{type(self).__name__}.type({dst_type}): not supported on hash tables")

    def _table_views(self, configs: Any) -> Dict[str, TableView]:
        return {c.name: TableView(self, c) for c in configs}

    def tables(self) -> Dict[str, HashTable]:
        """The tables by name (none while the module is on the meta device)."""
        return dict(self._tables)

    def table_stats(self) -> Dict[str, Dict[str, int]]:
        """Rows, capacity and memory of every table."""
        return {name: t.info() for name, t in self._tables.items()}

    def _state_sharding(self) -> Optional[Tuple[Any, Owner, torch.device]]:
        """(process group, this rank, collective device) when the rows are a shard; None: all rows."""
        return None

    def _row_filter(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """Which ids of loaded rows this module keeps (``ids -> bool mask``); None: all of them.
        A shard keeps the ids its rank owns."""
        return None

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_tables(self._tables, destination, prefix, section=self._state_section, sharding=self._state_sharding())

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = load_tables(
            self._tables, state_dict, prefix, missing_keys, error_msgs, keep=self._row_filter(),
            section=self._state_section,
        )
        # The base class loads nothing here (the module has no parameters) but
        # reports, when strict, keys under this prefix that are not ours.
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k not in ours},
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )


def refuse_torchrec_quantization(module: Any) -> None:
    """TorchRec's ``quantize_embeddings`` maps only its own collections to quantized ones and would
    return ours unchanged, unquantized, without a word. torch.ao sets ``qconfig`` on every module
    it walks; when that walk is ``quantize_embeddings``'s, say so instead (a quantization of the
    dense layers alone, ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear})``, passes)."""
    import sys

    callers = {("quantize_embeddings", "torchrec/inference/modules.py"): "torchrec.inference.modules.quantize_embeddings",
               ("from_float", "torchrec/quant/embedding_modules.py"): "torchrec.quant's from_float"}
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        path = code.co_filename.replace("\\", "/")
        caller = next((what for (name, tail), what in callers.items() if code.co_name == name and path.endswith(tail)),
                      None)
        if caller is not None:
            raise NotImplementedError(
                f"{caller} cannot quantize {type(module).__name__}: its rows "
                "live in hash tables, which TorchRec's quantized EmbeddingBagCollection cannot hold. Export the "
                "model with recis_torchrec.inference.export(model, path, example_inputs, quantize='int8') (or "
                "'fp16'/'bf16') and serve it with recis_torchrec.inference.load(path)"
            )
        frame = frame.f_back
