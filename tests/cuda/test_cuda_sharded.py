# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Hash sharding on GPUs under DistributedModelParallel with NCCL: as many ranks as GPUs (one GPU:
one rank, which still runs every all-to-all). Each rank checks its results against the unsharded
CPU modules on the union of the ranks' batches, as the gloo tests in tests/distributed do.
Skipped without a GPU and a RECIS_CUDA=1 build.
"""

import copy

import pytest
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel

import recis_torchrec as rt
from recis_torchrec import ops
from recis_torchrec.ops.devices import cuda_tables_available
from recis_torchrec.testing.multiprocess import run_ranks
from tests.distributed import test_sharded_ebc as ebc_case
from tests.distributed import test_sharded_ec as ec_case

pytestmark = pytest.mark.skipif(
    not cuda_tables_available(), reason="needs a GPU and an extension built with RECIS_CUDA=1"
)


def _world_size() -> int:
    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def _rows_of(table) -> dict:
    ids, weights, _ = table.export()
    return {i: w for i, w in zip(ids.tolist(), weights)}


def _check_rows(sharded_tables, ref_tables, rank, world_size):
    for name, table in sharded_tables.items():
        mine, ref = _rows_of(table), _rows_of(ref_tables[name])
        owned = [i for i in ref if int(ops.owner_of(torch.tensor([i]), world_size)) == rank]
        assert sorted(mine) == sorted(owned), name
        for i, w in mine.items():
            torch.testing.assert_close(w, ref[i], atol=1e-5, rtol=1e-5)


def _ebc_worker(rank: int, world_size: int) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    model = ebc_case.make_model()
    reference = copy.deepcopy(model)
    reference.ebc = rt.convert(reference.ebc, fused_params=ebc_case.FUSED)
    ref_opt = torch.optim.SGD(reference.dense.parameters(), lr=0.05)
    dmp = DistributedModelParallel(
        model, device=device, sharders=rt.sharders(ebc_case.FUSED), plan=rt.plan(model, world_size, device_type="cuda")
    )
    assert dmp.module.ebc.device.type == "cuda"
    opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.05)
    batch = ebc_case.BATCH
    offset = sum(batch[r % len(batch)] for r in range(rank))
    b = batch[rank % len(batch)]
    bounds = [0] + torch.tensor([batch[r % len(batch)] for r in range(world_size)]).cumsum(0).tolist()
    for step in range(ebc_case.STEPS):
        logits, pooled = dmp(ebc_case.rank_batch(step, rank, world_size).to(device))
        ref_logits, ref_pooled = reference(ebc_case.union_batch(step, world_size))
        torch.testing.assert_close(pooled.cpu(), ref_pooled[offset : offset + b], atol=1e-5, rtol=1e-5)
        opt.zero_grad()
        ebc_case.loss_of(logits).backward()
        opt.step()
        ref_opt.zero_grad()
        (sum(ebc_case.loss_of(ref_logits[bounds[r] : bounds[r + 1]]) for r in range(world_size)) / world_size).backward()
        ref_opt.step()
    _check_rows(dmp.module.ebc.tables(), reference.ebc.tables(), rank, world_size)


def _ec_worker(rank: int, world_size: int) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = ec_case.SeqTower(with_ebc=True)
    reference = copy.deepcopy(model)
    rt.convert(reference, fused_params=ec_case.FUSED, share_tables=True)
    ref_opt = torch.optim.SGD(reference.dense.parameters(), lr=0.05)
    plan = rt.plan(model, world_size, share_tables=True, device_type="cuda")
    dmp = DistributedModelParallel(model, device=device, sharders=rt.sharders(ec_case.FUSED), plan=plan)
    opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.05)
    batch = ec_case.BATCH
    offset = sum(batch[r % len(batch)] for r in range(rank))
    bounds = [0] + torch.tensor([batch[r % len(batch)] for r in range(world_size)]).cumsum(0).tolist()
    for step in range(ec_case.STEPS):
        logits, _ = dmp(ec_case.rank_batch(step, rank, world_size).to(device))
        ref_logits, _ = reference(ec_case.union_batch(step, world_size))
        torch.testing.assert_close(logits.cpu(), ref_logits[offset : offset + batch[rank % 2]], atol=1e-5, rtol=1e-5)
        opt.zero_grad()
        ec_case.loss_of(logits).backward()
        opt.step()
        ref_opt.zero_grad()
        (sum(ec_case.loss_of(ref_logits[bounds[r] : bounds[r + 1]]) for r in range(world_size)) / world_size).backward()
        ref_opt.step()
    tables = dict(dmp.module.ec.tables())
    tables.update(dmp.module.ebc.tables())
    ref_tables = dict(reference.ec.tables())
    ref_tables.update(reference.ebc.tables())
    _check_rows(tables, ref_tables, rank, world_size)


def test_sharded_ebc_on_gpus_equals_unsharded_cpu():
    run_ranks(_ebc_worker, world_size=_world_size(), backend="nccl", timeout=600)


def test_sharded_ec_with_a_shared_table_on_gpus_equals_unsharded_cpu():
    run_ranks(_ec_worker, world_size=_world_size(), backend="nccl", timeout=600)
