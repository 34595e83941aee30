# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Hash-sharded EmbeddingCollection under DistributedModelParallel: real 2-rank runs (gloo, CPU).

As for the bag module, each rank checks its results against the unsharded
HashEmbeddingCollection run on the union of the ranks' batches with the loss
(loss_0 + loss_1) / world_size: DDP averages the dense gradients and the
sequence all-to-all divides the embedding gradients by the world size.
"""

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel

import recis_torchrec as rt
from recis_torchrec import ops
from recis_torchrec.testing.multiprocess import run_ranks
from tests.devices import gpu_world_size, needs_cuda
from tests.distributed.test_sharded_ebc import check_owned_rows, rows_of

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
KEYS = ["hist", "cand", "user", "extra"]  # "extra" is read by no table
BATCH = [3, 5]
FUSED = {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "eps": 1e-6}
STEPS = 6
DIM = 8


def ec_tables():
    return [
        EmbeddingConfig(name="item", embedding_dim=DIM, num_embeddings=60, feature_names=["hist", "cand"]),
        EmbeddingConfig(name="users", embedding_dim=DIM, num_embeddings=40, feature_names=["user"]),
    ]


def seq_pool(jt, batch: int) -> torch.Tensor:
    """A position-weighted sum of tanh(embedding) per sample: every id's gradient depends on where it sits."""
    lengths = jt.lengths()
    sample = torch.repeat_interleave(torch.arange(batch), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(jt.values().shape[0]) - starts[sample] if sample.numel() else sample
    w = 1.0 + 0.1 * pos.to(torch.float32)
    return torch.zeros(batch, jt.values().shape[1]).index_add_(0, sample, torch.tanh(jt.values()) * w[:, None])


torch.fx.wrap("seq_pool")  # a leaf for TrainPipelineSparseDist's tracer


class SeqTower(torch.nn.Module):
    """An EC (and optionally an EBC reading the same item table) feeding a linear layer."""

    def __init__(self, need_indices: bool = False, with_ebc: bool = False):
        super().__init__()
        self.ec = EmbeddingCollection(ec_tables(), need_indices=need_indices)
        self.ebc = (
            EmbeddingBagCollection(
                [EmbeddingBagConfig(name="item", embedding_dim=DIM, num_embeddings=60, feature_names=["cand"])]
            )
            if with_ebc
            else None
        )
        self.dense = torch.nn.Linear(DIM * (4 if with_ebc else 3), 1)

    def forward(self, kjt: KeyedJaggedTensor):
        out = self.ec(kjt)
        b = kjt.stride()
        parts = [seq_pool(out[k], b) for k in ("hist", "cand", "user")]
        if self.ebc is not None:
            parts.append(self.ebc(kjt).values())
        return self.dense(torch.cat(parts, 1)), out


def rank_batch(step: int, rank: int, world_size: int) -> KeyedJaggedTensor:
    """Step s, rank r's batch; each step exercises one edge case."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    b = BATCH[rank % len(BATCH)]
    lengths = torch.randint(0, 7, (len(KEYS), b), generator=g)
    lengths[0, 0] = 0  # an empty history
    lengths[1, 0] = 1  # a sequence of one id
    if step == 1 and rank == 1:
        lengths[2] = 0  # a feature with no ids on this rank
    n = int(lengths.sum())
    if step == 2:
        pool = torch.arange(-500, 500, dtype=torch.int64)
        pool = pool[ops.owner_of(pool, world_size) == 0]  # every id owned by rank 0
        values = pool[torch.randint(0, pool.numel(), (n,), generator=g)]
    elif step == 3:
        extremes = torch.tensor([INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1, -1, -(2**40), 0], dtype=torch.int64)
        values = extremes[torch.randint(0, extremes.numel(), (n,), generator=g)]
    else:
        values = torch.randint(-20, 90, (n,), generator=g)  # imported ids (< num_embeddings) and new ones
    if n >= 3:
        values[1] = values[0]  # a duplicate inside a sequence (or across features)
    return KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths.reshape(-1))


def union_batch(step: int, world_size: int) -> KeyedJaggedTensor:
    parts = [rank_batch(step, r, world_size).to_dict() for r in range(world_size)]
    values = [p[k].values() for k in KEYS for p in parts]
    lengths = [p[k].lengths() for k in KEYS for p in parts]
    return KeyedJaggedTensor(keys=KEYS, values=torch.cat(values), lengths=torch.cat(lengths))


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    return ((logits - 0.5) ** 2).sum()


def check_parity(rank: int, world_size: int, need_indices: bool, with_ebc: bool) -> None:
    torch.manual_seed(0)
    model = SeqTower(need_indices, with_ebc)
    reference = copy.deepcopy(model)
    rt.convert(reference, fused_params=FUSED, share_tables=with_ebc)
    ref_opt = torch.optim.SGD(reference.dense.parameters(), lr=0.05)

    plan = rt.plan(model, world_size, share_tables=with_ebc)
    dmp = DistributedModelParallel(model, sharders=rt.sharders(FUSED), plan=plan)
    sharded = dmp.module.ec
    assert type(sharded).__name__ == "ShardedHashEmbeddingCollection"
    if with_ebc:
        assert sorted(sharded.tables()) == ["users"]  # "item" belongs to the EBC
    dense_opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.05)

    offset = sum(BATCH[r % len(BATCH)] for r in range(rank))
    bounds = [0] + torch.tensor([BATCH[r % len(BATCH)] for r in range(world_size)]).cumsum(0).tolist()
    for step in range(STEPS):
        kjt = rank_batch(step, rank, world_size)
        logits, out = dmp(kjt)
        ref_logits, ref_out = reference(union_batch(step, world_size))
        assert list(out.keys()) == ["hist", "cand", "user"]
        mine = kjt.to_dict()
        for k, jt in out.items():
            ref_jt = ref_out[k]
            ref_lengths = ref_jt.lengths()
            first = int(ref_lengths[:offset].sum())
            count = int(jt.lengths().sum())
            torch.testing.assert_close(jt.lengths(), mine[k].lengths())
            torch.testing.assert_close(jt.values(), ref_jt.values()[first : first + count], atol=1e-5, rtol=1e-5)
            if need_indices:
                assert torch.equal(jt.weights(), mine[k].values())
            else:
                assert jt.weights_or_none() is None
        torch.testing.assert_close(logits, ref_logits[offset : offset + BATCH[rank % 2]], atol=1e-5, rtol=1e-5)
        dense_opt.zero_grad()
        loss_of(logits).backward()
        dense_opt.step()
        ref_opt.zero_grad()
        ref_loss = sum(loss_of(ref_logits[bounds[r] : bounds[r + 1]]) for r in range(world_size)) / world_size
        ref_loss.backward()
        ref_opt.step()

    # Every row this rank owns equals the unsharded one; together the ranks hold them all.
    ref_tables = dict(reference.ec.tables())
    ours = dict(sharded.tables())
    if with_ebc:
        ref_tables.update(reference.ebc.tables())
        ours.update(dmp.module.ebc.tables())
    assert sorted(ours) == ["item", "users"]
    check_owned_rows(ours, ref_tables, rank, world_size)
    # A shared table is updated by both modules' backward: two updates a step.
    expected_items = 2 * STEPS if with_ebc else STEPS
    steps = dict(sharded.fused_optimizer.steps())
    if with_ebc:
        steps.update(dmp.module.ebc.fused_optimizer.steps())
    assert steps == {"item": expected_items, "users": STEPS}


def _parity_worker(rank: int, world_size: int) -> None:
    check_parity(rank, world_size, need_indices=False, with_ebc=False)
    check_parity(rank, world_size, need_indices=True, with_ebc=False)
    check_parity(rank, world_size, need_indices=False, with_ebc=True)


def test_sharded_ec_equals_unsharded_on_the_union_batch():
    run_ranks(_parity_worker, world_size=2, timeout=400)


class _PipelinedSeqTower(torch.nn.Module):
    def __init__(self, tower: SeqTower):
        super().__init__()
        self.tower = tower

    def forward(self, batch):
        logits, _ = self.tower(batch.sparse_features)
        return loss_of(logits), logits.detach()


def _pipeline_and_errors_worker(rank: int, world_size: int) -> None:
    from torchrec.datasets.utils import Batch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    batches = [
        Batch(
            dense_features=torch.zeros(BATCH[rank], 1),
            sparse_features=rank_batch(step, rank, world_size),
            labels=torch.zeros(BATCH[rank]),
        )
        for step in range(STEPS)
    ]
    results = []
    for pipelined in (False, True):
        torch.manual_seed(0)
        model = _PipelinedSeqTower(SeqTower(with_ebc=True))
        plan = rt.plan(model, world_size, share_tables=True)
        # One options dict for the whole model: each module takes the entries of its own tables.
        options = {"users": rt.HashTableOptions(block_rows=64), "item": rt.HashTableOptions(block_rows=128)}
        dmp = DistributedModelParallel(model, sharders=rt.sharders(FUSED, options=options), plan=plan)
        assert dmp.module.tower.ec.tables()["users"].options.block_rows == 64
        assert dmp.module.tower.ebc.tables()["item"].options.block_rows == 128
        opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.05)
        outputs = []
        if pipelined:
            pipeline = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"), execute_all_batches=True)
            it = iter(batches)
            for _ in range(STEPS):
                outputs.append(pipeline.progress(it))
        else:
            for batch in batches:
                opt.zero_grad()
                loss, out = dmp(batch)
                loss.backward()
                opt.step()
                outputs.append(out)
        tables = {n: rows_of(t) for n, t in dmp.module.tower.ebc.tables().items()}
        tables.update({n: rows_of(t) for n, t in dmp.module.tower.ec.tables().items()})
        results.append((outputs, tables))
    (plain, plain_tables), (piped, piped_tables) = results
    for a, b in zip(plain, piped):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    assert sorted(plain_tables) == ["item", "users"]
    for n in plain_tables:
        assert plain_tables[n].keys() == piped_tables[n].keys()
        for i in plain_tables[n]:
            torch.testing.assert_close(piped_tables[n][i], plain_tables[n][i], atol=1e-6, rtol=1e-6)

    # Errors name the module, table or feature.
    torch.manual_seed(0)
    model = SeqTower()
    dmp = DistributedModelParallel(model, sharders=rt.sharders(FUSED), plan=rt.plan(model, world_size))
    with pytest.raises(KeyError, match="feature 'user' .*missing"):
        dmp(KeyedJaggedTensor(["hist", "cand"], torch.tensor([1, 2]), lengths=torch.tensor([1, 0, 1, 0, 0, 0])))
    with pytest.raises(TypeError, match="must be int64 or int32"):
        dmp(KeyedJaggedTensor(KEYS[:3], torch.tensor([1.0]), lengths=torch.tensor([1, 0, 0])))
    # A plan that shares a table no hash-sharded EBC has.
    model = SeqTower()
    plan = rt.plan(model, world_size, share_tables=True)
    plan.plan["ec"]["users"].compute_kernel = rt.distributed.HASH_SHARED
    dmp = DistributedModelParallel(model, sharders=rt.sharders(FUSED), plan=plan)
    with pytest.raises(ValueError, match="table 'users' is to be shared"):
        dmp(rank_batch(0, rank, world_size))
    # A world size the plan was not made for.
    model = SeqTower()
    with pytest.raises(ValueError, match="planned over 3 ranks but the world size is 2"):
        DistributedModelParallel(model, sharders=rt.sharders(FUSED), plan=rt.plan(model, 3))


def test_train_pipeline_equals_plain_loop_and_errors_name_the_culprit():
    run_ranks(_pipeline_and_errors_worker, world_size=2, timeout=300)


def _in_backward_worker(rank: int, world_size: int) -> None:
    import warnings

    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from recis_torchrec.optim.fused import parse_fused_params

    torch.manual_seed(0)
    model = SeqTower()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        apply_optimizer_in_backward(torch.optim.Adam, model.ec.parameters(), {"lr": 0.05, "eps": 1e-6})
    dmp = DistributedModelParallel(model, sharders=rt.sharders(), plan=rt.plan(model, world_size))
    sharded = next(m for m in dmp.modules() if type(m).__name__ == "ShardedHashEmbeddingCollection")
    assert sharded.hash_optimizer.config == parse_fused_params(FUSED), sharded.hash_optimizer.config
    # Given both ways with different learning rates, the sharder refuses.
    torch.manual_seed(0)
    model = SeqTower()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        apply_optimizer_in_backward(torch.optim.Adam, model.ec.parameters(), {"lr": 0.5})
    with pytest.raises(ValueError, match="learning_rate.*disagrees"):
        DistributedModelParallel(model, sharders=rt.sharders(FUSED), plan=rt.plan(model, world_size))


def test_sharded_ec_takes_its_optimizer_from_apply_optimizer_in_backward():
    run_ranks(_in_backward_worker, world_size=2, timeout=120)


# -- on GPUs ---------------------------------------------------------------------------------


def _gpu_ec_worker(rank: int, world_size: int) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = SeqTower(with_ebc=True)
    reference = copy.deepcopy(model)
    rt.convert(reference, fused_params=FUSED, share_tables=True)
    ref_opt = torch.optim.SGD(reference.dense.parameters(), lr=0.05)
    plan = rt.plan(model, world_size, share_tables=True, device_type="cuda")
    dmp = DistributedModelParallel(model, device=device, sharders=rt.sharders(FUSED), plan=plan)
    opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.05)
    batch = BATCH
    offset = sum(batch[r % len(batch)] for r in range(rank))
    bounds = [0] + torch.tensor([batch[r % len(batch)] for r in range(world_size)]).cumsum(0).tolist()
    for step in range(STEPS):
        logits, _ = dmp(rank_batch(step, rank, world_size).to(device))
        ref_logits, _ = reference(union_batch(step, world_size))
        torch.testing.assert_close(logits.cpu(), ref_logits[offset : offset + batch[rank % 2]], atol=1e-5, rtol=1e-5)
        opt.zero_grad()
        loss_of(logits).backward()
        opt.step()
        ref_opt.zero_grad()
        (sum(loss_of(ref_logits[bounds[r] : bounds[r + 1]]) for r in range(world_size)) / world_size).backward()
        ref_opt.step()
    tables = dict(dmp.module.ec.tables())
    tables.update(dmp.module.ebc.tables())
    ref_tables = dict(reference.ec.tables())
    ref_tables.update(reference.ebc.tables())
    check_owned_rows(tables, ref_tables, rank, world_size)


@needs_cuda
def test_sharded_ec_with_a_shared_table_on_gpus_equals_unsharded_cpu():
    """NCCL, one rank per GPU, against the unsharded CPU modules."""
    run_ranks(_gpu_ec_worker, world_size=gpu_world_size(), backend="nccl", timeout=600)
