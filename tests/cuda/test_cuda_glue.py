# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The Python side of the CUDA lookups, run here without a GPU.

``_CudaPooledLookup`` turns a KJT into per-table kernel launches: one forward launch per feature
(its bags' offsets rebased to its own values), one backward launch per table (the bags of all the
table's features stacked, their gradient columns stacked the same way), with the table's step
count. These tests put CPU tables behind the CUDA tables' interface and the CPU ops behind the
two kernel entry points (same contract: offsets from 0 to the values given, one pooling mode, an
output/gradient column), and check the module against the CPU module on the same batches. The
kernels themselves are checked against the CPU in test_cuda_tables.py, on a GPU.
"""

from typing import Dict

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

import recis_torchrec as rt
from recis_torchrec import ops
from recis_torchrec.modules.cuda_table import CudaLookupGroup, CudaLookupPlan
from recis_torchrec.modules.kjt import checked_kjt
from recis_torchrec.ops.update_args import UpdateArgs
from recis_torchrec.modules.lookup import LookupGroup, sequence_lookup
from recis_torchrec.testing import random_kjt

KEYS = ["f0", "f1", "f2", "f3"]
FUSED = {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "eps": 1e-6}


class _CpuBehindCuda:
    """A CPU HashTable seen through the CudaHashTable members the lookup uses."""

    registry: Dict[int, object] = {}

    def __init__(self, table):
        self.table = table
        self.name = table.name
        self.dim = table.dim
        self.handle = id(self)
        _CpuBehindCuda.registry[self.handle] = table

    def find_or_insert(self, ids):
        return self.table.find_or_insert(ids)

    def find(self, ids):
        return self.table.find(ids)


def _forward_kernel(handle, ids, rows, offsets, weights, mode, out, col):
    table = _CpuBehindCuda.registry[handle]
    assert int(offsets[0]) == 0 and int(offsets[-1]) == ids.numel() == rows.numel()
    assert weights is None or weights.numel() == ids.numel()
    out[:, col : col + table.dim] = ops.pooled_forward([table], ids, rows, offsets, weights, [0], [mode], [0], table.dim)


def _backward_kernel(handle, rows, offsets, weights, mode, grad, col, optimizer, lr, eps, beta1, beta2, wd, wd_mode,
                     step):
    table = _CpuBehindCuda.registry[handle]
    assert int(offsets[0]) == 0 and int(offsets[-1]) == rows.numel()
    assert grad.shape[0] == offsets.numel() - 1 and col + table.dim <= grad.shape[1]
    ops.pooled_backward_update([table], grad[:, col : col + table.dim].contiguous(), rows, offsets, weights, [0], [mode],
                               [0], UpdateArgs(optimizer, lr, eps, beta1, beta2, wd, wd_mode, [step]))


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setattr(torch.ops.recis, "gpu_pooled_forward", _forward_kernel, raising=False)
    monkeypatch.setattr(torch.ops.recis, "gpu_pooled_backward_update", _backward_kernel, raising=False)
    yield
    _CpuBehindCuda.registry.clear()


def configs(pooling):
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=30, feature_names=["f0", "f2"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=30, feature_names=["f1"], pooling=pooling),
        # f2 again: a feature read by two tables (the module permutes the KJT so each key has one table)
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=30, feature_names=["f3", "f2"], pooling=pooling),
    ]


def loss_of(values):
    return ((values - torch.linspace(-1, 1, values.shape[1])) ** 2).sum()


@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False),
                                              (PoolingType.SUM, True)])
def test_cuda_lookup_glue_equals_the_cpu_module(kernels, pooling, weighted):
    torch.manual_seed(0)
    reference = rt.HashEmbeddingBagCollection(configs(pooling), is_weighted=weighted, fused_params=FUSED)
    module = rt.HashEmbeddingBagCollection(configs(pooling), is_weighted=weighted, fused_params=FUSED)
    group = CudaLookupGroup([_CpuBehindCuda(t) for t in module._table_list], module.hash_optimizer)
    for step in range(5):
        kjt = random_kjt(KEYS, 5, 4, num_ids=30, weighted=weighted, seed=step)
        want = reference(kjt).values()
        plan = module._plan(kjt.keys())
        features = kjt.permute(plan.permute) if plan.permute is not None else kjt
        values, offsets, weights, _ = checked_kjt(features, weighted)
        cuda_plan = CudaLookupPlan.from_layout(plan.layout, features, module._table_modes)
        got = group(values, offsets, weights, cuda_plan, True)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        loss_of(want).backward()
        loss_of(got).backward()
    for name, table in reference.tables().items():
        a, b = table.export(), module.tables()[name].export()
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-6)
    assert module.fused_optimizer.steps() == reference.fused_optimizer.steps() == {"t0": 5, "t1": 5, "t2": 5}


def test_cuda_sequence_glue_equals_the_cpu_sequence_lookup(kernels):
    from recis_torchrec.modules.hash_table import HashTable
    from recis_torchrec.optim.fused import HashFusedOptimizer, parse_fused_params

    config = parse_fused_params(FUSED)
    tables = [HashTable("seq", 8, config.state_dim(8)) for _ in range(2)]
    optims = [HashFusedOptimizer({"seq": t}, config) for t in tables]
    cpu = LookupGroup([tables[0]], optims[0])
    gpu = CudaLookupGroup([_CpuBehindCuda(tables[1])], optims[1])
    for step in range(4):
        ids = torch.randint(0, 50, (200,), generator=torch.Generator().manual_seed(step))
        ids[:5] = ids[0]  # repeats
        want = sequence_lookup(cpu, ids, True)
        got = gpu.sequence(ids, True)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        loss_of(want).backward()
        loss_of(got).backward()
    for x, y in zip(tables[0].export(), tables[1].export()):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-6)
