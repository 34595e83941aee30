# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The table factory: a ``HashTable`` per TorchRec table config, checked."""

from typing import Any, Dict, Mapping, Sequence

import torch
from torchrec.modules.embedding_configs import DataType

from recis_torchrec.tables.hash_table import HashTable
from recis_torchrec.tables.options import HashTableOptions, OptionsArg, resolve_options


def check_table_configs(configs: Sequence[Any], config_type: type) -> None:
    """TorchRec table configs a hash module can build, or an error naming the table (or the position of
    an entry that is not a config)."""
    if isinstance(configs, (str, bytes)) or not isinstance(configs, (list, tuple)):
        raise TypeError(f"tables must be a list of {config_type.__name__}, got {type(configs).__name__}")
    seen = set()
    for i, config in enumerate(configs):
        if not isinstance(config, config_type):
            raise TypeError(f"tables[{i}] must be a {config_type.__name__}, got {type(config).__name__}")
        if config.name in seen:
            raise ValueError(f"Duplicate table name {config.name}")
        seen.add(config.name)
        for field in ("embedding_dim", "num_embeddings"):
            value = getattr(config, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"table {config.name!r}: {field} must be a positive int, got {value!r}")
        if config.data_type not in ROW_DTYPES:
            raise NotImplementedError(
                f"table {config.name!r}: data_type {config.data_type} is not supported; hash tables store "
                f"{sorted(d.name for d in ROW_DTYPES)}"
            )
        if not config.feature_names:
            config.feature_names = [config.name]
        repeated = sorted({f for f in config.feature_names if config.feature_names.count(f) > 1})
        if repeated:
            raise ValueError(f"table {config.name!r}: feature_names lists {repeated} more than once")


def build_tables(
    configs: Sequence[Any],
    optimizer_configs: Mapping[str, Any],
    options: OptionsArg,
    config_type: type,
    device: torch.device = torch.device("cpu"),
) -> Dict[str, Any]:
    """A table per TorchRec table config (``EmbeddingBagConfig`` or ``EmbeddingConfig``), checked:
    ``HashTable``s on ``device``. ``optimizer_configs``: each table's
    ``SparseOptimizerConfig``, by name."""
    check_table_configs(configs, config_type)
    per_table = resolve_options(configs, options)
    for name, o in per_table.items():
        if o.device is not None and torch.device(o.device).type != device.type:
            raise ValueError(
                f"table {name!r}: HashTableOptions.device={o.device!r} but the module is on {device}; "
                "a module's tables share its device"
            )
    if device.type == "meta":
        return {}  # built when the module leaves the meta device
    return {
        c.name: make_table(c, optimizer_configs[c.name], per_table[c.name], c.num_embeddings, device) for c in configs
    }


# TorchRec's table data types that hash tables store, and their torch dtypes.
ROW_DTYPES = {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}


def make_table(config: Any, optimizer_config, options: HashTableOptions, num_embeddings: int, device: torch.device):
    """The table of one TorchRec config, a ``HashTable`` on ``device``.
    ``num_embeddings`` is the capacity hint (a shard's share of the config's, when sharded)."""
    kwargs = dict(
        name=config.name,
        dim=config.embedding_dim,
        state_dim=optimizer_config.state_dim(config.embedding_dim),
        options=options,
        num_embeddings=num_embeddings,
        init_range=(config.get_weight_init_min(), config.get_weight_init_max()),
    )
    return HashTable(**kwargs, dtype=ROW_DTYPES[config.data_type], device=device)
