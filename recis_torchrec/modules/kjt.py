# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""KeyedJaggedTensor handling shared by the hash modules: validation with errors that name the
feature, variable batch sizes per feature (VBE), and a weighted-KJT-safe key permutation."""

from typing import List, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def checked_kjt(
    features: KeyedJaggedTensor, is_weighted: bool, who: str = "HashEmbeddingBagCollection", check_values: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
    """Validates a KJT for a hash-backed module; returns (values int64, offsets int64,
    weights or None, batch size). Errors name the features at fault.

    ``check_values=False`` leaves out the checks that read the lengths' values (a negative length,
    lengths that do not sum to the ids): the ops check those themselves, and skipping them keeps
    the forward free of data-dependent branches (fx, torch.export). Call :func:`explain_kjt`
    when an op fails, for the error that names the feature.

    Host synchronisation: with ``check_values`` on a GPU KJT, the checks read two values back (any
    negative length; the lengths' sum), each a sync of the current stream. The unsharded modules
    pass ``check_values=False`` (the ops' own checks read the F + 1 feature boundaries once);
    the sharded input dist keeps them (it reads the per-rank splits back for the all-to-all anyway)."""
    keys = features.keys()
    if features.variable_stride_per_key():
        raise ValueError(
            f"{who}: the KeyedJaggedTensor of features {keys} has a variable batch size per feature; "
            "pass it through uniform_batch() first"
        )
    values = features.values()
    if values.dtype == torch.int32:
        values = values.to(torch.int64)
    elif values.dtype != torch.int64:
        raise TypeError(
            f"{who}: ids of features {keys} must be int64 or int32, got {values.dtype}"
        )
    check_kjt_tensors(features, who)
    batch = features.stride()
    if check_values:
        explain_kjt(features, is_weighted, who)
    offsets = kjt_offsets(features)
    weights = None
    if is_weighted:
        weights = features.weights_or_none()
        if weights is None:
            raise ValueError(
                f"{who} is weighted (is_weighted=True) but the KeyedJaggedTensor of "
                f"features {keys} has no weights"
            )
        if weights.dtype != torch.float32:
            raise TypeError(
                f"{who}: weights of features {keys} must be float32, got {weights.dtype}"
            )
        weights = weights.contiguous()
    return values.contiguous(), offsets.contiguous(), weights, batch


def check_kjt_tensors(features: KeyedJaggedTensor, who: str) -> None:
    """The KJT's lengths, offsets and weights on its ids' device (a meta tensor among CPU ones reads
    whatever memory is there), lengths and offsets int32 or int64."""
    keys, device = features.keys(), features.values().device
    for what, t in (("lengths", features.lengths_or_none()), ("offsets", features.offsets_or_none()),
                    ("weights", features.weights_or_none())):
        if t is None:
            continue
        if t.device != device:
            raise ValueError(f"{who}: the KeyedJaggedTensor of features {keys} has its ids on {device} but its "
                             f"{what} on {t.device}")
        if what != "weights" and t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{who}: {what} of features {keys} must be int64 or int32, got {t.dtype}")


def check_unique_keys(features: KeyedJaggedTensor, who: str) -> None:
    """A user's KJT names each feature once (a repeated key would be read as whichever came first)."""
    keys = features.keys()
    if len(set(keys)) != len(keys):
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"{who}: the KeyedJaggedTensor names features {repeated} more than once (keys {keys})")


def kjt_offsets(features: KeyedJaggedTensor) -> torch.Tensor:
    """The KJT's offsets as int64: its own if it has them; else from the lengths, by FBGEMM's
    ``asynchronous_complete_cumsum`` on the CPU (as ``features.offsets()``) and by torch's cumsum
    on other devices, so that no FBGEMM op runs on a GPU tensor (``fbgemm-gpu-cpu`` has no CUDA
    kernels)."""
    offsets = features.offsets_or_none()
    if offsets is not None:
        return offsets.to(torch.int64)
    # Computed, never stored on the caller's KJT (``features.offsets()`` caches them): a program
    # exported after a forward would otherwise take the cached offsets as an input every later KJT
    # must carry.
    lengths = features.lengths()
    if features.device().type == "cpu":
        return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths).to(torch.int64)
    return offsets_from_lengths(lengths)


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``[0, cumsum(lengths)...]`` as int64, by torch ops on any device."""
    lengths = lengths.to(torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def uniform_batch(
    features: KeyedJaggedTensor, who: str
) -> Tuple[KeyedJaggedTensor, Optional[Tuple[List[str], torch.Tensor]]]:
    """A KJT with a variable batch size per feature (VBE) as one with every feature at the largest
    batch (bags past a feature's own batch are empty), plus its ``inverse_indices``; other KJTs as
    they are, with None. :func:`expand_batch` then gives every feature the output batch."""
    if not features.variable_stride_per_key():
        return features, None
    keys = features.keys()
    inverse = features.inverse_indices_or_none()
    if inverse is None:
        raise ValueError(
            f"{who}: the KeyedJaggedTensor of features {keys} has a variable batch size per feature but no "
            "inverse_indices; as for TorchRec's EBC, they map each feature's bags to the output's batch"
        )
    strides = features.stride_per_key()
    batch = max(strides) if strides else 0
    lengths = features.lengths()
    padded = torch.cat(
        [torch.cat([part, part.new_zeros(batch - part.numel())]) for part in lengths.split(strides)]
        or [lengths.new_zeros(0)]
    )
    missing = sorted({k.split("@")[0] for k in keys} - set(inverse[0]))
    if missing:
        raise ValueError(f"{who}: inverse_indices has no entry for features {missing} (it has {inverse[0]})")
    uniform = KeyedJaggedTensor(
        keys=keys, values=features.values(), weights=features.weights_or_none(), lengths=padded, stride=batch
    )
    return uniform, inverse


def expand_batch(
    pooled: torch.Tensor, outputs: List[Tuple[str, int, int]], inverse: Tuple[List[str], torch.Tensor]
) -> torch.Tensor:
    """Each output ``(embedding name, first column, dim)`` of ``pooled`` expanded to the output
    batch by its feature's inverse indices (``feature@table`` reads ``feature``'s), side by side."""
    index_of = {name: i for i, name in enumerate(inverse[0])}
    pieces = [
        pooled[:, col : col + dim].index_select(0, inverse[1][index_of[name.split("@")[0]]].to(torch.int64))
        for name, col, dim in outputs
    ]
    return torch.cat(pieces, dim=1) if pieces else pooled.new_zeros(inverse[1].shape[-1], 0)


def expand_kjt(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """A VBE KJT as a plain one at the output batch: feature k's bag b is its bag
    ``inverse_indices[k][b]`` (bags repeat; ``to_dict`` semantics are kept)."""
    keys = features.keys()
    inverse = features.inverse_indices()
    index_of = {name: i for i, name in enumerate(inverse[0])}
    strides = features.stride_per_key()
    lengths = features.lengths().to(torch.int64)
    starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])[:-1]
    base = 0
    bag_index = []
    for k, key in enumerate(keys):
        bag_index.append(inverse[1][index_of[key]].to(torch.int64) + base)
        base += strides[k]
    bags = torch.cat(bag_index) if bag_index else lengths.new_zeros(0)
    new_lengths = lengths[bags]
    first = torch.repeat_interleave(starts[bags], new_lengths)
    within = torch.arange(int(new_lengths.sum())) - torch.repeat_interleave(
        torch.cat([new_lengths.new_zeros(1), new_lengths.cumsum(0)])[:-1], new_lengths
    )
    index = first + within
    weights = features.weights_or_none()
    return KeyedJaggedTensor(
        keys=keys, values=features.values()[index], weights=weights[index] if weights is not None else None,
        lengths=new_lengths, stride=inverse[1].shape[-1],
    )


def permute_keys(features: KeyedJaggedTensor, permute: List[int]) -> KeyedJaggedTensor:
    """``features.permute(permute)`` (FBGEMM's ``permute_2D_sparse_data``) on the CPU; by torch
    ops instead on other devices (``fbgemm-gpu-cpu`` has no CUDA kernel for it) and with weights
    that require grad (the backward of FBGEMM's CPU op crashes, a segfault, on weighted KJTs)."""
    weights = features.weights_or_none()
    on_cpu = features.device().type == "cpu"
    if on_cpu and (weights is None or not weights.requires_grad):
        return features.permute(permute)
    return permute_keys_by_torch(features, permute)


def permute_keys_by_torch(features: KeyedJaggedTensor, permute: List[int]) -> KeyedJaggedTensor:
    """``features.permute(permute)`` by torch indexing, on any device, differentiable in the weights."""
    weights = features.weights_or_none()
    keys, batch = features.keys(), features.stride()
    bounds = features.offset_per_key()
    device = features.values().device
    index = torch.cat(
        [torch.arange(bounds[k], bounds[k + 1], dtype=torch.int64, device=device) for k in permute]
        or [torch.zeros(0, dtype=torch.int64, device=device)]
    )
    return KeyedJaggedTensor(
        keys=[keys[k] for k in permute],
        values=features.values()[index],
        weights=weights[index] if weights is not None else None,
        lengths=features.lengths().view(len(keys), batch)[permute].reshape(-1),
        stride=batch,
    )


def explain_kjt(features: KeyedJaggedTensor, is_weighted: bool, who: str) -> None:
    """Raises, naming the feature, if the KJT's lengths are inconsistent with its ids or weights."""
    keys = features.keys()
    values = features.values()
    batch = features.stride()
    lengths = features.lengths()
    if lengths.numel() != len(keys) * batch:
        raise ValueError(
            f"{who}: the KeyedJaggedTensor has {lengths.numel()} lengths for "
            f"{len(keys)} features {keys} and batch size {batch}"
        )
    if lengths.numel() and bool((lengths < 0).any()):
        first = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(
            f"{who}: feature {keys[first // batch]!r} has a negative length "
            f"({int(lengths[first])}) at batch index {first % batch}"
        )
    if lengths.numel() and bool((lengths > values.numel()).any()):  # (their int64 sum can wrap around)
        first = int(torch.nonzero(lengths > values.numel())[0, 0])
        raise ValueError(
            f"{who}: feature {keys[first // batch]!r} has a length of {int(lengths[first])} at batch index "
            f"{first % batch}, more than the {values.numel()} ids the KeyedJaggedTensor holds"
        )
    total = int(lengths.sum()) if lengths.numel() else 0
    if total != values.numel():
        per_key = dict(zip(keys, lengths.view(len(keys), batch).sum(1).tolist())) if batch else {}
        raise ValueError(
            f"{who}: the KeyedJaggedTensor's lengths sum to {total} but it holds "
            f"{values.numel()} ids; lengths per feature: {per_key}"
        )
    weights = features.weights_or_none()
    if is_weighted and weights is not None and weights.numel() != values.numel():
        raise ValueError(f"{who}: features {keys} have {weights.numel()} weights for {values.numel()} ids")
