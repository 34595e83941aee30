# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Every fused optimizer on every device against tables trained by hand in plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

import recis_torchrec as rt
from recis_torchrec.optim.fused import WeightDecayMode
from recis_torchrec.testing import random_kjt, reference_adam_rows, reference_rowwise_adagrad_rows
from tests.devices import devices


KEYS = ["f0", "f1", "f2"]
STEPS = 4
OPTIMIZERS = {
    "sgd": {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1},
    "adagrad": {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8},
    "rowwise_adagrad": {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8},
    "adam": {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "eps": 1e-6},
    "adamw": {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "eps": 1e-6, "weight_decay": 0.1,
              "weight_decay_mode": WeightDecayMode.DECOUPLE},
    "sgd_l2": {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1, "weight_decay": 0.2,
               "weight_decay_mode": WeightDecayMode.L2},
    "rowwise_adagrad_l2": {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8,
                           "weight_decay": 0.2, "weight_decay_mode": WeightDecayMode.L2},
    "adam_l2": {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "eps": 1e-6, "weight_decay": 0.1,
                "weight_decay_mode": WeightDecayMode.L2},
    "lars_sgd": {"optimizer": EmbOptimType.LARS_SGD, "learning_rate": 0.5, "eta": 0.05, "momentum": 0.8},
    "lars_sgd_wd": {"optimizer": EmbOptimType.LARS_SGD, "learning_rate": 0.5, "eta": 0.05, "momentum": 0.8,
                    "weight_decay": 0.05},
    "lamb": {"optimizer": EmbOptimType.LAMB, "learning_rate": 0.05, "eps": 1e-6},
    "lamb_wd": {"optimizer": EmbOptimType.LAMB, "learning_rate": 0.05, "eps": 1e-6, "beta1": 0.8, "beta2": 0.99,
                "weight_decay": 0.1},
    "partial_rowwise_adam": {"optimizer": EmbOptimType.PARTIAL_ROWWISE_ADAM, "learning_rate": 0.05, "eps": 1e-6},
    "partial_rowwise_adam_wd": {"optimizer": EmbOptimType.PARTIAL_ROWWISE_ADAM, "learning_rate": 0.05, "eps": 1e-6,
                                "beta1": 0.8, "beta2": 0.99, "weight_decay": 0.1},
    "partial_rowwise_lamb": {"optimizer": EmbOptimType.PARTIAL_ROWWISE_LAMB, "learning_rate": 0.05, "eps": 1e-6},
    "partial_rowwise_lamb_wd": {"optimizer": EmbOptimType.PARTIAL_ROWWISE_LAMB, "learning_rate": 0.05, "eps": 1e-6,
                                "beta1": 0.8, "beta2": 0.99, "weight_decay": 0.1},
}


def reference_lars_rows(w, mom, g, p):
    """FBGEMM's LARS_SGD (fbgemm_gpu/codegen/genscript/optimizers.py, lars_sgd()) on the rows a batch
    touched: a per-row rate lr * eta * ||w|| / (||g|| + wd ||w||), momentum holding the step. A zero
    denominator gives a zero rate."""
    lr, eta, momentum, wd = p["learning_rate"], p.get("eta", 0.001), p.get("momentum", 0.9), p.get("weight_decay", 0.0)
    w_norm, g_norm = w.norm(dim=1, keepdim=True), g.norm(dim=1, keepdim=True)
    denom = g_norm + wd * w_norm
    rate = torch.where(denom > 0, lr * eta * w_norm / denom, torch.zeros_like(denom))
    mom = momentum * mom + rate * (g + wd * w)
    return w - mom, mom


def reference_lamb_rows(w, m, v, g, p, step):
    """FBGEMM's LAMB (fbgemm_gpu/codegen/genscript/optimizers.py, lamb()) on the rows a batch touched,
    their duplicate ids' gradients summed: Adam's bias-corrected moments plus weight decay, scaled
    per row by ||w|| / ||r|| (the old w). A zero r does not move its row."""
    b1, b2, eps, wd = p.get("beta1", 0.9), p.get("beta2", 0.999), p.get("eps", 1e-8), p.get("weight_decay", 0.0)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    r = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps) + wd * w
    w_norm, r_norm = w.norm(dim=1, keepdim=True), r.norm(dim=1, keepdim=True)
    ratio = torch.where(r_norm > 0, w_norm / r_norm, torch.zeros_like(r_norm))
    return w - p["learning_rate"] * ratio * r, m, v


def reference_partial_rowwise_rows(w, m, v, g, p, step, lamb):
    """FBGEMM's PARTIAL_ROWWISE_ADAM and PARTIAL_ROWWISE_LAMB (fbgemm_gpu/codegen/genscript/optimizers.py,
    partial_rowwise_adam() and partial_rowwise_lamb()) on the rows a batch touched: the first moment per
    element, the second one per row (the moving mean of the row's g^2), both bias-corrected, weight
    decay always applied; LAMB then scales the step per row by ||w|| / ||r||."""
    b1, b2, eps, wd = p.get("beta1", 0.9), p.get("beta2", 0.999), p.get("eps", 1e-8), p.get("weight_decay", 0.0)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * (g * g).mean(dim=1)
    r = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)[:, None] + wd * w
    if not lamb:
        return w - p["learning_rate"] * r, m, v
    w_norm, r_norm = w.norm(dim=1, keepdim=True), r.norm(dim=1, keepdim=True)
    ratio = torch.where(r_norm > 0, w_norm / r_norm, torch.zeros_like(r_norm))
    return w - p["learning_rate"] * ratio * r, m, v


def configs(pooling, dims=(8, 12), num_embeddings=30):
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=dims[0], num_embeddings=num_embeddings, feature_names=["f0", "f1"],
                           pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=dims[1], num_embeddings=num_embeddings, feature_names=["f2"],
                           pooling=pooling),
    ]


def loss_of(values: torch.Tensor) -> torch.Tensor:
    target = torch.linspace(-1, 1, values.shape[1], device=values.device)
    return ((values - target) ** 2).sum()


class ReferenceTables:
    """Dense tables trained by hand: F.embedding_bag forward, autograd gradient, each sparse
    optimizer's formula applied to the rows the batch touched."""

    def __init__(self, ebc: EmbeddingBagCollection, fused: dict):
        self.configs = ebc.embedding_bag_configs()
        self.w = {c.name: ebc.embedding_bags[c.name].weight.detach().clone() for c in self.configs}
        self.m = {n: torch.zeros_like(w) for n, w in self.w.items()}
        self.v = {n: torch.zeros_like(w) for n, w in self.w.items()}
        self.row_m = {n: torch.zeros(w.shape[0]) for n, w in self.w.items()}
        self.fused = fused
        self.step = 0

    def forward(self, kjt, weighted):
        params = {n: w.clone().requires_grad_(True) for n, w in self.w.items()}
        d = kjt.to_dict()
        outs = []
        for c in self.configs:
            for f in c.feature_names:
                jt = d[f]
                # Mean pooling divides the (weighted) sum by the bag's length, as FBGEMM's TBE does
                # (torch's embedding_bag has no weighted mean).
                pooled = F.embedding_bag(jt.values(), params[c.name], jt.offsets(), mode="sum",
                                         per_sample_weights=jt.weights() if weighted else None,
                                         include_last_offset=True)
                if c.pooling == PoolingType.MEAN:
                    pooled = pooled / jt.lengths().clamp(min=1)[:, None].to(pooled.dtype)
                outs.append(pooled)
        return torch.cat(outs, 1), params

    def update(self, params, kjt):
        self.step += 1
        d = kjt.to_dict()
        p = self.fused
        lr, eps = p["learning_rate"], p.get("eps", 1e-8)
        for c in self.configs:
            touched = torch.unique(torch.cat([d[f].values() for f in c.feature_names]))
            g = params[c.name].grad[touched]
            w = self.w[c.name][touched]
            wd = p.get("weight_decay", 0.0)
            if p.get("weight_decay_mode") == WeightDecayMode.L2:
                g = g + wd * w
            elif p.get("weight_decay_mode") == WeightDecayMode.DECOUPLE:
                w = w * (1 - lr * wd)
            opt = p["optimizer"]
            if opt == EmbOptimType.EXACT_SGD:
                w = w - lr * g
            elif opt == EmbOptimType.EXACT_ADAGRAD:
                s = self.m[c.name][touched] + g * g
                self.m[c.name][touched] = s
                w = w - lr * g / (s.sqrt() + eps)
            elif opt == EmbOptimType.EXACT_ROWWISE_ADAGRAD:
                w, m = reference_rowwise_adagrad_rows(w, self.row_m[c.name][touched], g, lr, eps)
                self.row_m[c.name][touched] = m
            elif opt == EmbOptimType.LARS_SGD:
                w, m = reference_lars_rows(w, self.m[c.name][touched], g, p)
                self.m[c.name][touched] = m
            elif opt in (EmbOptimType.PARTIAL_ROWWISE_ADAM, EmbOptimType.PARTIAL_ROWWISE_LAMB):
                w, m, v = reference_partial_rowwise_rows(w, self.m[c.name][touched], self.row_m[c.name][touched], g, p,
                                                         self.step, opt == EmbOptimType.PARTIAL_ROWWISE_LAMB)
                self.m[c.name][touched], self.row_m[c.name][touched] = m, v
            elif opt == EmbOptimType.LAMB:
                w, m, v = reference_lamb_rows(w, self.m[c.name][touched], self.v[c.name][touched], g, p, self.step)
                self.m[c.name][touched], self.v[c.name][touched] = m, v
            else:
                w, m, v = reference_adam_rows(
                    w, self.m[c.name][touched], self.v[c.name][touched], g, lr, 0.9, 0.999, eps, self.step,
                )
                self.m[c.name][touched], self.v[c.name][touched] = m, v
            self.w[c.name][touched] = w


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False),
                                              (PoolingType.SUM, True), (PoolingType.MEAN, True)])
def test_training_matches_plain_pytorch(device, optimizer, pooling, weighted):
    train_against_reference(device, OPTIMIZERS[optimizer], pooling, weighted)


def train_against_reference(device, fused, pooling=PoolingType.SUM, weighted=False, dims=(8, 12), num_ids=30,
                            batch=6, max_len=5, steps=STEPS, options=None):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(configs(pooling, dims, num_ids), is_weighted=weighted)
    reference = ReferenceTables(ebc, fused)
    hebc = rt.convert(ebc, fused_params=fused, device=device, options=options)
    assert hebc.device.type == device
    for s in range(steps):
        kjt = random_kjt(KEYS, batch, max_len, num_ids=num_ids, weighted=weighted, seed=10 + s)
        ref_out, params = reference.forward(kjt, weighted)
        out = hebc(kjt.to(device)).values()
        torch.testing.assert_close(out.cpu(), ref_out.detach(), atol=1e-5, rtol=1e-5)
        loss_of(ref_out).backward()
        reference.update(params, kjt)
        loss_of(out).backward()
    for name, table in hebc.tables().items():
        ids, w, _ = table.export()
        order = torch.argsort(ids)
        torch.testing.assert_close(w[order], reference.w[name][ids[order]], atol=2e-5, rtol=1e-5)
    assert hebc.fused_optimizer.steps() == {"t0": steps, "t1": steps}
    return hebc


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam", "lamb_wd", "lars_sgd_wd",
                                       "partial_rowwise_adam_wd", "partial_rowwise_lamb_wd"])
@pytest.mark.parametrize("dims", [(5, 37), (33, 3)])
def test_dims_not_a_multiple_of_four_and_above_32(device, optimizer, dims):
    train_against_reference(device, OPTIMIZERS[optimizer], PoolingType.MEAN, True, dims=dims)


@pytest.mark.parametrize("device", devices())
def test_tables_grow_during_training(device):
    """From 4 slots and 8-row blocks to thousands of rows: the id map rehashes and the rows span far
    more than 16 blocks while the optimizer state follows them."""
    hebc = train_against_reference(device, OPTIMIZERS["adam"], num_ids=3000, batch=64, max_len=8, steps=3,
                                   options=rt.HashTableOptions(initial_capacity=4, block_rows=8))
    assert len(hebc.tables()["t0"]) > 16 * 8 * 4


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_large_batches(device, optimizer):
    """About 100k ids a step, many repeated: the sort and segment-reduce paths a small batch never takes."""
    train_against_reference(device, OPTIMIZERS[optimizer], num_ids=20_000, batch=4096, max_len=16, steps=2)
