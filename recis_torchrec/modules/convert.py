# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``convert``: swap every TorchRec ``EmbeddingBagCollection`` and ``EmbeddingCollection`` in a model
for a hash-backed one."""

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recis_torchrec.modules.hash_embedding_bag import HashEmbeddingBagCollection
from recis_torchrec.tables.options import OptionsArg
from recis_torchrec.tables.state_dict import import_rows
from recis_torchrec.modules.hash_embedding_collection import HashEmbeddingCollection
from recis_torchrec.optim.in_backward import in_backward_by_table


def convert_ebc(
    ebc: EmbeddingBagCollection,
    fused_params: Optional[Dict[str, Any]] = None,
    options: OptionsArg = None,
    import_weights: bool = True,
    device: Optional[torch.device] = None,
) -> HashEmbeddingBagCollection:
    """A ``HashEmbeddingBagCollection`` with ``ebc``'s configs (and, with
    ``import_weights``, its weights: row i of each table becomes id i), on ``device`` (None: CPU)."""
    hebc = HashEmbeddingBagCollection(
        tables=ebc.embedding_bag_configs(),
        is_weighted=ebc.is_weighted(),
        device=device,
        fused_params=fused_params,
        options=options,
        table_fused_params=in_backward_by_table(ebc, "embedding_bags", "convert: EmbeddingBagCollection"),
    )
    if import_weights:
        import_rows(hebc.tables(), {c.name: ebc.embedding_bags[c.name].weight for c in ebc.embedding_bag_configs()})
    hebc.train(ebc.training)
    return hebc


def convert_ec(
    ec: EmbeddingCollection,
    fused_params: Optional[Dict[str, Any]] = None,
    options: OptionsArg = None,
    import_weights: bool = True,
    share_tables_with: Optional[nn.Module] = None,
    device: Optional[torch.device] = None,
) -> HashEmbeddingCollection:
    """A ``HashEmbeddingCollection`` with ``ec``'s configs and ``need_indices`` (and, with
    ``import_weights``, its weights: row i of each table becomes id i)."""
    hec = HashEmbeddingCollection(
        tables=ec.embedding_configs(),
        device=device,
        need_indices=ec.need_indices(),
        fused_params=fused_params,
        options=options,
        share_tables_with=share_tables_with,
        table_fused_params=in_backward_by_table(ec, "embeddings", "convert: EmbeddingCollection"),
    )
    if import_weights:
        own = hec.tables()
        import_rows(own, {c.name: ec.embeddings[c.name].weight for c in ec.embedding_configs() if c.name in own})
    hec.train(ec.training)
    return hec


def convert(
    model: nn.Module,
    fused_params: Optional[Dict[str, Any]] = None,
    options: OptionsArg = None,
    import_weights: bool = True,
    share_tables: bool = False,
    device: Optional[torch.device] = None,
) -> nn.Module:
    """Replaces every ``torchrec.EmbeddingBagCollection`` in ``model`` with a
    :class:`HashEmbeddingBagCollection`, and every ``torchrec.EmbeddingCollection``
    with a :class:`HashEmbeddingCollection`, in place.

    Args:
        model: any module; if it is itself an EBC or EC, the replacement is returned.
        fused_params: the sparse optimizer of the new tables (TorchRec keys). An optimizer set on a
            table's weight with ``apply_optimizer_in_backward`` takes effect too (merged with
            ``fused_params``; a key both give must agree).
        options: ``HashTableOptions`` for every table, or a dict by table name.
        import_weights: copy each table's rows in, row i as id i, so the
            converted model computes what the original did on ids below
            ``num_embeddings``.
        share_tables: an EC table with the same name as an EBC table is that
            table (one id space, one set of rows; the EBC owns it, and its
            weights are the ones imported). Each EC may share with one EBC.
        device: where the new tables live: None or ``"cpu"``, or ``"cuda"``
            (CUDA tables; needs a ``RECIS_CUDA=1`` build and a GPU).

    Returns:
        The model (or the replacement, when ``model`` is an EBC or EC).
    """
    if isinstance(model, EmbeddingBagCollection):
        return convert_ebc(model, fused_params, options, import_weights, device)
    if isinstance(model, EmbeddingCollection):
        return convert_ec(model, fused_params, options, import_weights, device=device)
    found: List[Tuple[nn.Module, str, nn.Module]] = []

    def walk(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (EmbeddingBagCollection, EmbeddingCollection)):
                found.append((module, name, child))
            else:
                walk(child)

    walk(model)
    # Bag modules first, so that the sequence modules can share their tables.
    owners: Dict[str, HashEmbeddingBagCollection] = {}
    for parent, name, child in found:
        if isinstance(child, EmbeddingBagCollection):
            hebc = convert_ebc(child, fused_params, options, import_weights, device)
            setattr(parent, name, hebc)
            if share_tables:
                for table in hebc.tables():
                    owners.setdefault(table, hebc)
    for parent, name, child in found:
        if isinstance(child, EmbeddingCollection):
            share_with = None
            if share_tables:
                mine = {c.name for c in child.embedding_configs()} & set(owners)
                modules = {id(owners[t]): owners[t] for t in mine}
                if len(modules) > 1:
                    raise ValueError(
                        f"convert: EmbeddingCollection {name!r} shares tables {sorted(mine)} with several "
                        "EmbeddingBagCollections; one EC can share with one EBC"
                    )
                share_with = next(iter(modules.values()), None)
            setattr(parent, name, convert_ec(child, fused_params, options, import_weights, share_with, device))
    return model
