# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Fused sparse optimizers over several steps against TorchRec, torch.optim and FBGEMM."""

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

import recis_torchrec as rt
from recis_torchrec.optim.fused import WeightDecayMode
from recis_torchrec.testing import random_kjt, reference_adam_rows

STEPS = 6
KEYS = ["f0", "f1", "f2"]


def configs(pooling=PoolingType.SUM):
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=40, feature_names=["f0", "f1"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=25, feature_names=["f2"], pooling=pooling),
    ]


def batches(weighted=False):
    # Ids below every table's num_embeddings (25), with duplicates in bags.
    return [random_kjt(KEYS, 5, 4, num_ids=25, weighted=weighted, seed=100 + s) for s in range(STEPS)]


def loss_of(values: torch.Tensor) -> torch.Tensor:
    target = torch.linspace(-1, 1, values.shape[1])
    return ((values - target) ** 2).sum() + values.sum()


def table_weights(hebc: rt.HashEmbeddingBagCollection, name: str) -> torch.Tensor:
    ids, weights, _ = hebc.tables()[name].export()
    return weights[torch.argsort(ids)]


def train_pair(ebc, hebc, ref_opt, data, is_weighted=False):
    for kjt in data:
        ref_out = ebc(kjt).values()
        out = hebc(kjt).values()
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        ref_opt.zero_grad()
        loss_of(ref_out).backward()
        ref_opt.step()
        loss_of(out).backward()
        hebc.fused_optimizer.step()
    for c in ebc.embedding_bag_configs():
        torch.testing.assert_close(
            table_weights(hebc, c.name), ebc.embedding_bags[c.name].weight.detach(), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_sgd_matches_torchrec_ebc_with_torch_sgd(pooling):
    ebc = EmbeddingBagCollection(configs(pooling))
    hebc = rt.convert(copy.deepcopy(ebc), fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.05})
    train_pair(ebc, hebc, torch.optim.SGD(ebc.parameters(), lr=0.05), batches())


def test_weighted_sgd_matches_torchrec_ebc():
    ebc = EmbeddingBagCollection(configs(), is_weighted=True)
    hebc = rt.convert(copy.deepcopy(ebc), fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.05})
    train_pair(ebc, hebc, torch.optim.SGD(ebc.parameters(), lr=0.05), batches(weighted=True))


def test_adagrad_matches_torchrec_ebc_with_torch_adagrad():
    ebc = EmbeddingBagCollection(configs())
    hebc = rt.convert(
        copy.deepcopy(ebc), fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1, "eps": 1e-10}
    )
    ref = torch.optim.Adagrad(ebc.parameters(), lr=0.1, eps=1e-10)
    train_pair(ebc, hebc, ref, batches())
    # The fused optimizer's state holds Adagrad's sum of squares, by id.
    sd = hebc.fused_optimizer.state_dict()["state"]
    for c in configs():
        slot = sd[f"{c.name}.weight"][f"{c.name}.momentum1"]
        ref_sum = ref.state[ebc.embedding_bags[c.name].weight]["sum"]
        torch.testing.assert_close(slot["values"], ref_sum[slot["ids"]], atol=1e-5, rtol=1e-5)


class _SparseBags(torch.nn.Module):
    """The plain-PyTorch baseline: nn.EmbeddingBag(sparse=True) per table."""

    def __init__(self, ebc: EmbeddingBagCollection):
        super().__init__()
        self.configs = ebc.embedding_bag_configs()
        self.bags = torch.nn.ModuleDict()
        for c in self.configs:
            bag = torch.nn.EmbeddingBag(c.num_embeddings, c.embedding_dim, mode="sum", sparse=True)
            bag.weight.data.copy_(ebc.embedding_bags[c.name].weight.detach())
            self.bags[c.name] = bag

    def forward(self, kjt):
        d = kjt.to_dict()
        outs = []
        for c in self.configs:
            for f in c.feature_names:
                outs.append(self.bags[c.name](d[f].values(), d[f].offsets()[:-1]))
        return torch.cat(outs, dim=1)


def test_adam_matches_sparse_embedding_bag_with_sparse_adam():
    ebc = EmbeddingBagCollection(configs())
    base = _SparseBags(ebc)
    hebc = rt.convert(
        copy.deepcopy(ebc),
        fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6},
    )
    opt = torch.optim.SparseAdam(base.parameters(), lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    for kjt in batches():
        ref_out, out = base(kjt), hebc(kjt).values()
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        opt.zero_grad()
        loss_of(ref_out).backward()
        opt.step()
        loss_of(out).backward()
    for c in configs():
        torch.testing.assert_close(table_weights(hebc, c.name), base.bags[c.name].weight.detach(), atol=1e-5, rtol=1e-5)
    assert hebc.fused_optimizer.step_count == STEPS


@pytest.mark.parametrize("mode", [WeightDecayMode.DECOUPLE, WeightDecayMode.L2])
def test_adamw_and_l2_adam_match_reference(mode):
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-8, 0.1
    ebc = EmbeddingBagCollection(configs())
    hebc = rt.convert(
        copy.deepcopy(ebc),
        fused_params={
            "optimizer": EmbOptimType.ADAM,
            "learning_rate": lr,
            "beta1": b1,
            "beta2": b2,
            "eps": eps,
            "weight_decay": wd,
            "weight_decay_mode": mode,
        },
    )
    state = {c.name: [torch.zeros(c.num_embeddings, c.embedding_dim) for _ in range(2)] for c in configs()}
    for step, kjt in enumerate(batches(), start=1):
        ref_out, out = ebc(kjt).values(), hebc(kjt).values()
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        loss_of(out).backward()
        ebc.zero_grad()
        loss_of(ref_out).backward()
        d = kjt.to_dict()
        with torch.no_grad():
            for c in configs():
                w = ebc.embedding_bags[c.name].weight
                touched = torch.unique(torch.cat([d[f].values() for f in c.feature_names]))
                m, v = state[c.name]
                w_new, m_t, v_t = reference_adam_rows(
                    w[touched], m[touched], v[touched], w.grad[touched], lr, b1, b2, eps, step, wd,
                    decoupled=mode == WeightDecayMode.DECOUPLE,
                )
                w[touched], m[touched], v[touched] = w_new, m_t, v_t
    for c in configs():
        torch.testing.assert_close(
            table_weights(hebc, c.name), ebc.embedding_bags[c.name].weight.detach(), atol=1e-5, rtol=1e-5
        )


def test_rowwise_adagrad_matches_fbgemm_tbe_cpu():
    lr, eps = 0.1, 1e-8
    ebc = EmbeddingBagCollection(configs())
    hebc = rt.convert(
        copy.deepcopy(ebc),
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": lr, "eps": eps},
    )
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(c.num_embeddings, c.embedding_dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for c in configs()],
        feature_table_map=[0, 0, 1],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=eps,
        pooling_mode=PoolingMode.SUM,
    )
    with torch.no_grad():
        for w, c in zip(tbe.split_embedding_weights(), configs()):
            w.copy_(ebc.embedding_bags[c.name].weight)
    for kjt in batches():
        ref_out = tbe(kjt.values(), kjt.offsets())
        out = hebc(kjt).values()
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        loss_of(ref_out).backward()
        loss_of(out).backward()
    for w, c in zip(tbe.split_embedding_weights(), configs()):
        torch.testing.assert_close(table_weights(hebc, c.name), w, atol=1e-5, rtol=1e-5)
    for state, c in zip(tbe.get_optimizer_state(), configs()):
        slot = hebc.fused_optimizer.state_dict()["state"][f"{c.name}.weight"][f"{c.name}.momentum1"]
        torch.testing.assert_close(slot["values"], state["sum"][slot["ids"]], atol=1e-5, rtol=1e-5)


def test_learning_rate_change_through_param_groups_takes_effect():
    ebc = EmbeddingBagCollection(configs())
    hebc = rt.convert(copy.deepcopy(ebc), fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1})
    ref = torch.optim.SGD(ebc.parameters(), lr=0.1)
    data = batches()
    for i, kjt in enumerate(data):
        lr = [0.1, 0.0, 0.3, 0.05, 0.05, 0.2][i]
        for g in hebc.fused_optimizer.param_groups:
            g["lr"] = lr
        for g in ref.param_groups:
            g["lr"] = lr
        train_pair(ebc, hebc, ref, [kjt])


def test_lr_scheduler_drives_the_fused_optimizer():
    hebc = rt.HashEmbeddingBagCollection(configs(), fused_params={"learning_rate": 1.0})
    sched = torch.optim.lr_scheduler.StepLR(hebc.fused_optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        hebc.fused_optimizer.step()
        sched.step()
    assert hebc.fused_optimizer.param_groups[0]["lr"] == pytest.approx(0.125)


def test_optimizer_state_dict_round_trip():
    fused = {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.01}
    a = rt.HashEmbeddingBagCollection(configs(), fused_params=fused)
    for kjt in batches():
        loss_of(a(kjt).values()).backward()
    b = rt.HashEmbeddingBagCollection(configs(), fused_params=fused)
    b.load_state_dict(a.state_dict())
    b.fused_optimizer.load_state_dict(a.fused_optimizer.state_dict())
    assert b.fused_optimizer.step_count == STEPS
    for name in ("t0", "t1"):
        (ia, wa, sa), (ib, wb, sb) = a.tables()[name].export(), b.tables()[name].export()
        oa, ob = torch.argsort(ia), torch.argsort(ib)
        assert torch.equal(ia[oa], ib[ob]) and torch.equal(wa[oa], wb[ob]) and torch.equal(sa[oa], sb[ob])
    # Both continue identically.
    extra = random_kjt(KEYS, 5, 4, num_ids=50, seed=999)
    loss_of(a(extra).values()).backward()
    loss_of(b(extra).values()).backward()
    a.eval(), b.eval()
    torch.testing.assert_close(a(extra).values(), b(extra).values())
