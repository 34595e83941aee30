# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""TorchRec's ``apply_optimizer_in_backward`` on our tables: the optimizer a table's weight asks for.

``torchrec.optim.apply_optimizer_in_backward(cls, params, kwargs)`` (torch's
``_apply_optimizer_in_backward``) tags each parameter with ``_optimizer_classes`` and
``_optimizer_kwargs``. TorchRec's sharders read those tags from an EBC's table weights and
turn them into FBGEMM ``fused_params`` (``torchrec.distributed.utils.optimizer_type_to_emb_opt_type``
plus ``lr`` -> ``learning_rate``). We read the same tags, when ``rt.convert`` converts an EBC/EC
and when our sharders shard one, and translate them into our fused optimizer:

| class | fused optimizer |
|---|---|
| ``torch.optim.SGD``, ``torchrec.optim.SGD`` | ``EXACT_SGD`` |
| ``torch.optim.Adagrad``, ``torchrec.optim.Adagrad`` | ``EXACT_ADAGRAD`` |
| ``torchrec.optim.RowWiseAdagrad`` | ``EXACT_ROWWISE_ADAGRAD`` |
| ``torch.optim.Adam``, ``torchrec.optim.Adam`` | ``ADAM`` |
| ``torch.optim.AdamW`` | ``ADAM`` with ``WeightDecayMode.DECOUPLE`` (TorchRec does not map it) |

Keyword arguments take effect or raise: ``lr``, ``eps``, ``betas`` and ``weight_decay``
(torch's meaning: L2 for SGD/Adagrad/Adam, decoupled for AdamW or
``decoupled_weight_decay=True``) become their fused equivalents; keys of ``fused_params``
(``learning_rate``, ``beta1``, ``weight_decay_mode``, ..., which TorchRec's wrapper classes accept)
pass through; arguments with no fused equivalent (``momentum``, ``nesterov``, ``amsgrad``,
``lr_decay``, ``initial_accumulator_value``, ``maximize``) are accepted only at their neutral
value; ``foreach``, ``fused``, ``capturable`` and ``differentiable`` choose how a dense step runs
and do not change the update, so they are accepted. Arguments not given take FBGEMM's defaults,
as TorchRec does (so ``torch.optim.Adagrad`` without ``eps`` gets 1e-8, not torch's 1e-10), except
for AdamW, whose ``weight_decay`` defaults to torch's 0.01. TorchRec passes ``weight_decay`` to
FBGEMM without a mode, which ignores it; here it takes effect.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from recis_torchrec.optim.fused import SparseOptimizerConfig, WeightDecayMode, parse_fused_params
from recis_torchrec.optim.registry import BY_EMB_OPTIM_TYPE, HYPERPARAMETERS, OPTIMIZERS, optimizer_classes


# Arguments with no fused equivalent, accepted at their neutral value only.
_NEUTRAL = {
    "momentum": 0.0,
    "dampening": 0.0,
    "nesterov": False,
    "amsgrad": False,
    "lr_decay": 0.0,
    "initial_accumulator_value": 0.0,
    "maximize": False,
}
# Arguments that choose how a dense optimizer's step runs, not what it computes.
_IMPLEMENTATION = {"foreach", "fused", "capturable", "differentiable"}
_FUSED_KEYS = {"optimizer", "weight_decay_mode", *HYPERPARAMETERS}


def _as_float(where: str, name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def fused_params_from_optimizer(optimizer_class: type, kwargs: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """The ``fused_params`` equivalent of ``optimizer_class(params, **kwargs)`` (see the module
    docstring); raises, naming the class and argument, for what cannot be fused."""
    definition = optimizer_classes().get(optimizer_class)
    name = f"{getattr(optimizer_class, '__module__', '')}.{getattr(optimizer_class, '__name__', optimizer_class)}"
    if definition is None:
        raise ValueError(
            f"{where}: apply_optimizer_in_backward({name}) cannot be fused into hash tables; supported: "
            + ", ".join(sorted(c for d in OPTIMIZERS.values() for c in d.optimizer_classes))
        )
    where = f"{where}: apply_optimizer_in_backward({name})"
    target = definition.emb_optim_types[0]
    out: Dict[str, Any] = {"optimizer": target}
    adamw = optimizer_class is torch.optim.AdamW
    decoupled = adamw
    weight_decay: Optional[float] = 0.01 if adamw else None  # torch's AdamW default
    for key, value in kwargs.items():
        if key == "lr":
            out["learning_rate"] = _as_float(where, key, value)
        elif key == "betas":
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {value!r}")
            out["beta1"], out["beta2"] = (_as_float(where, "betas", b) for b in value)
        elif key == "weight_decay":
            weight_decay = _as_float(where, key, value)
        elif key == "decoupled_weight_decay" and definition.name == "adam":
            decoupled = decoupled or bool(value)
        elif key in definition.hyperparameters:  # e.g. LarsSGD's momentum, which plain SGD has no fused form of
            out[key] = _as_float(where, key, value)
        elif key in _NEUTRAL:
            if value != _NEUTRAL[key]:
                raise ValueError(
                    f"{where}: {key}={value!r} has no fused equivalent on hash tables (only {key}={_NEUTRAL[key]!r})"
                )
        elif key in _IMPLEMENTATION:
            continue
        elif key in _FUSED_KEYS:
            out[key] = value
        else:
            raise ValueError(f"{where}: argument {key!r} is not supported on hash tables")
    if weight_decay is not None and "weight_decay" not in out:
        out["weight_decay"] = weight_decay
        if weight_decay != 0.0 and "weight_decay_mode" not in out and "weight_decay_mode" in definition.hyperparameters:
            out["weight_decay_mode"] = WeightDecayMode.DECOUPLE if decoupled else WeightDecayMode.L2
    optim = out["optimizer"]
    if not isinstance(optim, EmbOptimType):
        optim = parse_fused_params({"optimizer": optim}).optimizer
    if BY_EMB_OPTIM_TYPE[optim] is not definition:
        raise ValueError(f"{where}: optimizer={out['optimizer']!r} contradicts the optimizer class")
    return out


def in_backward_fused_params(param: Any, where: str) -> Optional[Dict[str, Any]]:
    """The ``fused_params`` that ``apply_optimizer_in_backward`` attached to a table weight, or None."""
    classes = getattr(param, "_optimizer_classes", None)
    if not classes:
        return None
    kwargs = getattr(param, "_optimizer_kwargs", [{}] * len(classes))
    if len(classes) != 1 or len(kwargs) != 1:
        raise ValueError(
            f"{where}: apply_optimizer_in_backward was applied {len(classes)} times "
            f"({[getattr(c, '__name__', c) for c in classes]}); a table takes one optimizer"
        )
    return fused_params_from_optimizer(classes[0], kwargs[0], where)


def merge_fused_params(
    fused_params: Optional[Mapping[str, Any]], in_backward: Optional[Mapping[str, Any]], where: str
) -> Optional[Mapping[str, Any]]:
    """One table's fused parameters from the module's ``fused_params`` and its weight's
    in-backward optimizer: keys given by one take effect; a key given by both with different
    values is an error."""
    if in_backward is None:
        return fused_params
    if fused_params is None:
        return in_backward
    if isinstance(fused_params, SparseOptimizerConfig):
        fused_params = dataclasses.asdict(fused_params)
    for key in set(in_backward) & set(fused_params):
        a, b = _normalized(key, in_backward[key]), _normalized(key, fused_params[key])
        if a != b:
            raise ValueError(
                f"{where}: fused_params[{key!r}]={fused_params[key]!r} disagrees with "
                f"apply_optimizer_in_backward's {in_backward[key]!r}; give the optimizer once"
            )
    merged = dict(fused_params)
    merged.update(in_backward)
    return merged


def _normalized(key: str, value: Any) -> Any:
    """A fused_params value in a comparable form (an optimizer by its code: EXACT_ROWWISE_ADAGRAD and
    ROWWISE_ADAGRAD are one optimizer)."""
    if key == "optimizer":
        return parse_fused_params({"optimizer": value}).code
    if key == "weight_decay_mode":
        return WeightDecayMode(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def in_backward_by_table(module: torch.nn.Module, section: str, where: str) -> Dict[str, Dict[str, Any]]:
    """The in-backward optimizers of a TorchRec EBC's (``section="embedding_bags"``) or EC's
    (``"embeddings"``) tables, as ``fused_params`` by table name (tables without one are left out)."""
    tables = getattr(module, section, None)
    out: Dict[str, Dict[str, Any]] = {}
    if tables is None:
        return out
    for name, sub in tables.items():
        found = in_backward_fused_params(getattr(sub, "weight", None), f"{where} table {name!r}")
        if found is not None:
            out[name] = found
    return out


def table_optimizers(
    names, fused_params: Optional[Mapping[str, Any]], table_fused_params: Optional[Mapping[str, Mapping[str, Any]]],
    where: str,
) -> Dict[str, SparseOptimizerConfig]:
    """Each table's fused optimizer: ``fused_params``, merged with the table's entry of
    ``table_fused_params`` (keys both give must agree)."""
    table_fused_params = dict(table_fused_params or {})
    unknown = sorted(set(table_fused_params) - set(names))
    if unknown:
        raise ValueError(f"{where}: table_fused_params names tables {unknown} that are not in it ({list(names)})")
    return {
        n: parse_fused_params(merge_fused_params(fused_params, table_fused_params.get(n), f"{where} table {n!r}"))
        for n in names
    }
