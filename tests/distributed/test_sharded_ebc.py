# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Hash-sharded EBC under DistributedModelParallel: real 2-rank runs (gloo, CPU).

Each rank checks its own results against the unsharded
HashEmbeddingBagCollection, which every rank can compute on the union of the
ranks' batches. DDP averages the dense gradients over ranks and TorchRec's
gradient division does the same for the embedding gradients, so the sharded
step on batches b_0, b_1 equals the unsharded step on their union with the
loss (loss_0 + loss_1) / world_size.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_configs import PoolingType

import recis_torchrec as rt
from recis_torchrec import ops
from recis_torchrec.testing.multiprocess import run_ranks
from tests.devices import backend_of, devices, gpu_world_size, needs_cuda

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
KEYS = ["f0", "f1", "f2", "f3"]
BATCH = [3, 5]  # uneven batch sizes per rank
FUSED = {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "eps": 1e-6}
STEPS = 6


def table_configs():
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=60, feature_names=["f0", "f1"]),
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=40, feature_names=["f2"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=30, feature_names=["f3"]),
    ]


class TwoTower(torch.nn.Module):
    """An EBC feeding a linear layer, as a DLRM's sparse and dense parts do."""

    def __init__(self, weighted: bool = False):
        super().__init__()
        self.ebc = EmbeddingBagCollection(table_configs(), is_weighted=weighted)
        self.dense = torch.nn.Linear(8 + 8 + 8 + 4, 1)

    def forward(self, kjt: KeyedJaggedTensor):
        pooled = self.ebc(kjt).values()
        return self.dense(pooled), pooled


def make_model(seed: int = 0, weighted: bool = False) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(weighted)


def rank_batch(step: int, rank: int, world_size: int, weighted: bool = False, batch=BATCH) -> KeyedJaggedTensor:
    """Step s, rank r's batch; each step exercises one edge case."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    b = batch[rank % len(batch)]
    lengths = torch.randint(0, 4, (len(KEYS), b), generator=g)
    if step == 1 and rank == 1:
        lengths[2] = 0  # a feature with no ids on this rank
    n = int(lengths.sum())
    if step == 2:
        # every id owned by rank 0
        pool = torch.arange(-500, 500, dtype=torch.int64)
        pool = pool[ops.owner_of(pool, world_size) == 0]
        values = pool[torch.randint(0, pool.numel(), (n,), generator=g)]
    elif step == 3:
        extremes = torch.tensor([INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1, -1, -(2**40), 0], dtype=torch.int64)
        values = extremes[torch.randint(0, extremes.numel(), (n,), generator=g)]
    else:
        values = torch.randint(-20, 90, (n,), generator=g)  # imported ids (< num_embeddings) and new ones
    weights = torch.rand(n, generator=g) if weighted else None
    return KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths.reshape(-1), weights=weights)


def union_batch(step: int, world_size: int, weighted: bool = False, batch=BATCH) -> KeyedJaggedTensor:
    parts = [rank_batch(step, r, world_size, weighted, batch).to_dict() for r in range(world_size)]
    values, lengths, weights = [], [], []
    for k in KEYS:
        for p in parts:
            values.append(p[k].values())
            lengths.append(p[k].lengths())
            if weighted:
                weights.append(p[k].weights())
    return KeyedJaggedTensor(
        keys=KEYS,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weighted else None,
    )


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    return ((logits - 0.5) ** 2).sum()


def rows_of(table) -> dict:
    ids, weights, _ = table.export()
    return {i: w for i, w in zip(ids.tolist(), weights)}


def check_owned_rows(sharded_tables, ref_tables, rank, world_size) -> None:
    """Each sharded table holds exactly the ids this rank owns, with the reference tables' rows."""
    for name, table in sharded_tables.items():
        mine, ref = rows_of(table), rows_of(ref_tables[name])
        owned = [i for i in ref if int(ops.owner_of(torch.tensor([i]), world_size)) == rank]
        assert sorted(mine) == sorted(owned), name
        for i, w in mine.items():
            torch.testing.assert_close(w, ref[i], atol=1e-5, rtol=1e-5)


def check_parity(rank: int, world_size: int, merge_tables: bool, weighted: bool) -> None:
    model = make_model(weighted=weighted)
    reference = copy.deepcopy(model)
    reference.ebc = rt.convert(reference.ebc, fused_params=FUSED)
    ref_opt = torch.optim.SGD(reference.dense.parameters(), lr=0.05)

    dmp = DistributedModelParallel(
        model, sharders=rt.sharders(FUSED, merge_tables=merge_tables), plan=rt.plan(model, world_size)
    )
    sharded = dmp.module.ebc
    assert type(sharded).__name__ == "ShardedHashEmbeddingBagCollection"
    assert len(sharded._groups) == (2 if merge_tables else 3)
    dense_opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.05)

    offset = sum(BATCH[r % len(BATCH)] for r in range(rank))
    b = BATCH[rank % len(BATCH)]
    for step in range(STEPS):
        logits, pooled = dmp(rank_batch(step, rank, world_size, weighted))
        ref_logits, ref_pooled = reference(union_batch(step, world_size, weighted))
        torch.testing.assert_close(pooled, ref_pooled[offset : offset + b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, ref_logits[offset : offset + b], atol=1e-5, rtol=1e-5)
        dense_opt.zero_grad()
        loss_of(logits).backward()
        dense_opt.step()
        ref_opt.zero_grad()
        bounds = [0] + list(torch.tensor([BATCH[r % len(BATCH)] for r in range(world_size)]).cumsum(0).tolist())
        ref_loss = sum(loss_of(ref_logits[bounds[r] : bounds[r + 1]]) for r in range(world_size)) / world_size
        ref_loss.backward()
        ref_opt.step()

    # Every row this rank owns equals the unsharded one; together the ranks hold them all.
    for name, table in sharded.tables().items():
        ours, ref = rows_of(table), rows_of(reference.ebc.tables()[name])
        owned = [i for i in ref if int(ops.owner_of(torch.tensor([i]), world_size)) == rank]
        assert sorted(ours) == sorted(owned), name
        for i, w in ours.items():
            torch.testing.assert_close(w, ref[i], atol=1e-5, rtol=1e-5)
    assert sharded.fused_optimizer.steps() == {"t0": STEPS, "t1": STEPS, "t2": STEPS}


def _parity_worker(rank: int, world_size: int) -> None:
    check_parity(rank, world_size, merge_tables=True, weighted=False)
    check_parity(rank, world_size, merge_tables=False, weighted=False)
    check_parity(rank, world_size, merge_tables=True, weighted=True)


def test_sharded_training_equals_unsharded_on_the_union_batch():
    run_ranks(_parity_worker, world_size=2, timeout=400)


def _state_lr_and_errors_worker(rank: int, world_size: int) -> None:
    model = make_model()
    dmp = DistributedModelParallel(model, sharders=rt.sharders(FUSED), plan=rt.plan(model, world_size))
    for step in range(2):
        logits, _ = dmp(rank_batch(step, rank, world_size))
        loss_of(logits).backward()

    # dmp.fused_optimizer holds ours; a learning-rate change reaches the update.
    groups = dmp.fused_optimizer.param_groups
    assert any(abs(g["lr"] - FUSED["learning_rate"]) < 1e-12 for g in groups)
    for g in groups:
        g["lr"] = 0.0
    before = {n: rows_of(t) for n, t in dmp.module.ebc.tables().items()}
    logits, _ = dmp(rank_batch(0, rank, world_size))  # ids seen before: no inserts
    loss_of(logits).backward()
    for n, t in dmp.module.ebc.tables().items():
        after = rows_of(t)
        assert after.keys() == before[n].keys()
        for i in after:
            assert torch.equal(after[i], before[n][i])

    # state_dict round trip at the same world size.
    sd = dmp.state_dict()
    assert "ebc.embedding_bags.t0.weight" in sd and "ebc.embedding_bags.t0.ids" in sd
    other = make_model(seed=7)
    dmp2 = DistributedModelParallel(other, sharders=rt.sharders(FUSED), plan=rt.plan(other, world_size))
    dmp2.load_state_dict(sd)
    dmp.eval()
    dmp2.eval()
    with torch.no_grad():
        a, _ = dmp(rank_batch(4, rank, world_size))
        b, _ = dmp2(rank_batch(4, rank, world_size))
    torch.testing.assert_close(a, b)

    # A plan for another world size fails clearly on every rank; nothing hangs.
    bad = make_model()
    with pytest.raises(ValueError, match="planned over 3 ranks but the world size is 2"):
        DistributedModelParallel(bad, sharders=rt.sharders(FUSED), plan=rt.plan(bad, 3))
    dist.barrier()


def test_lr_change_state_dict_round_trip_and_world_size_error():
    run_ranks(_state_lr_and_errors_worker, world_size=2, timeout=300)


def test_plan_rejects_unknown_tables_and_keeps_base_entries():
    model = make_model()
    with pytest.raises(ValueError, match=r"tables \['nope'\] are not in any EmbeddingBagCollection"):
        rt.plan(model, 2, tables=["t0", "nope"])
    p = rt.plan(model, 2, tables=["t0"])
    entry = p.plan["ebc"]
    assert entry["t0"].sharding_type == rt.distributed.HASH_SHARDING
    assert entry["t1"].sharding_type == "row_wise" and entry["t2"].sharding_type == "row_wise"
    assert entry["t1"].compute_kernel == "fused"
    assert rt.plan(model, 2, base=p, tables=["t1"]).plan["ebc"]["t0"].sharding_type == rt.distributed.HASH_SHARDING


ROWWISE = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8}


def _mixed_plan_worker(rank: int, world_size: int) -> None:
    # t0 and t1 on hash sharding, t2 on TorchRec's row-wise sharding (FBGEMM).
    # Equal batch sizes: TorchRec's row-wise output dist on gloo needs them
    # (hash sharding does not; the other tests use uneven ones).
    even = [4, 4]
    model = make_model()
    reference = copy.deepcopy(model)
    reference.ebc = rt.convert(reference.ebc, fused_params=ROWWISE)
    ref_opt = torch.optim.SGD(reference.dense.parameters(), lr=0.05)
    original_t2 = model.ebc.embedding_bags["t2"].weight.detach().clone()
    dmp = DistributedModelParallel(
        model, sharders=rt.sharders(ROWWISE), plan=rt.plan(model, world_size, tables=["t0", "t1"])
    )
    sharded = dmp.module.ebc
    assert sorted(sharded.tables()) == ["t0", "t1"] and sharded.torchrec is not None
    # TorchRec does not copy unsharded weights into its shards; do it so both start equal.
    # The TorchRec child's table sits at the unsharded EBC's key.
    shard_tensor = dmp.state_dict()["ebc.embedding_bags.t2.weight"]
    for shard in shard_tensor.local_shards():
        rows = shard.metadata.shard_offsets[0]
        with torch.no_grad():
            shard.tensor.copy_(original_t2[rows : rows + shard.tensor.shape[0]])
    dense_opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.05)
    offset, b = 4 * rank, 4
    bounds = [0, 4, 8]
    for it, step in enumerate((0, 4, 5, 0)):  # bounded ids only: t2 is a fixed-size TorchRec table
        batch = rank_batch(step, rank, world_size, batch=even)
        batch = KeyedJaggedTensor(keys=KEYS, values=batch.values().abs() % 30, lengths=batch.lengths())
        union = union_batch(step, world_size, batch=even)
        union = KeyedJaggedTensor(keys=KEYS, values=union.values().abs() % 30, lengths=union.lengths())
        logits, pooled = dmp(batch)
        ref_logits, ref_pooled = reference(union)
        torch.testing.assert_close(
            pooled, ref_pooled[offset : offset + b], atol=1e-5, rtol=1e-5, msg=lambda m: f"iteration {it}: {m}"
        )
        dense_opt.zero_grad()
        loss_of(logits).backward()
        dense_opt.step()
        ref_opt.zero_grad()
        (sum(loss_of(ref_logits[bounds[r] : bounds[r + 1]]) for r in range(world_size)) / world_size).backward()
        ref_opt.step()
    # The TorchRec shard trained as the unsharded reference did.
    ref_t2 = rows_of(reference.ebc.tables()["t2"])
    for shard in dmp.state_dict()["ebc.embedding_bags.t2.weight"].local_shards():
        rows = shard.metadata.shard_offsets[0]
        for i in range(shard.tensor.shape[0]):
            torch.testing.assert_close(shard.tensor[i], ref_t2[rows + i], atol=1e-5, rtol=1e-5)
    # dmp.fused_optimizer holds both kinds of tables.
    keys = dmp.fused_optimizer.state_dict()["state"].keys()
    assert any("t0" in k for k in keys) and any("t2" in k for k in keys)


def test_mixed_plan_hash_and_torchrec_row_wise():
    run_ranks(_mixed_plan_worker, world_size=2, timeout=300)


class _PipelinedTower(torch.nn.Module):
    def __init__(self, tower: TwoTower):
        super().__init__()
        self.tower = tower

    def forward(self, batch):
        logits, pooled = self.tower(batch.sparse_features)
        return loss_of(logits), (logits.detach(), pooled.detach())


def _pipeline_worker(rank: int, world_size: int, device_type: str = "cpu") -> None:
    from torchrec.datasets.utils import Batch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    device = torch.device("cpu") if device_type == "cpu" else torch.device("cuda", torch.cuda.current_device())
    # The plain loop gets its batches on the device; the pipeline copies them there itself (on its
    # memcpy stream, then the data-dist stream on CUDA).
    batches = [
        Batch(
            dense_features=torch.zeros(BATCH[rank % len(BATCH)], 1),
            sparse_features=rank_batch(step, rank, world_size),
            labels=torch.zeros(BATCH[rank % len(BATCH)]),
        )
        for step in range(STEPS)
    ]
    results = []
    for pipelined in (False, True):
        model = _PipelinedTower(make_model())
        dmp = DistributedModelParallel(model, device=device, sharders=rt.sharders(FUSED),
                                       plan=rt.plan(model, world_size, device_type=device_type))
        opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.05)
        outputs = []
        if pipelined:
            pipeline = TrainPipelineSparseDist(dmp, opt, device, execute_all_batches=True)
            it = iter(batches)
            for _ in range(STEPS):
                outputs.append(pipeline.progress(it))
        else:
            for batch in batches:
                opt.zero_grad()
                loss, out = dmp(batch.to(device))
                loss.backward()
                opt.step()
                outputs.append(out)
        tables = {n: rows_of(t) for n, t in dmp.module.tower.ebc.tables().items()}
        results.append((outputs, tables))
    (plain, plain_tables), (piped, piped_tables) = results
    for (a_logits, a_pooled), (b_logits, b_pooled) in zip(plain, piped):
        torch.testing.assert_close(b_pooled, a_pooled, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(b_logits, a_logits, atol=1e-6, rtol=1e-6)
    for n in plain_tables:
        assert plain_tables[n].keys() == piped_tables[n].keys()
        for i in plain_tables[n]:
            torch.testing.assert_close(piped_tables[n][i], plain_tables[n][i], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", devices())
def test_train_pipeline_sparse_dist_equals_plain_loop(device):
    world_size = 2 if device == "cpu" else gpu_world_size()
    run_ranks(_pipeline_worker, world_size=world_size, args=(device,), backend=backend_of(device), timeout=300)


def _gradient_division_worker(rank: int, world_size: int) -> None:
    from torchrec.distributed.comm_ops import get_gradient_division, set_gradient_division

    sgd = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
    deltas = {}
    default = get_gradient_division()
    try:
        for division in (True, False):
            set_gradient_division(division)
            model = make_model()
            dmp = DistributedModelParallel(model, sharders=rt.sharders(sgd), plan=rt.plan(model, world_size))
            table = dmp.module.ebc.tables()["t0"]
            before = rows_of(table)
            logits, _ = dmp(rank_batch(0, rank, world_size))
            loss_of(logits).backward()
            after = rows_of(table)
            deltas[division] = {i: after[i] - before[i] for i in before}
    finally:
        set_gradient_division(default)
    moved = [i for i, d in deltas[True].items() if d.abs().max() > 0]
    assert moved, "the step updated no row of t0 on this rank"
    for i in moved:  # without division the owners apply the summed, not the averaged, gradient
        torch.testing.assert_close(deltas[False][i], world_size * deltas[True][i], atol=1e-6, rtol=1e-5)


def test_gradient_division_is_honoured():
    run_ranks(_gradient_division_worker, world_size=2, timeout=300)


# -- on GPUs ---------------------------------------------------------------------------------


def _gpu_ebc_worker(rank: int, world_size: int) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    model = make_model()
    reference = copy.deepcopy(model)
    reference.ebc = rt.convert(reference.ebc, fused_params=FUSED)
    ref_opt = torch.optim.SGD(reference.dense.parameters(), lr=0.05)
    dmp = DistributedModelParallel(
        model, device=device, sharders=rt.sharders(FUSED), plan=rt.plan(model, world_size, device_type="cuda")
    )
    assert dmp.module.ebc.device.type == "cuda"
    opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.05)
    batch = BATCH
    offset = sum(batch[r % len(batch)] for r in range(rank))
    b = batch[rank % len(batch)]
    bounds = [0] + torch.tensor([batch[r % len(batch)] for r in range(world_size)]).cumsum(0).tolist()
    for step in range(STEPS):
        logits, pooled = dmp(rank_batch(step, rank, world_size).to(device))
        ref_logits, ref_pooled = reference(union_batch(step, world_size))
        torch.testing.assert_close(pooled.cpu(), ref_pooled[offset : offset + b], atol=1e-5, rtol=1e-5)
        opt.zero_grad()
        loss_of(logits).backward()
        opt.step()
        ref_opt.zero_grad()
        (sum(loss_of(ref_logits[bounds[r] : bounds[r + 1]]) for r in range(world_size)) / world_size).backward()
        ref_opt.step()
    check_owned_rows(dmp.module.ebc.tables(), reference.ebc.tables(), rank, world_size)


@needs_cuda
def test_sharded_ebc_on_gpus_equals_unsharded_cpu():
    """NCCL, one rank per GPU (one GPU still runs every all-to-all), against the unsharded CPU modules."""
    run_ranks(_gpu_ebc_worker, world_size=gpu_world_size(), backend="nccl", timeout=600)


def test_context_record_stream_reaches_every_tensor_the_step_keeps():
    """What input dist leaves in a context (mean scales, the inverse indices, each sequence table's
    gather index and its features' lengths and ids) is found by the walk record_stream makes."""
    from recis_torchrec.distributed.embedding import HashECContext
    from recis_torchrec.distributed.embeddingbag import HashEBCContext, context_tensors

    ebc_ctx = HashEBCContext(num_groups=2)
    ebc_ctx.mean_scales = [torch.ones(3), None, torch.ones(2)]
    ebc_ctx.inverse_indices = (["f0"], torch.zeros(1, 4, dtype=torch.int64))
    want = [ebc_ctx.mean_scales[0], ebc_ctx.mean_scales[2], ebc_ctx.inverse_indices[1]]
    assert {id(t) for t in context_tensors(ebc_ctx)} == {id(t) for t in want}
    ec_ctx = HashECContext(num_tables=2)
    ec_ctx.tables[1].gather = torch.arange(5)
    ec_ctx.features = [[("e", torch.ones(2, dtype=torch.int64), torch.arange(2))]]
    want = [ec_ctx.tables[0].gather, ec_ctx.tables[1].gather, *ec_ctx.features[0][0][1:]]
    assert {id(t) for t in context_tensors(ec_ctx)} == {id(t) for t in want}
    ec_ctx.record_stream(None)  # CPU tensors: nothing to record, and no error
