# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""HashEmbeddingCollection against torchrec.EmbeddingCollection on bounded ids, and its edge cases."""

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

import recis_torchrec as rt

ROWS, DIM = 50, 8


def make_ec(seed=0, need_indices=False):
    torch.manual_seed(seed)
    tables = [
        EmbeddingConfig(name="item_table", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["history", "candidate"]),
        EmbeddingConfig(name="users", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["user"]),
    ]
    return EmbeddingCollection(tables=tables, need_indices=need_indices)


def batch(step, B=4):
    g = torch.Generator().manual_seed(100 + step)
    lengths = torch.cat([torch.randint(0, 7, (B,), generator=g), torch.ones(B, dtype=torch.int64),
                         torch.randint(0, 2, (B,), generator=g)])
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(["history", "candidate", "user"], values, lengths=lengths)


def loss_of(out, step):
    g = torch.Generator().manual_seed(step)
    return sum((jt.values() * torch.randn(jt.values().shape, generator=g)).sum() for _, jt in sorted(out.items()))


def test_forward_equals_torchrec_on_bounded_ids():
    ec = make_ec(need_indices=True)
    hec = rt.convert(copy.deepcopy(ec))
    assert isinstance(hec, rt.HashEmbeddingCollection)
    kjt = batch(0)
    want, got = ec(kjt), hec(kjt)
    assert list(got) == list(want) == ["history", "candidate", "user"]
    for k in want:
        assert torch.equal(got[k].values(), want[k].values()), k
        assert torch.equal(got[k].lengths(), want[k].lengths())
        assert torch.equal(got[k].weights(), want[k].weights())  # need_indices: the ids
    assert hec.embedding_dim() == DIM and hec.need_indices() and hec.embedding_names_by_table() == [
        ["history", "candidate"], ["user"]]


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_five_training_steps_match_torchrec_ec(optimizer):
    ec = make_ec()
    if optimizer == "sgd":
        fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
        ref = torch.optim.SGD(ec.parameters(), lr=0.1)
    else:
        fused = {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1, "eps": 1e-10}
        ref = torch.optim.Adagrad(ec.parameters(), lr=0.1, eps=1e-10)
    hec = rt.convert(copy.deepcopy(ec), fused_params=fused)
    for step in range(5):
        kjt = batch(step)
        ref.zero_grad()
        want = ec(kjt)
        loss_of(want, step).backward()
        ref.step()
        got = hec(kjt)
        loss_of(got, step).backward()
        for k in want:
            torch.testing.assert_close(got[k].values(), want[k].values(), atol=1e-5, rtol=1e-5)
    # The tables now hold the trained rows.
    for name in ("item_table", "users"):
        ids, weights, _ = hec.tables()[name].export()
        order = torch.argsort(ids)
        torch.testing.assert_close(weights[order], ec.embeddings[name].weight.detach()[ids[order]], atol=1e-5,
                                   rtol=1e-5)


def test_empty_single_duplicate_and_long_sequences():
    hec = rt.HashEmbeddingCollection(
        [EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["seq"])],
        fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 1.0},
    )
    long = torch.randint(-(2**62), 2**62, (100_000,))
    values = torch.cat([torch.tensor([7]), torch.tensor([5, 5, 5]), long])
    kjt = KeyedJaggedTensor(["seq"], values, lengths=torch.tensor([0, 1, 3, 100_000]))
    out = hec(kjt)["seq"]
    assert out.values().shape == (100_004, 4) and out.lengths().tolist() == [0, 1, 3, 100_000]
    assert torch.equal(out.values()[1], out.values()[2]) and torch.equal(out.values()[1], out.values()[3])
    before = hec.tables()["t"].lookup(torch.tensor([5]))
    # Duplicate ids: their gradients sum into one update of the row.
    grad = torch.zeros_like(out.values())
    grad[1:4] = 1.0
    out.values().backward(grad)
    after = hec.tables()["t"].lookup(torch.tensor([5]))
    torch.testing.assert_close(after, before - 3.0)
    assert len(hec.tables()["t"]) == 2 + torch.unique(long).numel()
    # A batch with no ids at all.
    empty = hec(KeyedJaggedTensor(["seq"], torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(3, dtype=torch.int64)))
    assert empty["seq"].values().shape == (0, 4)


def test_state_dict_round_trip_and_torchrec_state_dict_loads():
    ec = make_ec()
    hec = rt.HashEmbeddingCollection(ec.embedding_configs())
    hec.load_state_dict(ec.state_dict())  # TorchRec's weights: row i becomes id i
    kjt = batch(1)
    want = ec(kjt)
    for k, jt in hec(kjt).items():
        assert torch.equal(jt.values(), want[k].values())
    again = rt.HashEmbeddingCollection(ec.embedding_configs())
    again.load_state_dict(hec.state_dict())
    for k, jt in again(kjt).items():
        assert torch.equal(jt.values(), want[k].values())


def test_bad_input_names_the_feature():
    hec = rt.convert(make_ec())
    with pytest.raises(KeyError, match="feature 'user' .* is missing"):
        hec(KeyedJaggedTensor(["history", "candidate"], torch.tensor([1]), lengths=torch.tensor([1, 0])))
    with pytest.raises(TypeError, match="must be int64 or int32"):
        hec(KeyedJaggedTensor(["history", "candidate", "user"], torch.tensor([1.0]), lengths=torch.tensor([1, 0, 0])))
    with pytest.raises(ValueError, match="same embedding_dim"):
        rt.HashEmbeddingCollection([EmbeddingConfig(name="a", embedding_dim=4, num_embeddings=5),
                                    EmbeddingConfig(name="b", embedding_dim=8, num_embeddings=5)])


def test_shared_table_with_an_ebc_unsharded():
    """One item table: the EBC pools the candidate, the EC returns the history; rows are shared."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection

    model = torch.nn.Module()
    model.ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="item", embedding_dim=4, num_embeddings=10,
                                                           feature_names=["candidate"])])
    model.ec = EmbeddingCollection([EmbeddingConfig(name="item", embedding_dim=4, num_embeddings=10,
                                                    feature_names=["history"])])
    ebc_weight = model.ebc.embedding_bags["item"].weight.detach().clone()
    rt.convert(model, fused_params={"optimizer": "exact_sgd", "learning_rate": 1.0}, share_tables=True)
    assert model.ec.tables() == {}  # owned by the EBC
    assert sorted(model.ec.state_dict()) == []
    kjt = KeyedJaggedTensor(["candidate", "history"], torch.tensor([3, 3, 3, 7]), lengths=torch.tensor([1, 3]))
    pooled = model.ebc(kjt).values()
    seq = model.ec(kjt)["history"].values()
    torch.testing.assert_close(pooled[0], ebc_weight[3])  # the EBC's weights were imported
    torch.testing.assert_close(seq, ebc_weight[[3, 3, 7]])
    (pooled.sum() + seq.sum()).backward()
    # id 3: one gradient from the EBC's update, then two (summed) from the EC's; lr 1, SGD.
    rows = model.ebc.tables()["item"].lookup(torch.tensor([3, 7]))
    torch.testing.assert_close(rows, torch.stack([ebc_weight[3] - 3.0, ebc_weight[7] - 1.0]))
    assert model.ebc.fused_optimizer.steps() == {"item": 2}

    with pytest.raises(ValueError, match="table 'item' has embedding_dim 8 but the shared table"):
        rt.HashEmbeddingCollection([EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=10)],
                                   share_tables_with=model.ebc)
    with pytest.raises(TypeError, match="share_tables_with must be a hash-backed module"):
        rt.HashEmbeddingCollection([EmbeddingConfig(name="item", embedding_dim=4, num_embeddings=10)],
                                   share_tables_with=torch.nn.Linear(1, 1))


def test_variable_batch_per_feature_is_a_clear_error():
    hec = rt.convert(make_ec())
    kjt = KeyedJaggedTensor(["history", "candidate", "user"], torch.tensor([1, 2, 3]),
                            lengths=torch.tensor([1, 1, 1]), stride_per_key_per_rank=[[1], [1], [1]])
    with pytest.raises(NotImplementedError, match="variable batch size per feature"):
        hec(kjt)
