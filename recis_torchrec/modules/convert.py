# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``convert``: swap every TorchRec ``EmbeddingBagCollection`` and ``EmbeddingCollection`` in a model
for a hash-backed one."""

from typing import Any, Dict, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recis_torchrec.modules.hash_embedding_bag import HashEmbeddingBagCollection, OptionsArg
from recis_torchrec.modules.hash_embedding_collection import HashEmbeddingCollection


def _import_rows(tables: Dict[str, Any], weights: Dict[str, torch.Tensor]) -> None:
    """Row i of each TorchRec table's weight becomes id i of the hash table of the same name."""
    for name, weight in weights.items():
        if weight.is_meta:
            continue  # a meta model has no weights to import
        tables[name].import_(
            torch.arange(weight.shape[0], dtype=torch.int64),
            weight.detach().to(device="cpu", dtype=torch.float32).contiguous(),
            None,
        )


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
        _import_rows(hebc.tables(), {c.name: ebc.embedding_bags[c.name].weight for c in ebc.embedding_bag_configs()})
    hebc.train(ebc.training)
    return hebc


def convert_ec(
    ec: EmbeddingCollection,
    fused_params: Optional[Dict[str, Any]] = None,
    options: OptionsArg = None,
    import_weights: bool = True,
) -> HashEmbeddingCollection:
    """A ``HashEmbeddingCollection`` with ``ec``'s configs and ``need_indices`` (and, with
    ``import_weights``, its weights: row i of each table becomes id i)."""
    hec = HashEmbeddingCollection(
        tables=ec.embedding_configs(), need_indices=ec.need_indices(), fused_params=fused_params, options=options
    )
    if import_weights:
        _import_rows(hec.tables(), {c.name: ec.embeddings[c.name].weight for c in ec.embedding_configs()})
    hec.train(ec.training)
    return hec


def convert(
    model: nn.Module,
    fused_params: Optional[Dict[str, Any]] = None,
    options: OptionsArg = None,
    import_weights: bool = True,
) -> nn.Module:
    """Replaces every ``torchrec.EmbeddingBagCollection`` in ``model`` with a
    :class:`HashEmbeddingBagCollection`, and every ``torchrec.EmbeddingCollection``
    with a :class:`HashEmbeddingCollection`, in place.

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
    if isinstance(model, EmbeddingCollection):
        return convert_ec(model, fused_params, options, import_weights)
    for name, child in list(model.named_children()):
        if isinstance(child, EmbeddingBagCollection):
            setattr(model, name, convert_ebc(child, fused_params, options, import_weights))
        elif isinstance(child, EmbeddingCollection):
            setattr(model, name, convert_ec(child, fused_params, options, import_weights))
        else:
            convert(child, fused_params, options, import_weights)
    return model
