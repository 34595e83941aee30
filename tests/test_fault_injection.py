# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Bad inputs, one row each: the exception's type and that its message names the culprit (the
feature, option, table, file or key at fault). Nothing may be accepted, crash or hang."""

import json
import math
import os

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor

import recis_torchrec as rt
from recis_torchrec.io import ColumnarDataset, Schema

CFG = [EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=10, feature_names=["f0", "f1"])]


def ebc(**kw):
    return rt.HashEmbeddingBagCollection(CFG, **kw)


def ec():
    return rt.HashEmbeddingCollection([EmbeddingConfig(name="e", embedding_dim=4, num_embeddings=10,
                                                       feature_names=["s"])])


def dlrm():
    from torchrec.models.dlrm import DLRM

    return DLRM(ebc(), 2, [4], [4, 1])


def kjt(keys, values, lengths, weights=None):
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def bag(o):
    return lambda: rt.HashTableOptions(**o)


def fused(p):
    return lambda: ebc(fused_params=p)


def cfg(**kw):
    base = dict(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])
    base.update(kw)
    return lambda: rt.HashEmbeddingBagCollection([EmbeddingBagConfig(**base)])


L = torch.tensor
I64 = torch.int64
CASES = [
    # -- KJTs into the EBC ---------------------------------------------------------------------------
    ("kjt missing feature", lambda: ebc()(kjt(["f0"], L([1]), L([1]))), KeyError, "'f1'.*missing"),
    ("kjt duplicate keys", lambda: ebc()(kjt(["f0", "f0", "f1"], L([1, 2, 3]), L([1, 1, 1]))), ValueError,
     r"\['f0'\] more than once"),
    ("kjt float ids", lambda: ebc()(kjt(["f0", "f1"], L([1.0, 2.0]), L([1, 1]))), TypeError, "int64 or int32"),
    ("kjt lengths short", lambda: ebc()(kjt(["f0", "f1"], L([1, 2, 3]), L([1, 1]))), ValueError, "sum to 2"),
    ("kjt negative length", lambda: ebc()(kjt(["f0", "f1"], L([1]), L([2, -1]))), ValueError,
     "'f1' has a negative length"),
    ("kjt lengths on meta", lambda: ebc()(kjt(["f0", "f1"], L([1, 2]), torch.ones(2, dtype=I64, device="meta"))),
     ValueError, "has its ids on cpu but its lengths on meta"),
    ("kjt weights on meta", lambda: ebc(is_weighted=True)(kjt(["f0", "f1"], L([1, 2]), L([1, 1]),
                                                              torch.ones(2, device="meta"))),
     ValueError, "its weights on meta"),
    ("kjt int16 lengths", lambda: ebc()(kjt(["f0", "f1"], L([1, 2]), L([1, 1], dtype=torch.int16))), TypeError,
     "lengths of features .* must be int64 or int32, got torch.int16"),
    ("ec lengths on meta", lambda: ec()(kjt(["s"], L([1, 2]), torch.ones(2, dtype=I64, device="meta"))), ValueError,
     "its lengths on meta"),
    ("kjt weights missing", lambda: ebc(is_weighted=True)(kjt(["f0", "f1"], L([1, 2]), L([1, 1]))), ValueError,
     "no weights"),
    ("kjt weights dtype", lambda: ebc(is_weighted=True)(kjt(["f0", "f1"], L([1, 2]), L([1, 1]),
                                                            L([1.0, 2.0], dtype=torch.float64))), TypeError, "float32"),
    ("kjt weights count", lambda: ebc(is_weighted=True)(kjt(["f0", "f1"], L([1, 2]), L([1, 1]), L([1.0]))),
     (ValueError, RuntimeError), "weight"),
    ("kjt not a kjt", lambda: ebc()(torch.tensor([1, 2])), (TypeError, AttributeError), "KeyedJaggedTensor|keys"),
    ("ec missing feature", lambda: ec()(kjt(["x"], L([1]), L([1]))), KeyError, "'s'.*missing"),
    ("ec duplicate keys", lambda: ec()(kjt(["s", "s"], L([1, 2]), L([1, 1]))), ValueError, r"\['s'\] more than once"),
    ("ec float ids", lambda: ec()(kjt(["s"], L([1.5]), L([1]))), TypeError, "int64 or int32"),
    ("ec lengths", lambda: ec()(kjt(["s"], L([1, 2]), L([1]))), (ValueError, RuntimeError), "'s'|lengths"),
    # -- casts and moves of a model holding our modules reach them (nn.Module._apply) ----------------
    ("model.half() holding a hash EBC", lambda: dlrm().half(), RuntimeError,
     r"a cast or move of a model holding a HashEmbeddingBagCollection .* reached it: .*to\(torch.float16\)"),
    ("model.double() holding a hash EBC", lambda: dlrm().double(), RuntimeError, r"to\(torch.float64\)"),
    ("model.to(float16) holding a hash EBC", lambda: dlrm().to(torch.float16), RuntimeError, r"to\(torch.float16\)"),
    ("model.to(meta) holding a hash EBC", lambda: dlrm().to("meta"), RuntimeError, "would drop its rows"),
    ("model.half() with a dense layer first", lambda: torch.nn.Sequential(torch.nn.Linear(2, 2), ebc()).half(),
     RuntimeError, r"reached before it were converted and stay so \(0\)"),
    ("ec negative length", lambda: ec()(kjt(["s"], L([1, 2, 3, 4]), L([3, -1, 1, 1]))), ValueError,
     "'s' has a negative length"),
    ("ec negative length, eval", lambda: ec().eval()(kjt(["s"], L([1, 2, 3, 4]), L([3, -1, 1, 1]))), ValueError,
     "'s' has a negative length"),
    ("ec lengths overflow int64", lambda: ec()(kjt(["s"], torch.empty(0, dtype=I64), L([2**62] * 4))), ValueError,
     "'s' has a length of 4611686018427387904"),
    ("ebc lengths overflow int64", lambda: ebc()(kjt(["f0", "f1"], torch.empty(0, dtype=I64), L([2**62] * 4))),
     (ValueError, RuntimeError), "feature|f0"),
    ("table too big to reserve", lambda: rt.HashTable("big", 64, 0, rt.HashTableOptions(initial_capacity=10**13)),
     MemoryError, "'big': initial_capacity=10,000,000,000,000 rows"),
    # -- table configs -------------------------------------------------------------------------------
    # (init bounds given: TorchRec's config itself divides by num_embeddings to default them)
    ("cfg num_embeddings 0", cfg(num_embeddings=0, weight_init_min=-0.1, weight_init_max=0.1), ValueError,
     "'t': num_embeddings must be a positive int"),
    ("cfg num_embeddings < 0", cfg(num_embeddings=-3, weight_init_min=-0.1, weight_init_max=0.1), ValueError,
     "'t': num_embeddings must be a positive int"),
    ("cfg dim 0", cfg(embedding_dim=0), ValueError, "'t': embedding_dim"),
    ("cfg feature twice", cfg(feature_names=["f", "f"]), ValueError, r"'t': feature_names lists \['f'\]"),
    ("cfg not a config", lambda: rt.HashEmbeddingBagCollection([{"name": "t"}]), TypeError,
     r"tables\[0\] must be a EmbeddingBagConfig"),
    ("cfg not a list", lambda: rt.HashEmbeddingBagCollection("t"), TypeError, "tables must be a list"),
    ("cfg duplicate table", lambda: rt.HashEmbeddingBagCollection(CFG + CFG), ValueError, "Duplicate table name t0"),
    # -- HashTableOptions ----------------------------------------------------------------------------
    *[(f"options {k}={v!r}", bag({k: v}), ValueError, f"HashTableOptions.{k}") for k, v in [
        ("init_std", math.nan), ("init_std", math.inf), ("init_std", -1.0), ("init_std", "0.1"),
        ("init_mean", math.nan), ("init_value", -math.inf), ("init_min", math.nan), ("init_max", math.inf),
        ("block_rows", 100), ("block_rows", 0), ("initializer", "xavier"), ("seed", -1), ("seed", 2**64),
        ("admit_threshold", -1), ("admit_capacity", 0), ("admit_capacity", 1.5), ("ttl_steps", 0), ("ttl_steps", 2.5),
        ("max_capacity", 0), ("eviction_policy", "fifo"), ("device", "tpu"), ("initial_capacity", -1),
        ("max_capacity", "10"),
    ]],
    ("options min > max", bag({"init_min": 1.0, "init_max": 0.0}), ValueError, "init_min"),
    ("options cap without policy", bag({"max_capacity": 10}), ValueError, "max_capacity needs eviction_policy"),
    ("options policy without cap", bag({"eviction_policy": "lru"}), ValueError, "eviction_policy='lru'"),
    ("options admit_capacity True", bag({"admit_capacity": True}), ValueError, "admit_capacity must be an int, got True"),
    ("options block_rows huge", bag({"block_rows": 1 << 40}), ValueError, "block_rows must be a power of two of at most"),
    ("options host_rows not a bool", bag({"host_rows": 1}), ValueError, "host_rows must be True or False"),
    ("config dim beyond memory", cfg(embedding_dim=2**40), MemoryError, r"HashTable 't': one block of block_rows=8,192 "
     r"rows of dim 1,099,511,627,776"),
    ("options from_dict unknown", lambda: rt.HashTableOptions.from_dict({"ttl": 3}), ValueError, r"\['ttl'\]"),
    ("options for unknown table", lambda: ebc(options={"nope": rt.HashTableOptions()}), (ValueError, KeyError),
     "nope"),
    # -- fused_params --------------------------------------------------------------------------------
    *[(f"fused {k}={v!r}", fused({"optimizer": EmbOptimType.ADAM, k: v}), (ValueError, TypeError), k) for k, v in [
        ("learning_rate", math.nan), ("learning_rate", math.inf), ("learning_rate", "0.1"), ("eps", math.nan),
        ("beta1", math.inf), ("beta2", "x"), ("weight_decay", math.nan),
    ]],
    ("fused unknown optimizer", fused({"optimizer": "lion"}), ValueError, "'lion' is not an EmbOptimType"),
    ("fused unknown key", fused({"optimizer": EmbOptimType.ADAM, "lr": 0.1}), ValueError, r"\['lr'\]"),
    ("fused unread key", fused({"optimizer": EmbOptimType.EXACT_SGD, "beta1": 0.5}), ValueError, "beta1"),
    ("fused decay without mode", fused({"optimizer": EmbOptimType.ADAM, "weight_decay": 0.1}), ValueError,
     "weight_decay_mode"),
    ("fused unsupported type", fused({"optimizer": EmbOptimType.MADGRAD}), (ValueError, NotImplementedError),
     "MADGRAD|madgrad"),
    # -- Schema --------------------------------------------------------------------------------------
    ("schema empty", lambda: Schema(), ValueError, "at least one dense or sparse"),
    ("schema weights key", lambda: Schema(sparse={"a": "a"}, weights={"b": "w"}), ValueError, r"\['b'\]"),
    ("schema transform", lambda: Schema(dense=["d"], dense_transform="sqrt"), ValueError, "dense_transform"),
    ("schema transform column", lambda: Schema(dense=["d"], dense_transform={"x": "log1p"}), ValueError, r"\['x'\]"),
    ("schema twice", lambda: Schema(dense=["d"], labels=["d"]), ValueError, "'d' is declared twice"),
    ("schema mask key", lambda: Schema(sparse={"a": "a"}, masks={"b": "m"}), ValueError, "'b'"),
    ("schema delimiter", lambda: Schema(sparse={"a": "a"}, list_delimiter=""), ValueError, "list_delimiter"),
    ("schema weight delimiter", lambda: Schema(sparse={"a": "a"}, weight_delimiter=":"), ValueError,
     "weight_delimiter"),
    ("schema sparse spec", lambda: Schema(sparse={"a": []}), ValueError, r"Schema.sparse\['a'\]"),
    ("schema seed", lambda: Schema(sparse={"a": "a"}, hash_seed=-1), ValueError, "hash_seed"),
    ("schema version", lambda: Schema(sparse={"a": "a"}, version=2), ValueError, "version 2"),
    ("schema from_dict", lambda: Schema.from_dict({"sparse": {"a": "a"}, "bogus": 1}), ValueError, r"\['bogus'\]"),
]


def _loader_cases(tmp):
    """Files written for the case, then read: the error names the file and column."""
    def write(name, text):
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    s = Schema(sparse={"a": "a"}, dense=["d"], labels=["y"])
    return [
        ("loader missing file", lambda: ColumnarDataset(os.path.join(tmp, "nope.csv"), s, 2), OSError, "nope.csv"),
        ("loader missing column", lambda: ColumnarDataset(write("m.csv", "y,a\n1,2\n"), s, 2), ValueError,
         "m.csv: column 'd' is missing"),
        ("loader dense not numeric", lambda: ColumnarDataset(write("n.csv", "y,a,d\n1,2,x\n"), s, 2), ValueError,
         "n.csv: dense column 'd' must be numeric"),
        ("loader unknown extension", lambda: ColumnarDataset(write("x.dat", "y\n1\n"), s, 2), OSError,
         "x.dat: cannot tell the format"),
        ("loader corrupt parquet", lambda: ColumnarDataset(write("c.parquet", "PAR1 not really"), s, 2), OSError,
         "c.parquet"),
        ("loader bad weight", lambda: ColumnarDataset(write("w.csv", "y,a,d\n1,3:x,1\n"), Schema(
            sparse={"a": "a"}, dense=["d"], labels=["y"], list_delimiter="|", weight_delimiter=":"), 1), ValueError,
         "w.csv: .*column 'a'.*weight"),
        ("loader batch size", lambda: ColumnarDataset(write("b.csv", "y,a,d\n1,2,3\n"), s, 0), ValueError,
         "batch_size"),
        ("loader rank", lambda: ColumnarDataset(write("r.csv", "y,a,d\n1,2,3\n"), s, 1, rank=2, world_size=2),
         ValueError, "rank"),
        ("loader header repeats", lambda: ColumnarDataset(
            [write("h1.csv", "y,a,a,d\n1,2,3,4\n"), write("h2.csv", "y,a,a,a,d\n1,2,3,4,5\n")], s, 1), ValueError,
         "h2.csv: its header repeats"),
        ("loader inf in a dense column", lambda: list(ColumnarDataset(write("i.csv", "y,a,d\n1,2,3\n0,2,inf\n"), s, 2,
                                                                      prefetch=0)),
         ValueError, r"i.csv.*dense column 'd' holds 1 NaN or infinite values \(the first at row 1: inf\)"),
        ("loader list_delimiter names no column", lambda: Schema(sparse={"a": "a"}, labels=["y"],
                                                                  list_delimiter={"tags": "^"}), ValueError,
         r"list_delimiter names columns \['tags'\] that are not sparse columns"),
        ("loader weight delimiter is the list's", lambda: Schema(sparse={"a": "a"}, labels=["y"], list_delimiter="|",
                                                                 weight_delimiter="|"), ValueError,
         "weight_delimiter '\\|' is also a list delimiter"),
        ("loader dense_stats std 0", lambda: Schema(dense=["d"], labels=["y"], dense_transform="standardize",
                                                    dense_stats={"d": (1.0, 0.0)}), ValueError,
         r"dense_stats\['d'\] must be \(mean, std\) with a finite mean and a finite std > 0"),
        ("loader dense_stats NaN mean", lambda: Schema(dense=["d"], labels=["y"], dense_stats={"d": (math.nan, 1.0)}),
         ValueError, r"dense_stats\['d'\]"),
        ("loader standardize stats", lambda: ColumnarDataset(write("s.csv", "y,a,d\n1,2,3\n"), Schema(
            sparse={"a": "a"}, dense=["d"], labels=["y"], dense_transform="standardize"), 1), ValueError,
         "'d' is to be standardized"),
    ]


def _checkpoint_cases(tmp):
    from recis_torchrec import checkpoint
    from recis_torchrec.checkpoint import CheckpointError

    model = torch.nn.ModuleDict({"m": ebc(fused_params={"optimizer": EmbOptimType.ADAM})})
    model["m"](kjt(["f0", "f1"], L([1, 2]), L([1, 1]))).values().sum().backward()
    root = os.path.join(tmp, "ckpt")
    path = checkpoint.save(root, model, step=1)
    index = json.load(open(os.path.join(path, "index.json")))
    table_file = os.path.join(path, index["tables"]["m/t0"]["files"][0]["file"])

    def corrupt(fn):
        def run():
            saved = {p: open(p, "rb").read() for p in (table_file, os.path.join(path, "index.json"))}
            try:
                fn()
                checkpoint.load(root, model)
            finally:
                for p, data in saved.items():
                    open(p, "wb").write(data)
        return run

    def edit_index(change):
        def fn():
            ix = json.load(open(os.path.join(path, "index.json")))
            change(ix)
            ix["xxh64"] = checkpoint.files.index_checksum(ix)
            json.dump(ix, open(os.path.join(path, "index.json"), "w"))
        return fn

    def flip_byte(offset):
        def fn():
            data = bytearray(open(table_file, "rb").read())
            data[offset] ^= 0x55
            open(table_file, "wb").write(bytes(data))
        return fn

    other = torch.nn.ModuleDict({"m": rt.HashEmbeddingBagCollection(
        [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=10, feature_names=["f0", "f1"])],
        fused_params={"optimizer": EmbOptimType.ADAM})})
    return [
        ("ckpt truncated", corrupt(lambda: open(table_file, "wb").write(b"x")), CheckpointError,
         "rank0-part0.safetensors: 1 bytes"),
        ("ckpt flipped data", corrupt(flip_byte(-2)), CheckpointError, "rank0-part0.safetensors: checksum mismatch"),
        ("ckpt flipped header", corrupt(flip_byte(12)), CheckpointError, "rank0-part0.safetensors: checksum"),
        ("ckpt missing file", corrupt(lambda: os.remove(table_file)), CheckpointError, "rank0-part0.safetensors: missing"),
        ("ckpt edited step", corrupt(lambda: json.dump(dict(json.load(open(os.path.join(path, "index.json"))), step=7),
                                                       open(os.path.join(path, "index.json"), "w"))), CheckpointError,
         "index.json: checksum mismatch"),
        ("ckpt index not json", corrupt(lambda: open(os.path.join(path, "index.json"), "w").write("{")),
         CheckpointError, "index.json: unreadable"),
        ("ckpt escaping path", corrupt(edit_index(lambda ix: ix["tables"]["m/t0"]["files"][0].update(
            file="../../etc/passwd"))), CheckpointError, "outside the checkpoint directory"),
        ("ckpt wrong dim", lambda: checkpoint.load(root, other), CheckpointError, "'m/t0'.*dim"),
        ("ckpt other optimizer", lambda: checkpoint.load(root, torch.nn.ModuleDict({"m": ebc(
            fused_params={"optimizer": EmbOptimType.EXACT_SGD})})), CheckpointError, "'m/t0'.*optimizer code"),
        ("ckpt no checkpoint", lambda: checkpoint.load(os.path.join(tmp, "empty"), model), CheckpointError, "empty"),
        ("ckpt keep_last", lambda: checkpoint.save(root, model, step=2, keep_last=0), CheckpointError, "keep_last"),
        ("ckpt negative step", lambda: checkpoint.save(root, model, step=-5), CheckpointError, "step"),
        ("ckpt delta into files", lambda: (os.makedirs(os.path.join(tmp, "d"), exist_ok=True),
                                           open(os.path.join(tmp, "d", "x"), "w").write("x"),
                                           checkpoint.export_delta(os.path.join(tmp, "d"), model, 0)),
         CheckpointError, "not an empty directory"),
    ]


def _config_cases(tmp):
    from recis_torchrec.train import ConfigError, build_run, load_config

    def run(text):
        def go():
            path = os.path.join(tmp, "c.toml")
            open(path, "w").write(text)
            build_run(load_config(path), overrides={"trainer.output_dir": os.path.join(tmp, "out")})
        return go

    base = '[data]\nsource = "synthetic"\nbatch_size = 8\n[trainer]\nsteps = 1\n'
    return [
        ("config unknown section", run(base + "[modle]\nname = 'DLRM'\n"), ConfigError, r"\['modle'\]"),
        ("config unknown model", run(base + "[model]\nname = 'GPT'\n"), ConfigError, r"\[model\].name"),
        ("config bad batch", run('[data]\nsource = "synthetic"\nbatch_size = 0\n[trainer]\nsteps = 1\n'),
         ConfigError, r"\[data\].batch_size"),
        ("config bad source", run('[data]\nsource = "kafka"\n[trainer]\nsteps = 1\n'), ConfigError, r"\[data\].source"),
        ("config bad optimizer", run(base + "[optimizer]\ndense = 'lbfgs'\n"), ConfigError, r"\[optimizer\].dense"),
        ("config bad sparse", run(base + "[optimizer.sparse]\noptimizer = 'lion'\n"), ConfigError,
         r"\[optimizer.sparse\]"),
        ("config bad options", run(base + "[tables.options]\nttl_steps = -1\n"), ConfigError, r"\[tables.options\]"),
        ("config bad trainer", run('[data]\nsource = "synthetic"\n[trainer]\nsteps = 1\nfoo = 2\n'), ConfigError,
         r"\[trainer\]"),
        ("config not toml", run("[data\n"), ConfigError, "not valid TOML"),
        ("config causal a string", run(base + "[model]\nname = 'SequenceTransformer'\ntarget = 'cat_0'\n"
                                             "history = 'cat_1'\ncausal = 'false'\n"), ConfigError,
         r"\[model\].causal must be true or false, got 'false'"),
        ("config DIN without target", run(base + "[model]\nname = 'DIN'\nhistory = 'cat_0'\n"), ConfigError,
         r"\[model\].target"),
        ("config features on synthetic", run('[data]\nsource = "synthetic"\n[trainer]\nsteps = 1\n'
                                       '[[features]]\nsource = "cat_0"\n'), ConfigError, r"\[\[features\]\]"),
        ("config passthrough not bool", lambda: _files_run(tmp, '"yes"'), ConfigError, r"\[data\].passthrough"),
        ("config model_output", run(base + "model_output = 'odds'\n"), ConfigError, "model_output"),
        ("config async_save not bool", run(base + "async_save = 0\n"), ConfigError, "async_save"),
        ("config import_weights not bool", run(base + "import_weights = 'no'\n"), ConfigError, "import_weights"),
        ("config share_tables not bool", run(base + "share_tables = 1\n"), ConfigError, "share_tables"),
        ("config resume a string", run(base + 'resume = "false"\n'), ConfigError,
         "TrainingArguments.resume must be true or false, got 'false'"),
        ("config pipeline a string", run(base + 'pipeline = "off"\n'), ConfigError, "pipeline must be true or false"),
        ("config bf16 a string", run(base + 'bf16 = "false"\n'), ConfigError, "bf16 must be true or false"),
        ("config steps a float", run('[data]\nsource = "synthetic"\nbatch_size = 8\n[trainer]\nsteps = 2.5\n'),
         ConfigError, r"steps must be an integer \(or unset\), got 2.5"),
        ("config shuffle a string", lambda: _files_run(tmp, "true", 'shuffle = "false"\n'), ConfigError,
         r"\[data\].shuffle must be true or false"),
    ]


def _files_run(tmp, passthrough, extra=""):
    from recis_torchrec.train import build_run, load_config

    data = os.path.join(tmp, "d.csv")
    open(data, "w").write("y,a\n1,2\n0,3\n")
    path = os.path.join(tmp, "f.toml")
    open(path, "w").write(
        f'[data]\nsource = "files"\ntrain = "{data}"\nformat = "csv"\nbatch_size = 1\npassthrough = {passthrough}\n'
        + extra + '[data.schema]\nsparse = {a = "a"}\nlabels = ["y"]\n[[features]]\nsource = "a"\n[trainer]\nsteps = 1\n')
    build_run(load_config(path), overrides={"trainer.output_dir": os.path.join(tmp, "out2")})


@pytest.mark.parametrize("name,fn,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_named(name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("group", ["loader", "checkpoint", "config"])
def test_bad_files_are_refused_and_named(group, tmp_path):
    cases = {"loader": _loader_cases, "checkpoint": _checkpoint_cases, "config": _config_cases}[group](str(tmp_path))
    failures = []
    for name, fn, exc, match in cases:
        try:
            with pytest.raises(exc, match=match):
                fn()
        except BaseException as e:  # noqa: B902 - collected, reported together
            failures.append(f"{name}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_there_are_at_least_80_cases(tmp_path):
    n = len(CASES) + len(_loader_cases(str(tmp_path))) + len(_checkpoint_cases(str(tmp_path))) + len(
        _config_cases(str(tmp_path)))
    assert n >= 80, n
