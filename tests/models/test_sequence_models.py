# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""DIN and the transformer ranker: our EC path against TorchRec's EC, sharded against unsharded,
and what they learn where only the history carries the signal."""

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchmetrics.classification import BinaryAUROC

import recis_torchrec as rt
from recis_torchrec.models import DIN, SequenceTransformer, padded_sequence
from recis_torchrec.testing.multiprocess import run_ranks

SGD = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
MODELS = {
    "DIN": lambda ec, ebc: DIN(ec, "target", "hist", max_length=6, dense_in_features=2, embedding_bag_collection=ebc),
    "DIN_softmax": lambda ec, ebc: DIN(ec, "target", "hist", max_length=6, dense_in_features=2,
                                       embedding_bag_collection=ebc, softmax=True),
    "SequenceTransformer": lambda ec, ebc: SequenceTransformer(ec, "target", "hist", max_length=6, dense_in_features=2,
                                                               num_heads=2, num_layers=2, embedding_bag_collection=ebc),
    "SequenceTransformer_mean": lambda ec, ebc: SequenceTransformer(
        ec, "target", "hist", max_length=6, dense_in_features=2, causal=False, pooling="mean",
        embedding_bag_collection=ebc),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    ec = EmbeddingCollection([EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=200,
                                              feature_names=["target", "hist"])])
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="user", embedding_dim=4, num_embeddings=50,
                                                     feature_names=["user"])])
    return MODELS[name](ec, ebc)


def batch(step, size=6, offset=0):
    g = torch.Generator().manual_seed(1000 + step)
    hist_len = torch.randint(0, 10, (size,), generator=g)  # some longer than max_length, some empty
    n = int(hist_len.sum())
    values = torch.cat([torch.randint(0, 200, (size,), generator=g), torch.randint(0, 200, (n,), generator=g),
                        torch.randint(0, 50, (size,), generator=g)])
    lengths = torch.cat([torch.ones(size, dtype=torch.int64), hist_len, torch.ones(size, dtype=torch.int64)])
    kjt = KeyedJaggedTensor(keys=["target", "hist", "user"], values=values, lengths=lengths, stride=size)
    dense = torch.randn(size, 2, generator=g)
    labels = torch.randint(0, 2, (size,), generator=g).float()
    return dense, kjt, labels


def test_padded_sequence_keeps_the_last_items_in_order():
    from torchrec.sparse.jagged_tensor import JaggedTensor

    jt = JaggedTensor(values=torch.arange(10.0).unsqueeze(1), lengths=torch.tensor([3, 0, 7]))
    x, mask = padded_sequence(jt, 4)
    assert mask.tolist() == [[True] * 3 + [False], [False] * 4, [True] * 4]
    assert x[:, :, 0].tolist() == [[0, 1, 2, 0], [0, 0, 0, 0], [6, 7, 8, 9]]


@pytest.mark.parametrize("name", list(MODELS))
def test_our_ec_path_trains_as_torchrec_ec_does(name):
    """Forward and a few SGD steps: the converted model (hash tables, fused SGD) against the same
    model on TorchRec's EC and EBC (dense tables, torch.optim.SGD), on bounded ids."""
    ref = make(name)
    ours = copy.deepcopy(ref)
    rt.convert(ours, fused_params=SGD)
    assert not any(isinstance(m, EmbeddingCollection) for m in ours.modules())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    for step in range(4):
        dense, kjt, labels = batch(step)
        out_ref, out_ours = ref(dense, kjt), ours(dense, kjt)
        torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=1e-5)
        for model, opt, out in ((ref, opt_ref, out_ref), (ours, opt_ours, out_ours)):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), labels).backward()
            opt.step()
    ids, w, _ = ours.ec.tables()["item"].export()
    torch.testing.assert_close(w, ref.ec.embeddings["item"].weight.detach()[ids], atol=1e-5, rtol=1e-5)


def test_bad_model_arguments_raise():
    ec = EmbeddingCollection([EmbeddingConfig(name="a", embedding_dim=8, num_embeddings=10, feature_names=["t"]),
                              EmbeddingConfig(name="b", embedding_dim=8, num_embeddings=10, feature_names=["h"])])
    with pytest.raises(ValueError, match="must share one table"):
        DIN(ec, "t", "h")
    with pytest.raises(ValueError, match="'x' is not in the EmbeddingCollection"):
        DIN(ec, "x", "h")
    one = EmbeddingCollection([EmbeddingConfig(name="a", embedding_dim=6, num_embeddings=10, feature_names=["t", "h"])])
    with pytest.raises(ValueError, match="not a multiple of num_heads 4"):
        SequenceTransformer(one, "t", "h", num_heads=4)


BATCH, STEPS = 4, 3


def _sharded_worker(rank, world_size, name):
    model = make(name)
    reference = copy.deepcopy(model)
    rt.convert(reference, fused_params=SGD)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    dmp = DistributedModelParallel(model, sharders=rt.sharders(SGD), plan=rt.plan(model, world_size))
    opt = torch.optim.SGD(dmp.parameters(), lr=0.1)
    for step in range(STEPS):
        dense, kjt, labels = batch(step, BATCH * world_size)  # the union batch; this rank takes its slice
        lo, hi = rank * BATCH, (rank + 1) * BATCH
        mine = KeyedJaggedTensor.from_jt_dict({k: _slice(jt, lo, hi) for k, jt in kjt.to_dict().items()})
        out = dmp(dense[lo:hi], mine)
        ref_out = reference(dense, kjt)
        torch.testing.assert_close(out, ref_out[lo:hi], atol=1e-5, rtol=1e-5)
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), labels[lo:hi]).backward()
        opt.step()
        ref_opt.zero_grad()
        loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(
            ref_out[r * BATCH:(r + 1) * BATCH].squeeze(1), labels[r * BATCH:(r + 1) * BATCH])
            for r in range(world_size)) / world_size
        loss.backward()
        ref_opt.step()


def _slice(jt, lo, hi):
    from torchrec.sparse.jagged_tensor import JaggedTensor

    offsets = jt.offsets()
    return JaggedTensor(values=jt.values()[int(offsets[lo]):int(offsets[hi])], lengths=jt.lengths()[lo:hi])


@pytest.mark.parametrize("name", ["DIN", "SequenceTransformer"])
def test_two_ranks_with_the_shared_table_equal_the_unsharded_model_on_the_union_batch(name):
    run_ranks(_sharded_worker, world_size=2, args=(name,), timeout=300)


def _auc(model, batches):
    auc = BinaryAUROC()
    model.eval()
    with torch.no_grad():
        for b in batches:
            auc.update(torch.sigmoid(model(b.dense_features, b.sparse_features).reshape(-1)), b.labels.long())
    model.train()
    return float(auc.compute())


class LogisticRegression(torch.nn.Module):
    """Every id's weight summed, plus the dense input's: what a linear model over the same features sees."""

    def __init__(self, keys, num_dense):
        super().__init__()
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig(name=f"t_{k}", embedding_dim=1, num_embeddings=10_000,
                                                              feature_names=[k]) for k in keys])
        self.dense = torch.nn.Linear(num_dense, 1)

    def forward(self, dense, sparse):
        return self.ebc(sparse).values().sum(1, keepdim=True) + self.dense(dense)


def test_din_learns_what_only_the_history_says(tmp_path):
    """A click depends on whether the target's category is among the user's recent ones: DIN's
    attention relates them; a logistic regression over the same ids cannot."""
    from recis_torchrec.datasets.formats import write_taobao_parts
    from recis_torchrec.io import ColumnarDataset, Schema

    paths = write_taobao_parts(str(tmp_path), rows=6000, parts=3, history=20, seed=1)
    schema = Schema(sparse={"item": "item", "cate": "cate", "hist_item": "hist_item", "hist_cate": "hist_cate"},
                    dense=["price"], dense_transform="log1p", labels=["clk"],
                    list_delimiter="^", column_names=["clk", "user", "item", "cate", "hist_item", "hist_cate",
                                                      "price", "pid"])
    train = ColumnarDataset(paths[:2], schema, 128, shuffle=True, prefetch=0)
    held = list(ColumnarDataset(paths[2:], schema, 500, prefetch=0))
    ec = EmbeddingCollection([
        EmbeddingConfig(name="cate", embedding_dim=8, num_embeddings=100, feature_names=["cate", "hist_cate"]),
    ])
    torch.manual_seed(0)
    din = rt.convert(DIN(ec, "cate", "hist_cate", max_length=20, dense_in_features=1, top_arch=(32,)),
                     fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05})
    lr = rt.convert(LogisticRegression(["item", "cate", "hist_item", "hist_cate"], 1),
                    fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05})
    for model in (din, lr):
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(6):
            for b in train:
                opt.zero_grad()
                out = model(b.dense_features, b.sparse_features).reshape(-1)
                torch.nn.functional.binary_cross_entropy_with_logits(out, b.labels).backward()
                opt.step()
    din_auc, lr_auc = _auc(din, held), _auc(lr, held)
    assert din_auc > lr_auc + 0.1, (din_auc, lr_auc)
    assert din_auc > 0.75, din_auc


def test_din_trains_from_the_cli_under_torchrun(tmp_path):
    """examples/taobao_din.toml on generated Taobao-shaped parts, 2 ranks by torchrun: the EC table the
    target and history share is hash-sharded, and the run evaluates and saves."""
    from recis_torchrec.datasets.formats import write_taobao_parts
    from tests.distributed.test_main_job_torchrun import final_aucs, torchrun_train

    parts = write_taobao_parts(str(tmp_path / "data"), rows=1200, parts=2)
    out = torchrun_train("taobao_din.toml", tmp_path / "run", "--data", str(tmp_path / "data" / "part-*.csv"),
                         "--eval-data", parts[-1], "--steps", "8", "--set", "data.batch_size=64")
    assert "DIN on files" in out and "sharded over 2 ranks" in out
    assert final_aucs(out)["ctr"] > 0.5
