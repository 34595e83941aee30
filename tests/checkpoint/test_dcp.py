# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""torch.distributed.checkpoint of a model with hash tables, TorchRec-sharded tables and dense
parameters, in one call: saved at world size 2, loaded at 2, at 1 and into an unsharded model,
with equal outputs and equal next training steps; a checkpoint missing a rank's rows fails."""

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.datasets.utils import Batch

import recis_torchrec as rt
from recis_torchrec.checkpoint import CheckpointError, DCPLoadPlanner
from recis_torchrec.testing.multiprocess import run_ranks

KEYS = ["f0", "f1", "f2", "f3"]
ROWS = 60  # TorchRec's tables are bounded; the hash tables see larger ids too
DIM = 8
DENSE = 3
B = 6
HASH_TABLES = ["t0", "t1", "t2"]  # t3 goes to TorchRec's row-wise sharding in the mixed plan


def build(seed: int) -> DLRMTrain:
    torch.manual_seed(seed)
    configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[k])
               for i, k in enumerate(KEYS)]
    model = DLRMTrain(DLRM(EmbeddingBagCollection(configs, device=torch.device("meta")), DENSE, [8, DIM], [8, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": 0.1})
    return model


def batch(step: int, rank: int) -> Batch:
    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(0, 4, (len(KEYS), B), generator=g)
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
    if step % 2:  # ids the bounded TorchRec table never sees: for the hash tables only
        n0 = int(lengths[:3].sum())
        values[:n0] += torch.randint(0, 2, (n0,), generator=g) * 2**40
    return Batch(
        dense_features=torch.rand(B, DENSE, generator=g),
        sparse_features=KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths.reshape(-1)),
        labels=torch.randint(0, 2, (B,), generator=g).float(),
    )


def union(step: int, world_size: int) -> Batch:
    parts = [batch(step, r) for r in range(world_size)]
    dicts = [p.sparse_features.to_dict() for p in parts]
    return Batch(
        dense_features=torch.cat([p.dense_features for p in parts]),
        sparse_features=KeyedJaggedTensor(
            keys=KEYS,
            values=torch.cat([d[k].values() for k in KEYS for d in dicts]),
            lengths=torch.cat([d[k].lengths() for k in KEYS for d in dicts]),
        ),
        labels=torch.cat([p.labels for p in parts]),
    )


def shard(model: DLRMTrain, world_size: int, mixed: bool):
    dmp = DistributedModelParallel(
        model, device=torch.device("cpu"), sharders=rt.sharders(),
        plan=rt.plan(model, world_size, tables=HASH_TABLES if mixed else None),
    )
    dense_opt = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.Adagrad(p, lr=0.05)
    )
    return dmp, dense_opt


def step(model, dense_opt, b: Batch) -> None:
    model.train()
    loss, _ = model(b)
    dense_opt.zero_grad()
    loss.backward()
    dense_opt.step()


def logits(model, b: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        _, (_, out, _) = model(b)
    model.train()
    return out.detach()


def state(dmp, dense_opt):
    return {"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict(), "dense_optim": dense_opt.state_dict()}


def load(dmp, dense_opt, path: str, planner=None) -> None:
    st = state(dmp, dense_opt)
    dcp.load(st, checkpoint_id=path, planner=planner or DCPLoadPlanner())
    dmp.load_state_dict(st["model"])
    dmp.fused_optimizer.load_state_dict(st["optim"])
    dense_opt.load_state_dict(st["dense_optim"])


def _save_worker(rank: int, world_size: int, root: str, mixed: bool) -> None:
    dmp, opt = shard(build(0), world_size, mixed)
    for s in range(4):
        step(dmp, opt, batch(s, rank))
    dcp.save(state(dmp, opt), checkpoint_id=os.path.join(root, "ckpt"))
    expected = {"eval": logits(dmp, batch(10, rank))}
    step(dmp, opt, batch(11, rank))
    expected["after_step"] = logits(dmp, batch(10, rank))
    torch.save(expected, os.path.join(root, f"expected-{rank}.pt"))


def _load_worker(rank: int, world_size: int, root: str, mixed: bool, saved_world: int) -> None:
    dmp, opt = shard(build(123), world_size, mixed)  # other initial weights everywhere
    step(dmp, opt, batch(7, rank))  # and some rows and optimizer state the checkpoint must replace
    load(dmp, opt, os.path.join(root, "ckpt"))
    expected = [torch.load(os.path.join(root, f"expected-{r}.pt")) for r in range(saved_world)]
    if world_size == saved_world:
        ev, train, want = batch(10, rank), batch(11, rank), expected[rank]
    else:  # one rank holds every saved rank's samples
        assert world_size == 1
        ev, train = union(10, saved_world), union(11, saved_world)
        want = {k: torch.cat([e[k] for e in expected]) for k in expected[0]}
    torch.testing.assert_close(logits(dmp, ev), want["eval"], atol=1e-6, rtol=1e-5)
    step(dmp, opt, train)
    torch.testing.assert_close(logits(dmp, ev), want["after_step"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    roots = {}
    for mixed in (True, False):
        root = str(tmp_path_factory.mktemp("dcp-mixed" if mixed else "dcp-hash"))
        run_ranks(_save_worker, world_size=2, args=(root, mixed), timeout=240)
        roots[mixed] = root
    return roots


@pytest.mark.parametrize("world_size", [2, 1])
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed-plan", "hash-plan"])
def test_dcp_round_trip_at_another_world_size(saved, mixed, world_size):
    run_ranks(_load_worker, world_size=world_size, args=(saved[mixed], mixed, 2), timeout=240)


def test_dcp_checkpoint_loads_into_an_unsharded_model(saved):
    model = build(123)
    model.model.sparse_arch.embedding_bag_collection = EmbeddingBagCollection(
        model.model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": 0.1})
    rt.convert(model)
    opt = KeyedOptimizerWrapper(dict(model.named_parameters()), lambda p: torch.optim.Adagrad(p, lr=0.05))
    st = {"model": model.state_dict(), "optim": model.model.sparse_arch.embedding_bag_collection.fused_optimizer.state_dict(),
          "dense_optim": opt.state_dict()}
    # The unsharded fused optimizer's keys have no module path; DMP's have one.
    path = os.path.join(saved[False], "ckpt")
    prefix = "model.sparse_arch.embedding_bag_collection."
    st["optim"] = {"state": {prefix + k: v for k, v in st["optim"]["state"].items()}}
    dcp.load(st, checkpoint_id=path, planner=DCPLoadPlanner())
    model.load_state_dict(st["model"])
    ebc = model.model.sparse_arch.embedding_bag_collection
    ebc.fused_optimizer.load_state_dict({"state": {k[len(prefix):]: v for k, v in st["optim"]["state"].items()}})
    opt.load_state_dict(st["dense_optim"])
    expected = [torch.load(os.path.join(saved[False], f"expected-{r}.pt")) for r in range(2)]
    ev = union(10, 2)
    torch.testing.assert_close(logits(model, ev), torch.cat([e["eval"] for e in expected]), atol=1e-6, rtol=1e-5)
    step(model, opt, union(11, 2))
    torch.testing.assert_close(
        logits(model, ev), torch.cat([e["after_step"] for e in expected]), atol=1e-5, rtol=1e-5
    )


def _missing_worker(rank: int, world_size: int, path: str, match: str) -> None:
    dmp, opt = shard(build(123), world_size, True)
    # DCP gathers every rank's failure into a CheckpointException (a BaseException).
    with pytest.raises((CheckpointError, FileNotFoundError, RuntimeError, CheckpointException), match=match):
        load(dmp, opt, path)


def _copy(src: str, dst: str) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_a_checkpoint_missing_a_ranks_rows_fails_loudly(saved, tmp_path):
    # A rank's data file deleted.
    gone = str(tmp_path / "gone")
    _copy(os.path.join(saved[True], "ckpt"), gone)
    os.remove(os.path.join(gone, "__1_0.distcp"))
    run_ranks(_missing_worker, world_size=2, args=(gone, "__1_0.distcp|No such file"), timeout=240)
    # A rank's rows of one table dropped from the metadata.
    edited = str(tmp_path / "edited")
    _copy(os.path.join(saved[True], "ckpt"), edited)
    with open(os.path.join(edited, ".metadata"), "rb") as f:
        md = pickle.load(f)
    key = "model.model.sparse_arch.embedding_bag_collection.embedding_bags.t0.weight"
    entry = md.state_dict_metadata[key]
    entry.chunks = [c for c in entry.chunks if int(c.offsets[0]) == 0]
    with open(os.path.join(edited, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    run_ranks(_missing_worker, world_size=2, args=(edited, "t0.weight.*missing"), timeout=240)


def _default_planner_worker(rank: int, world_size: int, path: str) -> None:
    dmp, opt = shard(build(123), world_size, True)
    with pytest.raises((ValueError, RuntimeError, CheckpointException), match="Size mismatch|does not own"):
        load(dmp, opt, path, planner=torch.distributed.checkpoint.DefaultLoadPlanner())


def test_loading_without_the_planner_is_refused(saved):
    run_ranks(_default_planner_worker, world_size=2, args=(os.path.join(saved[True], "ckpt"),), timeout=240)
