# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``convert``: swap every TorchRec ``EmbeddingBagCollection`` in a model for a hash-backed one."""

from typing import Any, Dict, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recis_torchrec.modules.hash_embedding_bag import HashEmbeddingBagCollection, OptionsArg


def convert_ebc(
    ebc: EmbeddingBagCollection,
    fused_params: Optional[Dict[str, Any]] = None,
    options: OptionsArg = None,
    import_weights: bool = True,
) -> HashEmbeddingBagCollection:
    """A ``HashEmbeddingBagCollection`` with ``ebc``'s configs (and, with
    ``import_weights``, its weights: row i of each table becomes id i)."""
    hebc = HashEmbeddingBagCollection(
        tables=ebc.embedding_bag_configs(),
        is_weighted=ebc.is_weighted(),
        fused_params=fused_params,
        options=options,
    )
    if import_weights:
        for config in ebc.embedding_bag_configs():
            weight = ebc.embedding_bags[config.name].weight
            if weight.is_meta:
                continue  # a meta model has no weights to import
            table = hebc.tables()[config.name]
            table.import_(
                torch.arange(weight.shape[0], dtype=torch.int64),
                weight.detach().to(device="cpu", dtype=torch.float32).contiguous(),
                None,
            )
    hebc.train(ebc.training)
    return hebc


def convert(
    model: nn.Module,
    fused_params: Optional[Dict[str, Any]] = None,
    options: OptionsArg = None,
    import_weights: bool = True,
) -> nn.Module:
    """Replaces every ``torchrec.EmbeddingBagCollection`` in ``model`` with a
    :class:`HashEmbeddingBagCollection`, in place.

    Args:
        model: any module; if it is itself an EBC, the replacement is returned.
        fused_params: the sparse optimizer of the new tables (TorchRec keys).
        options: ``HashTableOptions`` for every table, or a dict by table name.
        import_weights: copy each table's rows in, row i as id i, so the
            converted model computes what the original did on ids below
            ``num_embeddings``.

    Returns:
        The model (or the replacement, when ``model`` is an EBC).
    """
    if isinstance(model, EmbeddingBagCollection):
        return convert_ebc(model, fused_params, options, import_weights)
    for name, child in list(model.named_children()):
        if isinstance(child, EmbeddingBagCollection):
            setattr(model, name, convert_ebc(child, fused_params, options, import_weights))
        else:
            convert(child, fused_params, options, import_weights)
    return model
