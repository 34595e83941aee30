# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""TOML run configs for ``python -m recis_torchrec.train``.

A config has these sections (see ``examples/*.toml``)::

    [model]      name = "DLRM" | "DLRM_DCN" | "DeepFM" (torchrec.models) | "DIN" | "SequenceTransformer"
                 (recis_torchrec.models), embedding_dim,
                 dense_arch, over_arch (DLRM*), dcn_num_layers, dcn_low_rank_dim (DLRM_DCN),
                 hidden_layer_size, deep_fm_dimension (DeepFM),
                 target, history (the KJT keys of the target item and its behaviour sequence: one EC
                 table), max_length, top_arch, bf16, and attention_arch, pooling = "sum" | "softmax" (DIN)
                 or num_heads, num_layers, causal, pooling = "target" | "mean" (SequenceTransformer)
    [data]       source = "synthetic" | "files" | "movielens" (default: "files" when train, windows,
                 schema or format is given, else "synthetic"); batch_size;
                 synthetic: num_sparse, vocab_size, zipf_alpha, max_bag, eval_batches
                 files: train, eval (paths, dirs, globs or URIs; raw Criteo TSV is converted),
                        or windows (a list of paths, or a glob sorted by name: online learning),
                        format, shuffle, shuffle_buffer (rows), drop_last (false: every row trains each
                        epoch), schema = "criteo" or [data.schema] (recis_torchrec.io.Schema fields)
                 movielens: path (the ml-100k directory), eval_fraction
    [[features]] source (or left, right for a cross), name, ops = [{op = "hash", salt = true},
                 {op = "mod", modulus = ...}, {op = "bucketize", boundaries = [...]}, {op = "truncate",
                 max_length = N, side = "last"}, {op = "multi_hash", num_hashes = k}]: the model's KJT
                 keys, made by recis_torchrec.features.FeatureEngine in the loader (files, movielens)
    [tables]     num_embeddings (a capacity hint), [tables.options] (HashTableOptions fields)
    [optimizer]  dense = "adam" | "adagrad" | "sgd", dense_lr;
                 [optimizer.sparse] TorchRec fused_params (optimizer, learning_rate, eps, ...)
    [[tasks]]    name, label, weight (default: one task on the first label)
    [trainer]    TrainingArguments fields (output_dir, steps or epochs, eval_every, ...)

Every error names the key it is about, as ``[section].key``.
"""

import dataclasses
import glob
import os
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from recis_torchrec.features.spec import FeatureSpecError
from recis_torchrec.tables.options import HashTableOptions
from recis_torchrec.train.args import Task, TrainingArguments

MODELS = ("DLRM", "DLRM_DCN", "DeepFM", "DIN", "SequenceTransformer")
SOURCES = ("synthetic", "files", "movielens")
DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
_SECTIONS = ("model", "data", "features", "tables", "optimizer", "tasks", "trainer")


class ConfigError(ValueError):
    """A config value that is missing, unknown or out of range; names the key."""


def _section(cfg: Dict[str, Any], name: str) -> Dict[str, Any]:
    value = cfg.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config [{name}] must be a table")
    return value


def _check_keys(section: Dict[str, Any], allowed, where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"config {where}: unknown keys {unknown} (allowed: {sorted(allowed)})")


@dataclass
class Run:
    """Everything a config describes, built and ready for a Trainer."""

    model: nn.Module
    args: TrainingArguments
    train_data: Any
    eval_data: Any
    tasks: List[Task]
    dense_optimizer: Callable
    fused_params: Dict[str, Any]
    table_options: Optional[HashTableOptions]
    description: str
    windows: Optional[List[str]] = None  # names of the time windows; train_data is then their datasets


def load_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML ({e})") from None
    unknown = sorted(set(cfg) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"config: unknown sections {unknown} (allowed: {list(_SECTIONS)})")
    return cfg


def _int(section: Dict[str, Any], key: str, where: str, default: int, minimum: int = 1) -> int:
    value = section.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"config [{where}].{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _paths(data: Dict[str, Any], key: str, converted: str, rank: int) -> Union[str, List[str]]:
    """[data].<key>: one path or a list; raw Criteo TSV files become Parquet (once, on rank 0)."""
    from recis_torchrec.io.criteo import ensure_parquet

    value = data[key]
    if isinstance(value, str) and value:
        return ensure_parquet(value, converted, rank)
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return [ensure_parquet(v, converted, rank) for v in value]
    raise ConfigError(f"config [data].{key} must be a path or a list of paths, got {value!r}")


def _task_labels(tasks: List[Task], available: List[str], fixed: bool) -> List[str]:
    """The label column of each task, in task order.

    ``available`` are the data's label columns; with ``fixed`` (generated
    data) they cannot be reordered, so a named label must match its position.
    """
    out = []
    for i, t in enumerate(tasks):
        label = t.label
        if label is None:
            if i >= len(available):
                raise ConfigError(
                    f"config [[tasks]] #{i} ({t.name!r}).label: not set, and the data has only "
                    f"{len(available)} label columns {available}"
                )
            label = available[i]
        elif fixed and (i >= len(available) or available[i] != label):
            raise ConfigError(
                f"config [[tasks]] #{i} ({t.name!r}).label: {label!r} is not label column #{i} of the data "
                f"(it has {available}, in that order)"
            )
        out.append(label)
    if len(set(out)) != len(out):
        raise ConfigError(f"config [[tasks]]: two tasks share a label column ({out})")
    return out


def build_features(cfg: Dict[str, Any], passthrough: bool = True):
    """The ``[[features]]`` specs as a FeatureEngine (None without them); with ``passthrough``
    (``[data].passthrough``, default true) the schema's keys no spec reads stay in the KJT."""
    from recis_torchrec.features import FeatureEngine, spec_from_dict

    raw = cfg.get("features")
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise ConfigError("config [[features]] must be a non-empty array of tables")
    specs = []
    for i, d in enumerate(raw):
        try:
            specs.append(spec_from_dict(d))
        except (FeatureSpecError, TypeError, ValueError) as e:
            raise ConfigError(f"config [[features]] #{i}: {e}") from None
    try:
        return FeatureEngine(specs, passthrough=passthrough)
    except FeatureSpecError as e:
        raise ConfigError(f"config [[features]]: {e}") from None


FILE_KEYS = ("train", "windows", "schema", "format")


def data_source(data: Mapping[str, Any]) -> str:
    """[data].source as given; without one, "files" when the section names files or their schema
    (a [data.schema] was rejected as an unknown key of the synthetic source), else "synthetic"."""
    return data.get("source", "files" if any(k in data for k in FILE_KEYS) else "synthetic")


def build_data(cfg: Dict[str, Any], rank: int, world_size: int, work_dir: str, tasks: List[Task]):
    """(train data, eval data, sparse keys, dense count, label names, eval batches, description)."""
    from recis_torchrec.datasets import SyntheticClicks, SyntheticConfig
    from recis_torchrec.io import ColumnarDataset, ColumnError, Schema, SourceError, criteo_schema

    data = _section(cfg, "data")
    source = data_source(data)
    if source not in SOURCES:
        raise ConfigError(f"config [data].source: unknown source {source!r}; choose one of {list(SOURCES)}")
    batch = _int(data, "batch_size", "data", 512)
    passthrough = data.get("passthrough", True)
    if not isinstance(passthrough, bool):
        raise ConfigError(f"config [data].passthrough must be true or false, got {passthrough!r}")
    engine = build_features(cfg, passthrough)
    if source == "synthetic":
        if engine is not None:
            raise ConfigError("config [[features]]: feature specs apply to files and movielens data, not synthetic")
        _check_keys(
            data,
            {"source", "batch_size", "num_sparse", "vocab_size", "zipf_alpha", "max_bag", "eval_batches", "seed"},
            "[data]",
        )
        syn = SyntheticConfig(
            num_sparse=_int(data, "num_sparse", "data", 8),
            vocab_size=_int(data, "vocab_size", "data", 20_000),
            zipf_alpha=float(data.get("zipf_alpha", 1.1)),
            max_bag=_int(data, "max_bag", "data", 3),
            seed=int(data.get("seed", 0)),
        )
        if len(tasks) > 2:
            raise ConfigError(f"config [[tasks]]: synthetic data has two labels (click, conversion), not {len(tasks)}")
        labels = _task_labels(tasks, ["click", "conversion"], fixed=True)
        train = SyntheticClicks(syn, batch, stream_seed=2 * rank, num_tasks=len(tasks))
        held = SyntheticClicks(syn, batch, stream_seed=2 * rank + 1, num_tasks=len(tasks))
        return train, held, syn.feature_names(), syn.num_dense, labels, _int(
            data, "eval_batches", "data", 8
        ), "synthetic clicks", None

    if source == "movielens":
        from recis_torchrec.datasets.movielens import movielens_schema, prepare

        _check_keys(data, {"source", "batch_size", "path", "eval_fraction", "shuffle", "shuffle_buffer", "drop_last",
                           "passthrough"}, "[data]")
        if "path" not in data:
            raise ConfigError("config [data].path: the MovieLens-100k directory is required")
        out = os.path.join(work_dir, "movielens")
        fraction = data.get("eval_fraction", 0.2)
        if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"config [data].eval_fraction must be in (0, 1), got {fraction!r}")
        if not os.path.isdir(data["path"]):
            raise ConfigError(f"config [data].path: {data['path']} is not a directory")
        if rank == 0:
            try:
                prepare(data["path"], out, float(fraction))
            except FileNotFoundError as e:
                raise ConfigError(f"config [data].path: {e}") from None
        if world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        schema = movielens_schema()
        train_path, eval_path = os.path.join(out, "train.parquet"), os.path.join(out, "eval.parquet")
        description = f"MovieLens-100k from {data['path']}"
        window_names = None
    else:
        _check_keys(
            data, {"source", "batch_size", "train", "windows", "eval", "format", "schema", "shuffle", "shuffle_buffer",
                   "drop_last", "passthrough"},
            "[data]"
        )
        if ("train" in data) == ("windows" in data):
            raise ConfigError(
                "config [data].train: set the training files, or [data].windows (a sequence of time windows), "
                "not both, for source 'files'"
            )
        spec = data.get("schema", "criteo")
        if spec == "criteo":
            schema = criteo_schema()
        elif isinstance(spec, dict):
            try:
                schema = Schema(**spec)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config [data.schema]: {e}") from None
        else:
            raise ConfigError(f"config [data].schema must be 'criteo' or a table of Schema fields, got {spec!r}")
        converted = os.path.join(work_dir, "converted")
        if "windows" in data:
            windows = data["windows"]
            if isinstance(windows, str):
                matched = sorted(glob.glob(windows))
                if not matched:
                    raise ConfigError(f"config [data].windows: nothing matches {windows!r}")
                data = dict(data, windows=matched)
            window_paths = _paths(data, "windows", converted, rank)
            if isinstance(window_paths, str):
                window_paths = [window_paths]
            window_names = [os.path.basename(os.path.normpath(w)) for w in data["windows"]]
            train_path = None
            description = f"{len(window_paths)} windows {window_names[0]} .. {window_names[-1]}"
        else:
            train_path = _paths(data, "train", converted, rank)
            window_names = None
            description = f"files {data['train']}"
        eval_path = _paths(data, "eval", converted, rank) if data.get("eval") else None
    labels = _task_labels(tasks, list(schema.labels), fixed=False)
    schema = dataclasses.replace(schema, labels=labels)
    fmt = data.get("format")
    try:
        schema = _check_dense_scale(schema, train_path if train_path is not None else window_paths[0], fmt, rank)
    except (ColumnError, SourceError) as e:
        raise ConfigError(f"config [data]: {e}") from None
    shuffle = data.get("shuffle", True)
    drop_last = data.get("drop_last", False)
    for key, value in (("shuffle", shuffle), ("drop_last", drop_last)):
        if not isinstance(value, bool):
            raise ConfigError(f"config [data].{key} must be true or false, got {value!r}")
    shuffle_buffer = data.get("shuffle_buffer")
    if shuffle_buffer is not None and (not isinstance(shuffle_buffer, int) or isinstance(shuffle_buffer, bool)
                                       or shuffle_buffer <= 0):
        raise ConfigError(f"config [data].shuffle_buffer must be a positive integer (rows), got {shuffle_buffer!r}")
    # Training keeps every row by default: the rows past the last full round of batches form one
    # smaller last batch per rank (drop_last = true drops them, the same rows in every epoch).
    opts = dict(shuffle=shuffle, shuffle_buffer=shuffle_buffer, drop_last=drop_last, format=fmt, features=engine)
    try:
        if train_path is None:
            train = [ColumnarDataset(w, schema, batch, rank, world_size, **opts) for w in window_paths]
        else:
            train = ColumnarDataset(train_path, schema, batch, rank, world_size, **opts)
        held = (
            ColumnarDataset(
                eval_path, schema, batch, rank, world_size, drop_last=False, format=fmt, features=engine
            )
            if eval_path
            else None
        )
    except (ColumnError, SourceError) as e:
        raise ConfigError(f"config [data]: {e}") from None
    except FeatureSpecError as e:
        raise ConfigError(f"config [[features]]: {e}") from None
    for role, ds in [("training", t) for t in (train if isinstance(train, list) else [train])] + (
        [("eval", held)] if held is not None else []
    ):
        try:
            batches = len(ds)
        except ValueError as e:  # too few rows to give every rank a batch
            raise ConfigError(f"config [data].batch_size: {role} data: {e}") from None
        if batches == 0:
            shown = ", ".join(ds.paths[:3]) + (" ..." if len(ds.paths) > 3 else "")
            raise ConfigError(
                f"config [data].batch_size: {ds.num_rows} {role} rows ({shown}) make no full batch of {batch} "
                f"on each of {world_size} rank(s)"
            )
    keys = engine.output_keys(list(schema.sparse)) if engine is not None else list(schema.sparse)
    return train, held, keys, len(schema.dense), labels, None, description, window_names


# A raw dense value above this (in absolute value) makes TorchRec's dense arches diverge at their
# default learning rates (an Avazu-shaped column of counts reached a loss of 11,597 untransformed).
DENSE_SCALE_LIMIT = 1e3


def _check_dense_scale(schema, paths, fmt, rank: int):
    """The schema with the training files' ``dense_stats`` for columns to standardize (computed from
    them when not given); warns about raw dense columns whose scale would make training diverge."""
    import warnings

    from recis_torchrec.io import dense_stats

    if not schema.dense:
        return schema
    missing = [c for c in schema.dense if schema.transform_of(c) == "standardize" and c not in schema.dense_stats]
    stats = dense_stats(paths, schema, format=fmt, max_batches=None if missing else 16)
    if missing:
        try:
            schema = dataclasses.replace(schema, dense_stats={**schema.dense_stats, **{c: stats[c][:2] for c in missing}})
        except ValueError as e:
            raise ConfigError(f"config [data.schema].dense_transform: the training files' statistics: {e}") from None
    big = {c: stats[c][2] for c in schema.dense if schema.transform_of(c) == "none" and stats[c][2] > DENSE_SCALE_LIMIT}
    if big and rank == 0:
        shown = ", ".join(f"{c!r} (|x| up to {v:.3g})" for c, v in big.items())
        warnings.warn(
            f"config [data]: dense columns {shown} are unscaled; inputs this large make the dense layers diverge. "
            "Set [data.schema].dense_transform for them, e.g. dense_transform = {" + ", ".join(
                f'{c} = "log1p"' for c in big) + '} (or "standardize")',
            stacklevel=2,
        )
    return schema


def build_model(cfg: Dict[str, Any], keys: List[str], num_dense: int, num_tasks: int) -> nn.Module:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.deepfm import SimpleDeepFMNN
    from torchrec.models.dlrm import DLRM, DLRM_DCN

    m = _section(cfg, "model")
    name = m.get("name", "DLRM")
    if name not in MODELS:
        raise ConfigError(f"config [model].name: unknown model {name!r}; choose one of {list(MODELS)}")
    dim = _int(m, "embedding_dim", "model", 16)
    tables_cfg = _section(cfg, "tables")
    hint = _int(tables_cfg, "num_embeddings", "tables", 100_000)
    if name in ("DIN", "SequenceTransformer"):
        return _sequence_model(name, m, keys, num_dense, num_tasks, dim, hint)
    tables = [
        EmbeddingBagConfig(name=f"t_{k}", embedding_dim=dim, num_embeddings=hint, feature_names=[k]) for k in keys
    ]
    ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
    if name == "DeepFM":
        _check_keys(m, {"name", "embedding_dim", "hidden_layer_size", "deep_fm_dimension"}, "[model]")
        if num_tasks != 1:
            raise ConfigError("config [model].name: DeepFM has one output; it cannot serve several [[tasks]]")
        return SimpleDeepFMNN(
            num_dense_features=num_dense,
            embedding_bag_collection=ebc,
            hidden_layer_size=_int(m, "hidden_layer_size", "model", 64),
            deep_fm_dimension=_int(m, "deep_fm_dimension", "model", 8),
        )
    allowed = {"name", "embedding_dim", "dense_arch", "over_arch"}
    if name == "DLRM_DCN":
        allowed |= {"dcn_num_layers", "dcn_low_rank_dim"}
    _check_keys(m, allowed, "[model]")
    dense_arch = list(m.get("dense_arch", [64, dim]))
    if not dense_arch or dense_arch[-1] != dim:
        raise ConfigError(f"config [model].dense_arch must end with embedding_dim ({dim}), got {dense_arch}")
    over_arch = list(m.get("over_arch", [64, 32])) + [num_tasks]
    kwargs = dict(
        embedding_bag_collection=ebc,
        dense_in_features=max(num_dense, 1),
        dense_arch_layer_sizes=dense_arch,
        over_arch_layer_sizes=over_arch,
    )
    if name == "DLRM_DCN":
        model = DLRM_DCN(
            **kwargs,
            dcn_num_layers=_int(m, "dcn_num_layers", "model", 2),
            dcn_low_rank_dim=_int(m, "dcn_low_rank_dim", "model", 8),
        )
    else:
        model = DLRM(**kwargs)
    return model if num_dense >= 1 else ConstantDense(model)


def _sequence_model(name: str, m: Dict[str, Any], keys: List[str], num_dense: int, num_tasks: int, dim: int,
                    hint: int) -> nn.Module:
    """DIN or SequenceTransformer: the target and history keys in one EC table, the other keys in an EBC."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig

    from recis_torchrec.models import DIN, SequenceTransformer

    common = {"name", "embedding_dim", "target", "history", "max_length", "top_arch", "bf16", "pooling"}
    own = {"attention_arch"} if name == "DIN" else {"num_heads", "num_layers", "causal"}
    _check_keys(m, common | own, "[model]")
    for key in ("target", "history"):
        if key not in m:
            raise ConfigError(f"config [model].{key}: {name} needs the KJT key of the {key} (one of {keys})")
        if m[key] not in keys:
            raise ConfigError(f"config [model].{key}: {m[key]!r} is not a sparse key of the data ({keys})")
    if m["target"] == m["history"]:
        raise ConfigError("config [model]: target and history must be different keys")
    ec = EmbeddingCollection(
        [EmbeddingConfig(name=f"t_{m['target']}", embedding_dim=dim, num_embeddings=hint,
                         feature_names=[m["target"], m["history"]])],
        device=torch.device("meta"),
    )
    rest = [k for k in keys if k not in (m["target"], m["history"])]
    ebc = EmbeddingBagCollection(
        [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=dim, num_embeddings=hint, feature_names=[k]) for k in rest],
        device=torch.device("meta"),
    ) if rest else None
    top = m.get("top_arch", [64, 32])
    if not isinstance(top, list) or not all(isinstance(x, int) and x > 0 for x in top):
        raise ConfigError(f"config [model].top_arch must be a list of positive integers, got {top!r}")
    kw = dict(max_length=_int(m, "max_length", "model", 50), dense_in_features=num_dense, top_arch=top,
              num_tasks=num_tasks, embedding_bag_collection=ebc, bf16=bool(m.get("bf16", False)))
    try:
        if name == "DIN":
            pooling = m.get("pooling", "sum")
            if pooling not in ("sum", "softmax"):
                raise ConfigError(f"config [model].pooling: DIN pools its attention by 'sum' or 'softmax', got {pooling!r}")
            return DIN(ec, m["target"], m["history"], attention_arch=m.get("attention_arch", [64, 16]),
                       softmax=pooling == "softmax", **kw)
        causal = m.get("causal", True)
        if not isinstance(causal, bool):
            raise ConfigError(f"config [model].causal must be true or false, got {causal!r}")
        return SequenceTransformer(ec, m["target"], m["history"], num_heads=_int(m, "num_heads", "model", 2),
                                   num_layers=_int(m, "num_layers", "model", 1), causal=causal,
                                   pooling=m.get("pooling", "target"), **kw)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config [model]: {e}") from None


class ConstantDense(nn.Module):
    """A model with a dense input (TorchRec's DLRM) on data without dense columns: its dense
    input is one constant column of ones (so its dense arch learns a bias vector)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense_features: torch.Tensor, sparse_features):
        return self.model(dense_features.new_ones(dense_features.shape[0], 1), sparse_features)


def apply_overrides(cfg: Dict[str, Any], overrides: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """`cfg` with ``{"section.key": value}`` overrides applied (a new dict; `cfg` is not modified)."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    for dotted, value in (overrides or {}).items():
        if "." not in dotted:  # a whole section
            if dotted not in _SECTIONS:
                raise ConfigError(f"override {dotted}: no such section (sections: {list(_SECTIONS)})")
            cfg[dotted] = value
            continue
        *path, key = dotted.split(".")
        node = cfg
        for i, part in enumerate(path):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: [{'.'.join(path[: i + 1])}] is not a table")
            node[part] = child = dict(child)  # never modify the caller's config
            node = child
        node[key] = value
    return cfg


# Settings a resumed run may change: where the data comes from and how it is batched, the learning
# rates, and everything in [trainer] (steps, epochs, logging, cadence). Any other difference from the
# checkpoint's config shapes the model or what it learns, and a resume refuses it.
RESUME_SAFE = ("trainer.", "data.train", "data.windows", "data.eval", "data.path", "data.format", "data.batch_size",
               "data.shuffle", "data.eval_batches", "data.eval_fraction", "data.seed", "data.zipf_alpha",
               "data.max_bag", "data.vocab_size", "optimizer.dense_lr", "optimizer.sparse.learning_rate")


def _flat(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict):
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        if prefix.startswith("data.schema."):  # features are built in the order their keys are written
            out[f"{prefix}<order>"] = list(value)
        return out
    return {prefix[:-1]: value}


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """The differences between two configs (each with its overrides applied) as ``"key: old -> new"``:
    (those that shape the model or its training, those a resume may make)."""
    a, b = _flat(old), _flat(new)
    shaping, safe = [], []
    for key in sorted(set(a) | set(b), key=lambda k: (k.endswith("<order>"), k)):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        if key.endswith("<order>"):
            if sorted(a.get(key, [])) != sorted(b.get(key, [])):
                continue  # a key added or removed: reported under its own name
            key_name = key[: -len(".<order>")]
            line = f"the order of [{key_name}]: {a[key]} -> {b[key]}"
        else:
            key_name = key
            line = f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
        (safe if key_name.startswith(RESUME_SAFE) else shaping).append(line)
    return shaping, safe


def build_run(
    cfg: Dict[str, Any], rank: int = 0, world_size: int = 1, overrides: Optional[Dict[str, Any]] = None
) -> Run:
    """Builds the model, data, optimizers and TrainingArguments a config describes."""
    cfg = apply_overrides(cfg, overrides)

    raw_tasks = cfg.get("tasks", [{"name": "ctr"}])
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise ConfigError("config [[tasks]] must be a non-empty array of tables")
    tasks = []
    for i, t in enumerate(raw_tasks):
        try:
            tasks.append(Task(**t))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config [[tasks]] #{i}: {e}") from None

    trainer = dict(_section(cfg, "trainer"))
    trainer.setdefault("output_dir", "runs/default")
    try:
        args = TrainingArguments.from_dict(trainer)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config [trainer]: {e}") from None

    train, held, keys, num_dense, labels, eval_batches, description, window_names = build_data(
        cfg, rank, world_size, args.output_dir, tasks
    )
    tasks = [dataclasses.replace(t, label=label) for t, label in zip(tasks, labels)]
    if eval_batches is not None and args.eval_batches is None:
        args = dataclasses.replace(args, eval_batches=eval_batches)
    from recis_torchrec.train.trainer import seed_all

    seed_all(args.seed)  # the dense layers' initial weights: the same on every rank and every run
    model = build_model(cfg, keys, num_dense, len(tasks))

    opt = _section(cfg, "optimizer")
    _check_keys(opt, {"dense", "dense_lr", "sparse"}, "[optimizer]")
    dense_name = opt.get("dense", "adam")
    if dense_name not in DENSE_OPTIMIZERS:
        raise ConfigError(f"config [optimizer].dense: unknown optimizer {dense_name!r}; choose {list(DENSE_OPTIMIZERS)}")
    lr = float(opt.get("dense_lr", 1e-3))
    if not lr > 0:
        raise ConfigError(f"config [optimizer].dense_lr must be > 0, got {lr}")
    cls = DENSE_OPTIMIZERS[dense_name]
    fused = dict(opt.get("sparse", {"optimizer": "exact_row_wise_adagrad", "learning_rate": 0.05}))
    from recis_torchrec.optim.fused import parse_fused_params

    try:
        parse_fused_params(fused)
    except ValueError as e:
        raise ConfigError(f"config [optimizer.sparse]: {e}") from None

    options = None
    raw_options = _section(cfg, "tables").get("options")
    if raw_options is not None:
        try:
            options = HashTableOptions.from_dict(raw_options)
        except (TypeError, ValueError, NotImplementedError) as e:
            raise ConfigError(f"config [tables.options]: {e}") from None

    return Run(
        model=model,
        args=args,
        train_data=train,
        eval_data=held,
        tasks=tasks,
        dense_optimizer=lambda params: cls(params, lr=lr),
        fused_params=fused,
        table_options=options,
        description=description,
        windows=window_names,
    )


__all__ = ["ConfigError", "MODELS", "Run", "build_run", "load_config"]
