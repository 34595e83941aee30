# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``python -m recis_torchrec.inference``: a training run's checkpoint -> package -> Parquet
predictions equal to the trained model's eval output."""

import os

import pyarrow.parquet as pq
import pytest
import torch

from recis_torchrec import checkpoint
from recis_torchrec.inference.__main__ import _model_of, _run_from
from recis_torchrec.inference.__main__ import main as inference_main
from recis_torchrec.train.__main__ import main as train_main
from tests.train.test_trainer import SYNTHETIC, _tiny_criteo_tsv


def test_export_predict_info_from_a_training_run(tmp_path, capsys):
    train, held = str(tmp_path / "train.tsv"), str(tmp_path / "eval.tsv")
    _tiny_criteo_tsv(train, rows=512)
    _tiny_criteo_tsv(held, rows=203)
    run_dir = str(tmp_path / "run")
    assert train_main(["--config", SYNTHETIC, "--output-dir", run_dir, "--steps", "6", "--data", train,
                       "--eval-data", held, "--set", "data.batch_size=64", "--set", "trainer.progress=false"]) == 0
    package, out = str(tmp_path / "pkg"), str(tmp_path / "pred.parquet")
    assert inference_main(["export", os.path.join(run_dir, "checkpoints"), package]) == 0
    os.rename(train, train + ".gone")  # the package holds the schema and its statistics: no training file needed
    assert inference_main(["predict", package, held, "--output", out, "--batch-size", "50"]) == 0
    os.rename(train + ".gone", train)
    got = torch.tensor(pq.read_table(out).column("prediction").to_pylist())
    assert got.numel() == 203  # every row, the last partial batch included

    # The trained model, rebuilt and restored the way a single-process Trainer would, on the same rows.
    index = checkpoint.files.read_index(checkpoint.resolve(os.path.join(run_dir, "checkpoints")))
    extra = index["extra"]
    run = _run_from(extra["config"], dict(extra["overrides"], **{"data.eval": [held], "data.batch_size": 50}),
                    str(tmp_path / "tmp"))
    model, probabilities = _model_of(run)
    checkpoint.load(os.path.join(run_dir, "checkpoints"), model)
    model.eval()
    with torch.no_grad():
        want = torch.cat([torch.sigmoid(model.model(b.dense_features, b.sparse_features)).reshape(-1)
                          for b in run.eval_data])
    assert not probabilities
    assert torch.equal(got, want)

    capsys.readouterr()
    assert inference_main(["info", package]) == 0
    text = capsys.readouterr().out
    assert "quantization fp32" in text and "B/id" in text and "t_cat_0" in text

    assert inference_main(["predict", package, str(tmp_path / "nope.tsv")]) == 2
    assert "nope.tsv: no such file" in capsys.readouterr().err
    # Several files at once, predictions in their order.
    both = str(tmp_path / "both.parquet")
    assert inference_main(["predict", package, f"{held},{held}", "--output", both, "--batch-size", "50"]) == 0
    assert torch.equal(torch.tensor(pq.read_table(both).column("prediction").to_pylist()), torch.cat([got, got]))
    assert inference_main(["predict", package, held, "--batch-size", "0"]) == 2
    assert "--batch-size must be > 0" in capsys.readouterr().err
    assert inference_main(["export", str(tmp_path / "nothing"), str(tmp_path / "p2")]) == 2


ALIMAMA_DIN = """
[model]
name = "DIN"
embedding_dim = 8
target = "cate"
history = "hist_cate"
max_length = 12
attention_arch = [16]
top_arch = [16]

[data.schema]
sparse = { user = "user", cate = "cate", hist_cate = "his_cate" }
masks = { hist_cate = "his_mask" }
dense = []
labels = ["clk"]

[tables]
num_embeddings = 10000

[trainer]
epochs = 1
"""

AMAZON_DIN = """
[model]
name = "DIN"
embedding_dim = 8
target = "item"
history = "hist_item"
max_length = 20
attention_arch = [16]
top_arch = [16]

[data]
format = "tsv"

[data.schema]
column_names = ["label", "user", "item", "cate", "hist_item", "hist_cate"]
sparse = { user = "user", item = "item", cate = "cate", hist_item = "hist_item", hist_cate = "hist_cate" }
labels = ["label"]
list_delimiter = { hist_item = "\\u0002", hist_cate = "\\u0002" }
dense = []

[tables]
num_embeddings = 10000

[trainer]
epochs = 1
"""


def _format_case(name, tmp_path):
    """(config path, train files, eval file) for a generated file in a public dataset's layout."""
    from recis_torchrec.datasets import formats

    examples = os.path.dirname(SYNTHETIC)
    if name == "avazu":  # its sparse features are listed out of alphabetical order
        data = formats.write_avazu_csv(str(tmp_path / "train.csv"), rows=600)
        return os.path.join(examples, "avazu_dlrm.toml"), data, data
    if name == "taobao":  # header-less parts, ^-delimited histories, a raw price, an empty pid
        parts = formats.write_taobao_parts(str(tmp_path / "taobao"), rows=500, history=20)
        return os.path.join(examples, "taobao_din.toml"), str(tmp_path / "taobao" / "part-*.csv"), parts[-1]
    config = str(tmp_path / f"{name}.toml")
    if name == "alimama":  # one header, 12 columns all named his_cate, a mask column each
        data = formats.write_taobao_parts(str(tmp_path / "alimama"), rows=500, history=12, repeated_header=True)[0]
        open(config, "w").write(ALIMAMA_DIN)
        return config, data, data
    assert name == "amazon"  # DIEN's TSV: string ids, histories delimited by \x02
    data = formats.write_amazon_tsv(str(tmp_path / "amazon.tsv"), rows=500, history=20)
    open(config, "w").write(AMAZON_DIN)
    return config, data, data


@pytest.mark.parametrize("name", ["avazu", "taobao", "alimama", "amazon"])  # Criteo: the test above
def test_a_package_predicts_what_the_trained_model_predicts_on_each_public_format(name, tmp_path):
    # The package built from a training run's checkpoint predicts, for FP32, what the trained model
    # built from the user's own config predicts, bit for bit. (On Avazu the package read the features
    # permuted when the checkpoint stored the config with its keys sorted.)
    from recis_torchrec.train import config as config_mod

    toml, train, held = _format_case(name, tmp_path)
    run_dir = str(tmp_path / "run")
    assert train_main(["--config", toml, "--output-dir", run_dir, "--steps", "8", "--data", train, "--eval-data", held,
                       "--set", "data.batch_size=64", "--set", "trainer.progress=false"]) == 0
    ckpt = os.path.join(run_dir, "checkpoints")
    stored = checkpoint.files.read_index(checkpoint.resolve(ckpt))["extra"]["config"]
    user = config_mod.load_config(toml)
    assert list(stored["data"]["schema"]["sparse"]) == list(user["data"]["schema"]["sparse"])

    package, out = str(tmp_path / "pkg"), str(tmp_path / "pred.parquet")
    assert inference_main(["export", ckpt, package]) == 0
    assert inference_main(["predict", package, held, "--output", out, "--batch-size", "100"]) == 0
    got = torch.tensor(pq.read_table(out).column("prediction").to_pylist())

    run = _run_from(user, {"data.train": [train], "data.eval": [held], "data.batch_size": 100}, str(tmp_path / "tmp"))
    model, probabilities = _model_of(run)
    checkpoint.load(ckpt, model)
    model.eval()
    with torch.no_grad():
        want = torch.cat([torch.sigmoid(model.model(b.dense_features, b.sparse_features)).reshape(-1)
                          for b in run.eval_data])
    assert got.numel() == want.numel() > 0 and not probabilities
    assert torch.equal(got, want)


def test_a_resume_into_a_changed_model_is_refused_naming_the_changes(tmp_path, capsys):
    # A rerun in the same output directory resumes by default: with the sparse features reordered
    # (or a dim changed) it used to load the old checkpoint into the new model and train on.
    import pytest

    from recis_torchrec.checkpoint import CheckpointError
    from recis_torchrec.datasets.formats import write_avazu_csv

    toml = os.path.join(os.path.dirname(SYNTHETIC), "avazu_dlrm.toml")
    text = open(toml).read()
    data = write_avazu_csv(str(tmp_path / "train.csv"), rows=300)
    run_dir = str(tmp_path / "run")
    argv = ["--output-dir", run_dir, "--data", data, "--set", "data.batch_size=64", "--set", "trainer.progress=false"]
    assert train_main(["--config", toml, "--steps", "4", *argv]) == 0

    lines = text.splitlines()
    first = lines.index('hour = "hour"')
    lines[first], lines[first + 1] = lines[first + 1], lines[first]  # C1 before hour
    reordered = str(tmp_path / "reordered.toml")
    open(reordered, "w").write("\n".join(lines) + "\n")
    wider = str(tmp_path / "wider.toml")
    open(wider, "w").write(text.replace("embedding_dim = 16", "embedding_dim = 32").replace("dense_arch = [16]",
                                                                                         "dense_arch = [32]"))
    capsys.readouterr()
    assert train_main(["--config", reordered, "--steps", "8", *argv]) == 2
    err = capsys.readouterr().err
    assert "whose config differs in what shapes the model" in err
    assert "the order of [data.schema.sparse]: ['hour', 'C1'," in err and "-> ['C1', 'hour'," in err
    assert train_main(["--config", wider, "--steps", "8", *argv]) == 2
    assert "model.embedding_dim: 16 -> 32" in capsys.readouterr().err
    # Forced past the config check, the checkpoint itself refuses the permuted model.
    with pytest.raises(CheckpointError, match="features are in another order than when the checkpoint was saved"):
        train_main(["--config", reordered, "--steps", "8", "--allow-config-change", *argv])
    # What may change does, and is reported.
    assert train_main(["--config", toml, "--steps", "8", "--set", "optimizer.dense_lr=0.001", *argv]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "optimizer.dense_lr: 0.003 -> 0.001" in out, out


def test_predict_on_the_main_jobs_package_says_why_it_cannot_read_files(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert train_main(["--config", SYNTHETIC, "--output-dir", run_dir, "--steps", "3", "--set", "data.batch_size=32",
                       "--set", "trainer.progress=false", "--set", "trainer.eval_every=0"]) == 0
    package = str(tmp_path / "pkg")
    assert inference_main(["export", os.path.join(run_dir, "checkpoints"), package]) == 0
    data = str(tmp_path / "x.tsv")
    _tiny_criteo_tsv(data, rows=10)
    capsys.readouterr()
    assert inference_main(["predict", package, data]) == 2
    assert "trained on generated data ([data].source = 'synthetic')" in capsys.readouterr().err


def test_the_main_jobs_run_exported_for_cpp_serving_and_served_over_http(tmp_path, capsys):
    """What make serve does after make train: the run's checkpoint exported (here with
    --aot-inductor, the C++ runner's dense program) as version 1 of a model directory, served by
    recis_torchrec.serve; its answers equal the package's predictor's."""
    from recis_torchrec import inference
    from recis_torchrec.serve import Client, ModelServer

    run_dir = str(tmp_path / "run")
    assert train_main(["--config", SYNTHETIC, "--output-dir", run_dir, "--steps", "3", "--set", "data.batch_size=32",
                       "--set", "trainer.progress=false", "--set", "trainer.eval_every=0"]) == 0
    version = str(tmp_path / "model" / "1")
    assert inference_main(["export", os.path.join(run_dir, "checkpoints"), version, "--aot-inductor"]) == 0
    assert "with an AOTInductor program" in capsys.readouterr().out
    assert "aoti_program" in inference.read_manifest(version)
    predictor = inference.load(version, dense="aoti")
    index = checkpoint.files.read_index(checkpoint.resolve(os.path.join(run_dir, "checkpoints")))
    run = _run_from(index["extra"]["config"], index["extra"]["overrides"], str(tmp_path / "tmp"))
    batch = next(iter(run.train_data))
    args = (batch.dense_features, batch.sparse_features)
    server = ModelServer(str(tmp_path / "model"), port=0, threads=1, dense="aoti", poll_s=3600).start()
    try:
        assert Client(server.url).model()["version"] == "1"
        torch.testing.assert_close(Client(server.url).predict(*args), predictor(*args), atol=1e-6, rtol=1e-6)
    finally:
        server.close()
