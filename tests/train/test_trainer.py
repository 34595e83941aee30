# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The Trainer and its CLI in one process (unsharded): training, metrics, resume, windows, errors."""

import glob
import json
import math
import os

import pytest
import torch

from recis_torchrec.datasets import SyntheticClicks, SyntheticConfig, synthetic_schema, write_parquet
from recis_torchrec.io import ColumnarDataset
from recis_torchrec.train import ConfigError, Trainer, TrainingArguments, build_run, load_config
from recis_torchrec.checkpoint.files import hash_tables
from recis_torchrec.train.__main__ import main

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SYNTHETIC = os.path.join(ROOT, "examples", "synthetic_dlrm.toml")
MULTITASK = os.path.join(ROOT, "examples", "synthetic_multitask.toml")
QUIET = ["--set", "trainer.progress=false"]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_trains_logs_evaluates_and_saves(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["--config", SYNTHETIC, "--output-dir", out, "--steps", "60", "--set", "data.batch_size=256",
            "--set", "trainer.eval_every=30", "--set", "trainer.log_every=20", "--set", "trainer.save_every=30"]
    assert main(argv + QUIET) == 0
    text = capsys.readouterr().out
    assert "done: 60 steps" in text and "examples/s" in text and "ctr AUC" in text
    recs = records(out)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [20, 40, 60]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(0.0 < r["train_auc"]["ctr"] < 1.0 and r["examples_per_s"] > 0 for r in train)
    stats = train[-1]["tables"]
    assert stats["rows"] > 0 and stats["admitted"] == stats["rows"] and stats["evicted"] == 0
    evals = [r for r in recs if "eval" in r]
    assert [r["step"] for r in evals] == [30, 60]
    assert evals[-1]["eval"]["ctr"]["auc"] > 0.65
    assert evals[-1]["eval"]["ctr"]["examples"] == 8 * 256
    summary = recs[-1]["summary"]
    assert summary["steps"] == 60 and os.path.isdir(summary["checkpoint"])
    assert 0.0 <= summary["data_wait_fraction"] < 1.0
    assert len(glob.glob(os.path.join(out, "checkpoints", "step_*"))) == 2  # steps 30 and 60 (keep_last 2)

    # The same command again: the run is complete, nothing is trained.
    assert main(argv + QUIET) == 0
    assert "already holds a run trained to step 60" in capsys.readouterr().out


def _trainer(out, steps, callbacks=(), **kw):
    run = build_run(load_config(SYNTHETIC), overrides={
        "trainer.output_dir": out, "trainer.steps": steps, "trainer.save_every": 5, "trainer.eval_every": 0,
        "trainer.log_every": 5, "trainer.progress": False, "data.batch_size": 128, "data.eval_batches": 2, **kw})
    return Trainer(run.model, run.args, run.train_data, run.eval_data, tasks=run.tasks,
                   dense_optimizer=run.dense_optimizer, fused_params=run.fused_params, callbacks=callbacks,
                   table_options=run.table_options)


def test_tables_on_disk_train_and_resume_like_tables_in_memory(tmp_path):
    """The Trainer with storage="ssd" tables: its prefetcher brings each next batch's rows in while a
    step runs (no step reads a row itself), the logits match a run in memory step for step, and a
    resume from the step-5 checkpoint continues exactly."""
    def recorder(store):
        return lambda trainer, step, logits, labels: store.__setitem__(step, logits.clone())

    rows = tmp_path / "rows"
    rows.mkdir()
    ssd = {"tables.options.storage": "ssd", "tables.options.storage_path": str(rows),
           "tables.options.cache_bytes": 49152}
    straight, first, resumed = {}, {}, {}
    _trainer(str(tmp_path / "mem"), 13, [recorder(straight)]).fit()
    read_by_steps = []

    def steps_read(trainer, step, logits, labels):  # before the final evaluation's own lookups
        read_by_steps.append(sum(ref.table.rows_read_at_lookup for ref in hash_tables(trainer.model)))

    t = _trainer(str(tmp_path / "ssd"), 7, [recorder(first), steps_read], **ssd)
    assert t.prefetcher is not None
    t.fit()
    assert read_by_steps == [0] * 7
    assert all(ref.table.info()["disk_bytes_read"] > 0 for ref in hash_tables(t.model))
    t.close()
    t = _trainer(str(tmp_path / "ssd"), 13, [recorder(resumed)], **ssd)
    t.fit()
    t.close()
    assert sorted(first) == list(range(1, 8)) and sorted(resumed) == list(range(8, 14))
    for step, logits in {**first, **resumed}.items():
        assert torch.equal(logits, straight[step]), step


def test_resume_by_hand_continues_exactly(tmp_path):
    def recorder(store):
        return lambda trainer, step, logits, labels: store.__setitem__(step, logits.clone())

    straight = {}
    _trainer(str(tmp_path / "a"), 13, [recorder(straight)]).fit()
    _trainer(str(tmp_path / "b"), 7).fit()  # saves at step 5 and at its end, step 7
    resumed = {}
    t = _trainer(str(tmp_path / "b"), 13, [recorder(resumed)])
    t.fit()
    assert sorted(resumed) == list(range(8, 14))
    for step in (8, 9, 10, 13):
        assert torch.equal(resumed[step], straight[step]), step


def test_multi_objective_two_heads_both_reported(tmp_path, capsys):
    out = str(tmp_path / "mt")
    assert main(["--config", MULTITASK, "--output-dir", out, "--steps", "60", "--set", "data.batch_size=256",
                 "--set", "trainer.eval_every=0", "--set", "trainer.log_every=30"] + QUIET) == 0
    text = capsys.readouterr().out
    assert "ctr AUC" in text and "cvr AUC" in text and "tasks ['ctr', 'cvr']" in text
    recs = records(out)
    ev = [r for r in recs if "eval" in r][-1]["eval"]
    assert set(ev) == {"ctr", "cvr"}
    for name in ("ctr", "cvr"):
        assert ev[name]["auc"] > 0.65 and math.isfinite(ev[name]["logloss"])
    assert set([r for r in recs if "loss" in r][-1]["train_auc"]) == {"ctr", "cvr"}


def test_multi_objective_loss_is_the_weighted_sum(tmp_path):
    from recis_torchrec.train import Task, TaskModel

    class Two(torch.nn.Module):
        def forward(self, dense, sparse):
            return dense[:, :2] * 3.0

    batch = SyntheticClicks(SyntheticConfig(num_sparse=2), 32, num_tasks=2).batch(0)
    loss, (reported, logits, labels) = TaskModel(Two(), [Task("ctr", weight=1.0), Task("cvr", weight=0.25)])(batch)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want = bce(batch.dense_features[:, 0] * 3, batch.labels[:, 0]) + 0.25 * bce(
        batch.dense_features[:, 1] * 3, batch.labels[:, 1]
    )
    torch.testing.assert_close(loss, want)
    assert torch.equal(reported, loss.detach())  # what the pipelines hand back for logging


def test_gradient_accumulation_and_bf16_train(tmp_path):
    t = _trainer(str(tmp_path / "acc"), 10, **{"trainer.gradient_accumulation": 2, "trainer.bf16": True})
    summary = t.fit()
    assert summary["steps"] == 10 and t.batches_done == 20
    assert math.isfinite([r for r in records(str(tmp_path / "acc")) if "loss" in r][-1]["loss"])


def test_windows_evaluate_before_training_and_save_deltas(tmp_path, capsys):
    cfg = SyntheticConfig(num_sparse=4, vocab_size=2000)
    for day in range(3):
        d = tmp_path / "data" / f"day={day:02d}"
        d.mkdir(parents=True)
        write_parquet(SyntheticClicks(cfg, 128, stream_seed=day), str(d / "part.parquet"), 6)
    schema = synthetic_schema(cfg)
    config = tmp_path / "online.toml"
    sparse = ", ".join(f'{k} = "{v}"' for k, v in schema.sparse.items())
    config.write_text(
        open(SYNTHETIC).read().split("[data]")[0]
        + f"""
[data]
source = "files"
windows = "{tmp_path}/data/day=*"
batch_size = 128
schema = {{ dense = {json.dumps(schema.dense)}, sparse = {{ {sparse} }}, labels = ["label"] }}

[trainer]
output_dir = "{tmp_path}/online"
steps = 1
eval_batches = 2
save_delta = true
keep_last = 1
progress = false
"""
    )
    out = str(tmp_path / "online")
    argv = ["--config", str(config)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "window 0 (day=00): trained 6 steps" in text
    assert "window 1 (day=01): before training ctr AUC" in text and "window 2 (day=02)" in text
    recs = [r for r in records(out) if "window" in r]
    assert [r["name"] for r in recs] == ["day=00", "day=01", "day=02"]
    assert "eval_before_training" not in recs[0]
    assert [r["step"] for r in recs] == [0, 6, 12]  # evaluated before the window's own steps
    assert recs[1]["eval_before_training"]["ctr"]["examples"] == 2 * 128
    assert sorted(os.listdir(os.path.join(out, "deltas"))) == ["day=01", "day=02"]
    assert len(glob.glob(os.path.join(out, "checkpoints", "step_*"))) == 1

    # A restart finds every window done.
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "after window 3" in text and "window 0 (" not in text

    # The run exports (its example batch from the newest window; it crashed on the windows' list).
    from recis_torchrec.inference.__main__ import main as inference_main

    assert inference_main(["export", os.path.join(out, "checkpoints"), str(tmp_path / "pkg")]) == 0


def test_windows_delta_reproduces_the_next_window(tmp_path):
    from recis_torchrec import checkpoint
    from recis_torchrec.checkpoint.files import hash_tables

    cfg = SyntheticConfig(num_sparse=3, vocab_size=1000)
    schema = synthetic_schema(cfg)
    windows = []
    for day in range(2):
        path = str(tmp_path / f"w{day}.parquet")
        write_parquet(SyntheticClicks(cfg, 64, stream_seed=10 + day), path, 4)
        windows.append(ColumnarDataset(path, schema, 64, drop_last=True))

    def trainer(out):
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.models.dlrm import DLRM

        torch.manual_seed(0)
        tables = [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=8, num_embeddings=100, feature_names=[k])
                  for k in cfg.feature_names()]
        model = DLRM(EmbeddingBagCollection(tables, device=torch.device("meta")), cfg.num_dense, [16, 8], [8, 1])
        args = TrainingArguments(output_dir=out, steps=1, save_delta=True, progress=False, keep_last=1)
        return Trainer(model, args, windows[0], fused_params={"optimizer": "exact_sgd", "learning_rate": 0.1})

    t = trainer(str(tmp_path / "run"))
    t.fit_windows(windows[:1])
    after_first = str(tmp_path / "after_first")
    checkpoint.save(after_first, t.model)
    t.fit_windows(windows)  # resumes at window 1
    served = trainer(str(tmp_path / "serve"))
    checkpoint.load(after_first, served.model)
    checkpoint.apply_delta(str(tmp_path / "run" / "deltas" / "window_0001"), served.model)

    def rows(model):
        out = {}
        for ref in hash_tables(model):
            ids, w, _, _ = ref.table.export_rows()
            order = torch.argsort(ids)
            out[ref.key] = (ids[order], w[order])
        return out

    want, got = rows(t.model), rows(served.model)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k][0], got[k][0])
        torch.testing.assert_close(want[k][1], got[k][1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"model.name": "DLRMv9"}, "[model].name"),
        ({"trainer.steps": 0}, "steps"),
        ({"trainer.steps": -5}, "steps"),
        ({"data": {"source": "files", "train": "PLACEHOLDER", "schema": {"dense": ["I99"],
          "sparse": {"cat_0": "cat_0"}, "labels": ["label"]}}}, "'I99'"),
        ({"data.source": "sql"}, "[data].source"),
        ({"data.batch_size": 0}, "[data].batch_size"),
        ({"optimizer.dense": "lamb"}, "[optimizer].dense"),
        ({"optimizer.sparse": {"optimizer": "lion"}}, "[optimizer.sparse]"),
        ({"model.embedding_dims": 4}, "[model]"),
        ({"tasks": [{"name": "ctr", "label": "purchase"}]}, "[[tasks]] #0 ('ctr').label"),
        ({"tables.options": {"block_rows": 3}}, "[tables.options]"),
        ({"features": [{"source": "I1", "ops": [{"op": "bucketize", "boundaries": [2, 1]}]}]},
         "[[features]] #0: feature 'I1': bucketize boundaries must be sorted"),
        ({"features": [{"left": "cat_0"}]}, "[[features]] #0"),
        ({"features": [{"source": "cat_0", "ops": [{"op": "truncate", "max_length": 0}]}]}, "[[features]] #0"),
        ({"features": [{"source": "cat_0"}]}, "[[features]]: feature specs apply to files"),
    ],
)
def test_bad_config_names_the_key(tmp_path, override, key):
    if "data" in override:
        path = str(tmp_path / "t.parquet")
        write_parquet(SyntheticClicks(SyntheticConfig(num_sparse=1), 16), path, 1)
        override = {"data": dict(override["data"], train=path)}
    with pytest.raises(ConfigError, match=None) as e:
        build_run(load_config(SYNTHETIC), overrides=dict(override, **{"trainer.output_dir": str(tmp_path)}))
    assert key in str(e.value), str(e.value)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["--config", SYNTHETIC, "--set", "model.name='Wide'"]) == 2
    assert "error: config [model].name: unknown model 'Wide'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname = 1")
    assert main(["--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["--config", SYNTHETIC, "--set", "steps=3"]) == 2
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err
    assert main(["--config", SYNTHETIC, "--eval-data", "x.tsv"]) == 2
    assert "--eval-data needs --data" in capsys.readouterr().err


def test_help_documents_the_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--config", "[model]", "DLRM_DCN", "DeepFM", "[data]", "windows", "[optimizer.sparse]",
                 "[[tasks]]", "[trainer]", "torchrun"):
        assert word in text, word


def _tiny_criteo_tsv(path, rows=256):
    """Raw Criteo lines: label, 13 integer fields, 26 hex categorical fields; some empty."""
    import random

    rnd = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            ints = [str(rnd.randint(0, 50)) if rnd.random() > 0.1 else "" for _ in range(13)]
            cats = [f"{rnd.randint(0, 30):08x}" if rnd.random() > 0.1 else "" for _ in range(26)]
            f.write("\t".join([str(rnd.randint(0, 1))] + ints + cats) + "\n")


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "examples", "*.toml"))))
def test_every_example_config_trains(tmp_path, name, capsys):
    from tests.conftest import SHARED_DATA

    argv = ["--config", os.path.join(ROOT, "examples", name), "--output-dir", str(tmp_path / "run"),
            "--steps", "3", "--set", "data.batch_size=32"] + QUIET
    source = load_config(os.path.join(ROOT, "examples", name))["data"]["source"]
    if name == "taobao_din.toml":  # generated files in the published shapes the configs read
        from recis_torchrec.datasets.formats import write_taobao_parts

        parts = write_taobao_parts(str(tmp_path / "taobao"), rows=400)
        argv += ["--data", str(tmp_path / "taobao" / "part-*.csv"), "--eval-data", parts[-1]]
    elif name == "avazu_dlrm.toml":
        from recis_torchrec.datasets.formats import write_avazu_csv

        write_avazu_csv(str(tmp_path / "avazu.csv"), rows=400)
        argv += ["--data", str(tmp_path / "avazu.csv"), "--eval-data", str(tmp_path / "avazu.csv")]
    elif source == "files":
        _tiny_criteo_tsv(str(tmp_path / "day.tsv"))
        argv += ["--data", str(tmp_path / "day.tsv"), "--eval-data", str(tmp_path / "day.tsv")]
    elif source == "movielens":
        ml = os.path.join(SHARED_DATA, "ml-100k")
        if not os.path.exists(os.path.join(ml, "u.data")):
            pytest.skip("MovieLens-100k is absent")
        argv += ["--set", f'data.path="{ml}"']
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert "done: 3 steps" in capsys.readouterr().out


def test_main_job_config_with_data_trains_on_criteo_files(tmp_path, capsys):
    """`make train DATA=... EVAL=...`: the main job's config with Criteo TSV files in place of its data."""
    _tiny_criteo_tsv(str(tmp_path / "train.tsv"))
    _tiny_criteo_tsv(str(tmp_path / "eval.tsv"), rows=128)
    argv = ["--config", SYNTHETIC, "--output-dir", str(tmp_path / "run"), "--steps", "4",
            "--data", str(tmp_path / "train.tsv"), "--eval-data", str(tmp_path / "eval.tsv"),
            "--set", "data.batch_size=64"] + QUIET
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert "on files" in out and "done: 4 steps" in out and "ctr AUC" in out
    assert os.path.exists(tmp_path / "run" / "converted" / "train.tsv.parquet")

    # Fewer rows than one batch: every row still trains (one smaller batch), or, dropping what does not
    # fill a batch, a clear error, not an empty run.
    assert main(argv + ["--set", "data.batch_size=512", "--output-dir", str(tmp_path / "run2")]) == 0
    assert "an epoch trains 256 of 256 rows" in capsys.readouterr().out
    assert main(argv + ["--set", "data.batch_size=512", "--set", "data.drop_last=true",
                        "--output-dir", str(tmp_path / "run3")]) == 2
    assert "config [data].batch_size: 256 training rows" in capsys.readouterr().err


def test_features_section_shapes_the_model_keys(tmp_path, capsys):
    """[[features]]: the loader makes the model's keys (crosses, bucketized columns) with the FeatureEngine."""
    _tiny_criteo_tsv(str(tmp_path / "train.tsv"))
    config = tmp_path / "features.toml"
    config.write_text(open(os.path.join(ROOT, "examples", "criteo_dlrm.toml")).read() + """
[[features]]
source = "cat_0"
ops = [{ op = "hash", salt = true }, { op = "mod", modulus = 1000 }]

[[features]]
left = "cat_1"
right = "cat_2"

[[features]]
source = "I1"
name = "I1_bucket"
ops = [{ op = "bucketize", boundaries = [0.5, 1.0, 2.0] }]
""")
    argv = ["--config", str(config), "--output-dir", str(tmp_path / "run"), "--steps", "3",
            "--data", str(tmp_path / "train.tsv"), "--set", "data.batch_size=32"] + QUIET
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert "done: 3 steps" in capsys.readouterr().out
    run = build_run(load_config(str(config)), overrides={"data": {"source": "files", "train": str(tmp_path / "train.tsv"),
                                                                   "batch_size": 32},
                                                          "trainer.output_dir": str(tmp_path / "b")})
    # The schema's keys no spec reads pass through unchanged (cat_1 and cat_2 feed the cross).
    passed = [f"cat_{i}" for i in range(3, 26)]
    assert [c.name for c in run.model.sparse_arch.embedding_bag_collection.embedding_bag_configs()] == [
        "t_cat_0", "t_cat_1_x_cat_2", "t_I1_bucket"] + [f"t_{k}" for k in passed]
    batch = next(iter(run.train_data))
    assert batch.sparse_features.keys() == ["cat_0", "cat_1_x_cat_2", "I1_bucket"] + passed
    assert int(batch.sparse_features["cat_0"].values().max()) < 1000
    plain = next(iter(build_run(load_config(os.path.join(ROOT, "examples", "criteo_dlrm.toml")), overrides={
        "data": {"source": "files", "train": str(tmp_path / "train.tsv"), "batch_size": 32},
        "trainer.output_dir": str(tmp_path / "c")}).train_data))  # no [[features]]
    assert torch.equal(batch.sparse_features["cat_5"].values(), plain.sparse_features["cat_5"].values())
    run = build_run(load_config(str(config)), overrides={
        "data": {"source": "files", "train": str(tmp_path / "train.tsv"), "batch_size": 32, "passthrough": False},
        "trainer.output_dir": str(tmp_path / "d")})
    assert next(iter(run.train_data)).sparse_features.keys() == ["cat_0", "cat_1_x_cat_2", "I1_bucket"]


def test_device_choice_follows_the_machine_and_the_setting(monkeypatch):
    from recis_torchrec.train import trainer as trainer_mod

    assert trainer_mod.resolve_device("auto") == torch.device("cpu")  # no GPU here
    assert trainer_mod.resolve_device("cpu") == torch.device("cpu")
    assert trainer_mod.backend_for(torch.device("cpu")) == "gloo"
    with pytest.raises((RuntimeError, NotImplementedError), match="CUDA"):
        trainer_mod.resolve_device("cuda")
    # A GPU machine with a RECIS_CUDA=1 build, faked: auto picks cuda:LOCAL_RANK, and NCCL.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(trainer_mod, "cuda_tables_available", lambda: True)
    monkeypatch.setattr(trainer_mod, "require_cuda", lambda what: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    device = trainer_mod.resolve_device("auto")
    assert device == torch.device("cuda", 1) and trainer_mod.backend_for(device) == "nccl"
    assert trainer_mod.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda'"):
        TrainingArguments(output_dir="x", steps=1, device="tpu")


def test_cli_refuses_a_cuda_device_without_one(tmp_path, capsys):
    argv = ["--config", SYNTHETIC, "--output-dir", str(tmp_path / "r"), "--steps", "2", "--set", 'trainer.device="cuda"']
    assert main(argv + QUIET) == 2
    assert "[trainer].device" in capsys.readouterr().err


def test_every_training_row_is_trained_each_epoch(tmp_path, capsys):
    # Training batches dropped the rows past each rank's last full batch, the same rows every epoch
    # (Avazu at 1 rank: 151 of 8,087 rows never trained). Now a smaller last batch per rank takes them.
    from recis_torchrec.datasets.formats import write_avazu_csv
    from recis_torchrec.train import config as config_mod

    data = write_avazu_csv(str(tmp_path / "train.csv"), rows=301)
    cfg = config_mod.load_config(os.path.join(ROOT, "examples", "avazu_dlrm.toml"))
    base = {"data.train": data, "data.batch_size": 64, "trainer.output_dir": str(tmp_path / "out")}
    for world, extra, want in [(1, {}, 301), (2, {}, 301), (2, {"data.drop_last": True}, 256),
                               (1, {"data.shuffle_buffer": 7}, 301)]:
        runs = [config_mod.build_run(cfg, r, world, dict(base, **extra)) for r in range(world)]
        rows = [sum(len(b.labels) for b in run.train_data) for run in runs]
        assert sum(rows) == want, (world, extra, rows)
        if "data.shuffle_buffer" in extra:
            assert runs[0].train_data.shuffle_buffer == 7
    for key, bad in [("data.drop_last", "false"), ("data.shuffle", "false"), ("data.shuffle_buffer", 0),
                     ("data.shuffle_buffer", 2.5)]:
        with pytest.raises(config_mod.ConfigError, match=rf"\[data\]\.{key.split('.')[1]} must be"):
            config_mod.build_run(cfg, 0, 1, dict(base, **{key: bad}))

    # The summary says how much of the data an epoch trained.
    assert main(["--config", os.path.join(ROOT, "examples", "avazu_dlrm.toml"), "--data", data, "--output-dir",
                 str(tmp_path / "run"), "--steps", "5", "--set", "data.batch_size=64", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "an epoch trains 301 of 301 rows" in out, out


def test_a_logits_model_declared_to_return_probabilities_is_refused(tmp_path):
    # The DLRM returns logits; declared as probabilities, its outputs were clamped into (0, 1) and
    # the run trained on without a word (here every logit of its first batches lies in (0, 1)).
    with pytest.raises(ValueError, match="model_output is 'probabilities' but DLRM returns logits"):
        _trainer(str(tmp_path / "p"), 3, **{"trainer.model_output": "probabilities"})
    # A model the trainer cannot know: its first outputs outside [0, 1] say it.
    import recis_torchrec as rt
    from recis_torchrec.train.trainer import TaskModel, drop_table_weights

    class Shifted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, dense, kjt):
            return self.inner(dense, kjt) - 2.0

    run = build_run(load_config(SYNTHETIC), overrides={"trainer.output_dir": str(tmp_path / "x"), "data.batch_size": 16})
    model = TaskModel(Shifted(run.model), run.tasks, probabilities=True)
    drop_table_weights(model)
    rt.convert(model)
    with pytest.raises(ValueError, match="model_output is 'probabilities' but Shifted returned -.*outside \\[0, 1\\]"):
        model(next(iter(run.train_data)))
    # The same DLRM as logits trains.
    _trainer(str(tmp_path / "l"), 3, **{"trainer.model_output": "logits"}).fit()
