# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""KJTs with a variable batch size per feature (VBE: ``stride_per_key_per_rank`` and
``inverse_indices``) in the unsharded and the hash-sharded EBC, against TorchRec's EBC on the same
KJT, and against the same module given the KJT expanded to the output batch (which every feature's
inverse indices define), in training too."""

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_configs import PoolingType

import recis_torchrec as rt
from recis_torchrec.testing.multiprocess import run_ranks

KEYS = ["f1", "f2", "f3"]
SGD = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}


def configs(pooling=PoolingType.SUM):
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=40, feature_names=["f1", "f2"], pooling=pooling),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=40, feature_names=["f1", "f3"], pooling=pooling),
    ]


def vbe_kjt(seed: int, out_batch: int = 5):
    """A VBE KJT (feature k has its own batch) and the same KJT expanded to ``out_batch``."""
    g = torch.Generator().manual_seed(seed)
    strides = [int(x) for x in torch.randint(1, out_batch + 1, (len(KEYS),), generator=g)]
    lengths = [torch.randint(0, 4, (s,), generator=g) for s in strides]
    values = [torch.randint(0, 40, (int(ln.sum()),), generator=g) for ln in lengths]
    inverse = torch.stack([torch.randint(0, s, (out_batch,), generator=g) for s in strides])
    vbe = KeyedJaggedTensor(
        keys=KEYS, values=torch.cat(values), lengths=torch.cat(lengths),
        stride_per_key_per_rank=[[s] for s in strides], inverse_indices=(KEYS, inverse),
    )
    exp_values, exp_lengths = [], []
    for k in range(len(KEYS)):
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths[k].cumsum(0)])
        for b in inverse[k].tolist():
            exp_values.append(values[k][offsets[b] : offsets[b + 1]])
            exp_lengths.append(lengths[k][b : b + 1])
    expanded = KeyedJaggedTensor(keys=KEYS, values=torch.cat(exp_values), lengths=torch.cat(exp_lengths))
    return vbe, expanded


def loss_of(values: torch.Tensor) -> torch.Tensor:
    return ((values - torch.linspace(-1, 1, values.shape[1])) ** 2).sum()


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_unsharded_vbe_equals_torchrec_and_trains_as_the_expanded_kjt(pooling):
    torch.manual_seed(0)
    theirs = EmbeddingBagCollection(configs(pooling))
    ours = rt.convert(copy.deepcopy(theirs), fused_params=SGD)
    twin = rt.convert(copy.deepcopy(theirs), fused_params=SGD)
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for step in range(4):
        vbe, expanded = vbe_kjt(step)
        out, ref, twin_out = ours(vbe), theirs(vbe), twin(expanded)
        assert out.keys() == ref.keys() == ["f1@t1", "f2", "f1@t2", "f3"]
        torch.testing.assert_close(out.values(), ref.values(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.values(), twin_out.values(), atol=0, rtol=0)
        loss_of(out.values()).backward()
        loss_of(twin_out.values()).backward()
        ref_opt.zero_grad()
        loss_of(ref.values()).backward()
        ref_opt.step()
    for name in ("t1", "t2"):
        ids, w, _ = ours.tables()[name].export()
        order = torch.argsort(ids)
        torch.testing.assert_close(w[order], theirs.embedding_bags[name].weight.detach()[ids[order]],
                                   atol=1e-5, rtol=1e-5)


def test_vbe_without_inverse_indices_is_refused():
    ours = rt.HashEmbeddingBagCollection(configs())
    kjt = KeyedJaggedTensor(keys=KEYS, values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1]),
                            stride_per_key_per_rank=[[1], [1], [1]])
    with pytest.raises(ValueError, match="variable batch size per feature but no inverse_indices"):
        ours(kjt)


def _sharded_worker(rank: int, world_size: int, mixed: bool) -> None:
    torch.manual_seed(0)
    theirs = EmbeddingBagCollection(configs())

    def shard():
        module = copy.deepcopy(theirs)
        plan = rt.plan(module, world_size, tables=["t1"] if mixed else None)
        dmp = DistributedModelParallel(module, sharders=rt.sharders(SGD), plan=plan)
        # TorchRec does not copy an unsharded module's weights into its shards: load them.
        dmp.load_state_dict(theirs.state_dict(), strict=False)
        return dmp

    vbe_model, expanded_model = shard(), shard()
    for step in range(3):
        vbe, expanded = vbe_kjt(100 * step + rank)
        out = vbe_model(vbe)
        twin = expanded_model(expanded)
        assert out.keys() == twin.keys()
        torch.testing.assert_close(out.values(), twin.values(), atol=1e-6, rtol=1e-6)
        if step == 0:  # TorchRec's unsharded EBC on this rank's KJT, with the rows as imported
            torch.testing.assert_close(out.values(), theirs(vbe).values(), atol=1e-6, rtol=1e-5)
        loss_of(out.values()).backward()
        loss_of(twin.values()).backward()
    sharded = [m for m in vbe_model.modules() if type(m).__name__ == "ShardedHashEmbeddingBagCollection"][0]
    twin_sharded = [m for m in expanded_model.modules() if type(m).__name__ == "ShardedHashEmbeddingBagCollection"][0]
    for name, table in sharded.tables().items():
        a, b = table.export(), twin_sharded.tables()[name].export()
        assert torch.equal(torch.sort(a[0]).values, torch.sort(b[0]).values)
        torch.testing.assert_close(a[1][torch.argsort(a[0])], b[1][torch.argsort(b[0])], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mixed", [False, True], ids=["hash", "mixed-plan"])
def test_sharded_vbe_trains_as_the_expanded_kjt(mixed):
    run_ranks(_sharded_worker, world_size=2, args=(mixed,), timeout=240)
