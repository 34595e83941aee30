# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""FP16 and BF16 tables (``EmbeddingBagConfig(data_type=...)``): rows stored at half width, optimizer
state in float32, arithmetic in float32 with round-to-nearest-even stores. FP16 is checked against
FBGEMM's TBE with FP16 weights (deterministic rounding) on the same ids; BF16, which FBGEMM's CPU
TBE does not run, against plain PyTorch doing the same float32 arithmetic."""

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from safetensors import safe_open
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType

import recis_torchrec as rt
from recis_torchrec import checkpoint

ROWS, DIM = 60, 16
DTYPES = {DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}


def module(data_type, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, lr=0.1, **kw):
    cfg = [EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["f"],
                              data_type=data_type)]
    return rt.HashEmbeddingBagCollection(cfg, fused_params={"optimizer": optimizer, "learning_rate": lr, **kw})


def batches(steps=5, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, 5, (batch,), generator=g)
        out.append((torch.randint(0, ROWS, (int(lengths.sum()),), generator=g), lengths))
    return out


def loss_of(values):
    return ((values - torch.linspace(-1, 1, values.shape[1])) ** 2).sum()


@pytest.mark.parametrize("optimizer", [EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.EXACT_SGD,
                                       EmbOptimType.EXACT_ADAGRAD])
def test_fp16_table_trains_as_fbgemm_tbe_with_fp16_weights(optimizer):
    ours = module(DataType.FP16, optimizer)
    table = ours.tables()["t"]
    ids = torch.arange(ROWS)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(ROWS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=optimizer, learning_rate=0.1, eps=1e-8,
        weights_precision=SparseType.FP16, pooling_mode=PoolingMode.SUM, stochastic_rounding=False,
    )
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(table.lookup(ids).half())
    for values, lengths in batches():
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        want = tbe(values, offsets).float()
        got = ours(KeyedJaggedTensor(keys=["f"], values=values, lengths=lengths)).values()
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        loss_of(want).backward()
        loss_of(got).backward()
    torch.testing.assert_close(table.lookup(ids), tbe.split_embedding_weights()[0].float(), atol=1e-3, rtol=1e-3)
    ids_out, weights, _ = table.export()
    assert weights.dtype == torch.float16


def reference_rowwise_adagrad(weights, values, lengths, steps_state, lr=0.1, eps=1e-8, dtype=torch.bfloat16):
    """One step of row-wise Adagrad on half-width rows in plain PyTorch: float32 math, rounded stores."""
    w = weights.float().requires_grad_()
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    pooled = torch.zeros(lengths.numel(), DIM).index_add(0, bag, w[values])
    loss_of(pooled).backward()
    with torch.no_grad():
        g = w.grad
        touched = torch.unique(values)
        m = steps_state[touched] + (g[touched] ** 2).mean(1)
        steps_state[touched] = m
        new = w[touched] - (lr / (m.sqrt() + eps))[:, None] * g[touched]
        out = weights.clone()
        out[touched] = new.to(dtype)
    return pooled.detach(), out


def test_bf16_table_trains_as_plain_pytorch_rounding_to_bf16():
    ours = module(DataType.BF16)
    table = ours.tables()["t"]
    ids = torch.arange(ROWS)
    weights = table.lookup(ids).to(torch.bfloat16)
    assert torch.equal(weights.float(), table.lookup(ids))  # initial rows are representable in bf16
    momentum = torch.zeros(ROWS)
    for values, lengths in batches():
        got = ours(KeyedJaggedTensor(keys=["f"], values=values, lengths=lengths)).values()
        want, weights = reference_rowwise_adagrad(weights, values, lengths, momentum)
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
        loss_of(got).backward()
        present = table.find(ids) >= 0
        torch.testing.assert_close(table.lookup(ids)[present], weights.float()[present], atol=1e-2, rtol=1e-2)
    assert table.export()[1].dtype == torch.bfloat16


@pytest.mark.parametrize("data_type", list(DTYPES), ids=lambda d: d.name)
def test_half_rows_are_rounded_to_nearest_even_and_initial_values_agree(data_type):
    ours = module(data_type, EmbOptimType.EXACT_SGD)
    table = ours.tables()["t"]
    fp32 = module(DataType.FP32, EmbOptimType.EXACT_SGD).tables()["t"]
    ids = torch.arange(-50, 50)
    # An unseen id reads the value its row would be stored with: the float32 initial value, rounded.
    torch.testing.assert_close(table.lookup(ids), fp32.lookup(ids).to(DTYPES[data_type]).float(), atol=0, rtol=0)
    table.find_or_insert(ids)
    torch.testing.assert_close(table.lookup(ids), fp32.lookup(ids).to(DTYPES[data_type]).float(), atol=0, rtol=0)
    # Stores round to nearest even (as torch's conversion does), including ties and subnormals.
    probe = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 3e-6, -7e-8, 70000.0, 65519.0, 1e-30, -0.0])
    rows = probe.repeat(DIM // 8 * 2)[:DIM].expand(3, DIM).contiguous()
    table.import_(torch.tensor([1000, 1001, 1002]), rows)
    torch.testing.assert_close(table.lookup(torch.tensor([1000, 1001, 1002])),
                               rows.to(DTYPES[data_type]).float(), atol=0, rtol=0, equal_nan=True)


def test_memory_per_row_halves():
    for dim in (64, 128):
        infos = {}
        for data_type in (DataType.FP32, DataType.FP16, DataType.BF16):
            cfg = [EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=10, feature_names=["f"],
                                      data_type=data_type)]
            m = rt.HashEmbeddingBagCollection(cfg, fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD})
            infos[data_type] = m.tables()["t"].info()["row_bytes"]
        assert infos[DataType.FP32] == 4 * (dim + 1)  # rows are packed at 4 bytes: no padding
        assert infos[DataType.FP16] == infos[DataType.BF16] == 2 * dim + 4
        assert infos[DataType.FP16] <= 0.52 * infos[DataType.FP32]


def test_other_data_types_and_cuda_half_tables_raise():
    cfg = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"],
                              data_type=DataType.INT8)]
    with pytest.raises(NotImplementedError, match="table 't': data_type INT8 is not supported"):
        rt.HashEmbeddingBagCollection(cfg)


@pytest.mark.parametrize("data_type", list(DTYPES), ids=lambda d: d.name)
def test_half_tables_keep_their_dtype_through_state_dicts_checkpoints_and_deltas(data_type, tmp_path):
    dtype = DTYPES[data_type]
    ours = module(data_type)
    for values, lengths in batches():
        loss_of(ours(KeyedJaggedTensor(keys=["f"], values=values, lengths=lengths)).values()).backward()
    sd = ours.state_dict()
    assert sd["embedding_bags.t.weight"].dtype == dtype
    copy_ = module(data_type)
    copy_.load_state_dict(sd)
    ids = torch.arange(ROWS)
    assert torch.equal(copy_.tables()["t"].lookup(ids), ours.tables()["t"].lookup(ids))
    path = checkpoint.save(str(tmp_path / "ckpt"), ours, step=5)
    files = [f for f in (tmp_path / "ckpt").rglob("rank0-part0.safetensors")]
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.get_tensor("weights").dtype == dtype
    restored = module(data_type)
    checkpoint.load(path, restored)
    assert torch.equal(restored.tables()["t"].lookup(ids), ours.tables()["t"].lookup(ids))
    base = module(data_type)
    checkpoint.load(path, base)
    values, lengths = batches(1, seed=9)[0]
    loss_of(ours(KeyedJaggedTensor(keys=["f"], values=values, lengths=lengths)).values()).backward()
    checkpoint.export_delta(str(tmp_path / "delta"), ours, since_step=path)
    checkpoint.apply_delta(str(tmp_path / "delta"), base)
    assert torch.equal(base.tables()["t"].lookup(ids), ours.tables()["t"].lookup(ids))
    # The half table's state dict loads into a float32 table (the rows as the half table holds them).
    fp32 = module(DataType.FP32)
    fp32.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()})
    saved = sd["embedding_bags.t.ids"]
    torch.testing.assert_close(fp32.tables()["t"].lookup(saved), copy_.tables()["t"].lookup(saved), atol=0, rtol=0)


def test_torchrec_fp16_ebc_converts_with_its_dtype():
    cfg = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=ROWS, feature_names=["f"],
                              data_type=DataType.FP16)]
    torch.manual_seed(0)
    theirs = EmbeddingBagCollection(cfg)
    ours = rt.convert(copy.deepcopy(theirs))
    assert ours.tables()["t"].dtype == torch.float16
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([2, 2]))
    torch.testing.assert_close(ours(kjt).values(), theirs(kjt).values().float(), atol=1e-3, rtol=1e-3)


def test_half_tables_keep_their_dtype_through_dcp(tmp_path):
    import torch.distributed.checkpoint as dcp

    ours = module(DataType.FP16)
    for values, lengths in batches():
        loss_of(ours(KeyedJaggedTensor(keys=["f"], values=values, lengths=lengths)).values()).backward()
    dcp.save({"model": ours.state_dict(), "optim": ours.fused_optimizer.state_dict()}, checkpoint_id=str(tmp_path))
    md = dcp.FileSystemReader(str(tmp_path)).read_metadata()
    assert md.state_dict_metadata["model.embedding_bags.t.weight"].properties.dtype == torch.float16
    fresh = module(DataType.FP16)
    state = {"model": fresh.state_dict(), "optim": fresh.fused_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path), planner=checkpoint.DCPLoadPlanner())
    fresh.load_state_dict(state["model"])
    fresh.fused_optimizer.load_state_dict(state["optim"])
    ids = torch.arange(ROWS)
    assert torch.equal(fresh.tables()["t"].lookup(ids), ours.tables()["t"].lookup(ids))
    a, b = ours.tables()["t"].export(), fresh.tables()["t"].export()
    assert torch.equal(a[2][torch.argsort(a[0])], b[2][torch.argsort(b[0])])  # row-wise Adagrad state
