# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""What the Trainer makes of the model it is given: probability outputs (TorchRec's DeepFM), the
tables it starts from, modules converted by hand, and models the pipeline cannot trace."""

import os

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection

import recis_torchrec as rt
from recis_torchrec.testing.multiprocess import run_ranks
from recis_torchrec.train import Task, Trainer, build_run, load_config
from recis_torchrec.train.trainer import TaskModel, outputs_probabilities
from tests.train.test_trainer import ROOT, SYNTHETIC


def _run(out, model=None, **overrides):
    cfg = load_config(SYNTHETIC)
    if model is not None:
        cfg["model"] = model
    return build_run(cfg, overrides={
        "trainer.output_dir": out, "trainer.steps": 4, "trainer.eval_every": 0, "trainer.log_every": 2,
        "trainer.progress": False, "data.batch_size": 64, "data.eval_batches": 2, **overrides})


def _trainer(run, **kw):
    return Trainer(run.model, run.args, run.train_data, run.eval_data, tasks=run.tasks,
                   dense_optimizer=run.dense_optimizer, fused_params=run.fused_params, **kw)


DEEPFM = {"name": "DeepFM", "embedding_dim": 8, "hidden_layer_size": 16, "deep_fm_dimension": 4}


def test_deepfm_probabilities_get_no_second_sigmoid(tmp_path):
    """TorchRec's SimpleDeepFMNN ends in a sigmoid: its outputs are the probabilities, the loss is
    their cross-entropy and the logged log loss is one."""
    run = _run(str(tmp_path / "run"), model=DEEPFM)
    trainer = _trainer(run)
    assert trainer.probabilities
    trainer.fit()
    model = trainer.model.model
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(2):
            b = run.eval_data.batch(i)
            p = model(b.dense_features, b.sparse_features).reshape(-1)
            assert float(p.min()) >= 0 and float(p.max()) <= 1
            total += float(F.binary_cross_entropy(p, b.labels.reshape(-1).float(), reduction="sum"))
            n += p.numel()
    got = trainer.evaluate()["ctr"]["logloss"]
    assert got == pytest.approx(total / n, rel=1e-4)
    trainer.close()


def test_a_probability_model_trains_on_the_cross_entropy_of_its_outputs():
    class Prob(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)
            self.out = torch.nn.Sigmoid()

        def forward(self, dense, sparse):
            return self.out(self.linear(dense))

    from torchrec.datasets.utils import Batch

    model = Prob()
    assert outputs_probabilities(model) and not outputs_probabilities(model, "logits")
    assert not outputs_probabilities(torch.nn.Linear(3, 1))
    batch = Batch(dense_features=torch.randn(8, 3), sparse_features=None, labels=torch.randint(0, 2, (8,)).float())
    loss, _ = TaskModel(model, [Task("ctr")], probabilities=True)(batch)
    p = model(batch.dense_features, None).reshape(-1)
    torch.testing.assert_close(loss, F.binary_cross_entropy(p, batch.labels), rtol=1e-5, atol=1e-6)


def _cpu_built(run):
    """The run's model with its EBCs materialised on the CPU, as a user who builds one there has it."""
    for m in run.model.modules():
        if type(m) is EmbeddingBagCollection:
            m.to_empty(device="cpu")
            m.reset_parameters()
    return run


def test_tables_start_empty_unless_weights_are_imported(tmp_path):
    """A freshly built CPU EBC's rows are placeholders: the tables start with no row, unless the run
    asks for the weights (then row i is id i)."""
    run = _cpu_built(_run(str(tmp_path / "a"), **{"tables.num_embeddings": 500}))
    trainer = _trainer(run)
    assert trainer.table_stats()["rows"] == 0
    trainer.close()
    run = _cpu_built(_run(str(tmp_path / "b"), **{"trainer.import_weights": True, "tables.num_embeddings": 500}))
    hint = sum(c.num_embeddings for m in run.model.modules() if type(m) is EmbeddingBagCollection
               for c in m.embedding_bag_configs())
    assert hint > 0
    trainer = _trainer(run)
    assert trainer.table_stats()["rows"] == hint
    trainer.close()


def _converted_worker(rank, world_size, out):
    run = _run(out)
    rt.convert(run.model)
    with pytest.raises(ValueError, match="already converted.*share_tables"):
        _trainer(run)


def test_a_model_converted_by_hand_is_refused_under_torchrun(tmp_path):
    run_ranks(_converted_worker, world_size=2, args=(str(tmp_path / "run"),), timeout=300)


class _Branchy(torch.nn.Module):
    """A model with Python control flow on a tensor: torch.fx cannot trace it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, dense, sparse):
        out = self.inner(dense, sparse)
        if out.sum() > 0:
            return out
        return -out


def _untraceable_worker(rank, world_size, out):
    run = _run(out)
    trainer = Trainer(_Branchy(run.model), run.args, run.train_data, run.eval_data, tasks=run.tasks,
                      fused_params=run.fused_params)
    with pytest.raises(RuntimeError, match="fx-traceable.*pipeline=False"):
        trainer.fit()
    trainer.close()


def test_an_untraceable_model_under_the_pipeline_says_so(tmp_path):
    run_ranks(_untraceable_worker, world_size=2, args=(str(tmp_path / "run"),), timeout=300)


def test_a_two_rank_cli_run_resumes_in_one_process(tmp_path):
    """A 2-rank run's checkpoint, resumed by one process: the model at any world size (as always),
    and the loader position re-derived from the rows the two ranks consumed."""
    import json

    from recis_torchrec.train.__main__ import main
    from tests.distributed.test_main_job_torchrun import torchrun_train

    out = tmp_path / "run"
    torchrun_train("synthetic_dlrm.toml", out, "--steps", "6", "--set", "trainer.save_every=6",
                   "--set", "data.batch_size=64")
    assert main(["--config", os.path.join(ROOT, "examples", "synthetic_dlrm.toml"), "--output-dir", str(out),
                 "--steps", "9", "--set", "data.batch_size=64", "--set", "trainer.progress=false"]) == 0
    records = [json.loads(x) for x in open(out / "metrics.jsonl")]
    summary = records[-1]["summary"]
    assert summary["steps"] == 9 and summary["steps_this_run"] == 3  # the time and rate cover these 3
    # 2 ranks x 6 batches were read; alone, this process resumed at batch 12 and read 3 more.
    from recis_torchrec import checkpoint

    with open(os.path.join(checkpoint.resolve(str(out / "checkpoints")), "loader-rank0.json")) as f:
        assert json.load(f)["batches"] == 15
