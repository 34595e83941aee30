# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``python -m recis_torchrec.inference``: a training run's checkpoint -> package -> Parquet
predictions equal to the trained model's eval output."""

import os

import pyarrow.parquet as pq
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
    assert inference_main(["predict", package, held, "--output", out, "--batch-size", "50"]) == 0
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
    assert inference_main(["export", str(tmp_path / "nothing"), str(tmp_path / "p2")]) == 2
