# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""TorchRec's module test cases for EmbeddingBagCollection / EmbeddingCollection
(``torchrec/modules/tests/test_embedding_modules.py``), rewritten for our classes, plus the paths a
TorchRec program takes with them: fx tracing, torch.export, TorchScript (a clear error), the meta
device, ``.to()``, ``reset_parameters``, state dicts, weighted features and their gradients, and
TorchRec's FeatureProcessedEmbeddingBagCollection. Numbers are checked against TorchRec's own
modules holding the same rows (ids below ``num_embeddings``)."""

import copy
from functools import partial

import pytest
import torch
import torch.fx
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from torchrec.fx import symbolic_trace
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import recis_torchrec as rt

SGD = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}


def weighted_configs():
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1", "f3"]),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"]),
    ]


def weighted_kjt(device=None, weights=None):
    return KeyedJaggedTensor.from_offsets_sync(
        keys=["f1", "f3", "f2"],
        values=torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 1, 3, 4, 7], device=device),
        offsets=torch.tensor([0, 2, 4, 6, 8, 10, 12], device=device),
        weights=weights
        if weights is not None
        else torch.tensor([0.1, 0.2, 0.4, 0.5, 0.4, 0.3, 0.2, 0.9, 0.1, 0.3, 0.4, 0.7], device=device),
    )


def kjt_f1_f2():
    #     0       1        2  <-- batch
    # f1  [0,1]  None     [2]
    # f2  [3]    [4]      [5,6,7]
    return KeyedJaggedTensor.from_offsets_sync(
        keys=["f1", "f2"], values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), offsets=torch.tensor([0, 2, 2, 3, 4, 5, 8])
    )


def ours_and_theirs(configs, is_weighted=False):
    torch.manual_seed(0)
    theirs = EmbeddingBagCollection(tables=configs, is_weighted=is_weighted)
    ours = rt.convert(copy.deepcopy(theirs), fused_params=SGD)
    return ours, theirs


# -- TorchRec's EmbeddingBagCollectionTest ------------------------------------------------


def test_unweighted():
    configs = [
        EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"],
                           init_fn=partial(torch.nn.init.normal_, mean=0.0, std=1.5)),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"],
                           init_fn=partial(torch.nn.init.uniform_, a=-0.036, b=0.036)),
    ]
    ours, theirs = ours_and_theirs(configs)
    pooled = ours(kjt_f1_f2())
    assert pooled.values().size() == (3, 7)
    assert pooled.keys() == ["f1", "f2"]
    assert pooled.offset_per_key() == [0, 3, 7]
    torch.testing.assert_close(pooled.values(), theirs(kjt_f1_f2()).values())


def test_shared_tables():
    ours, theirs = ours_and_theirs(
        [EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1", "f2"])]
    )
    pooled = ours(kjt_f1_f2())
    assert pooled.values().size() == (3, 6)
    assert pooled.keys() == ["f1", "f2"] and pooled.offset_per_key() == [0, 3, 6]
    torch.testing.assert_close(pooled.values(), theirs(kjt_f1_f2()).values())


def test_shared_features():
    ours, theirs = ours_and_theirs([
        EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f1"]),
    ])
    features = KeyedJaggedTensor.from_offsets_sync(
        keys=["f1"], values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), offsets=torch.tensor([0, 2, 2, 3, 4, 5, 8])
    )
    pooled = ours(features)
    assert pooled.values().size() == (6, 7)
    assert pooled.keys() == ["f1@t1", "f1@t2"] and pooled.offset_per_key() == [0, 3, 7]
    torch.testing.assert_close(pooled.values(), theirs(features).values())


def test_weighted():
    ours, theirs = ours_and_theirs(weighted_configs(), is_weighted=True)
    pooled = ours(weighted_kjt())
    assert pooled.values().size() == (2, 10)
    assert pooled.keys() == ["f1", "f3", "f2"] and pooled.offset_per_key() == [0, 3, 6, 10]
    torch.testing.assert_close(pooled.values(), theirs(weighted_kjt()).values())


def test_forward_with_meta_device():
    ebc = rt.HashEmbeddingBagCollection(weighted_configs(), is_weighted=True, device=torch.device("meta"))
    pooled = ebc(weighted_kjt(device="meta"))
    assert pooled.values().size() == (2, 10) and pooled.values().device == torch.device("meta")
    assert pooled.keys() == ["f1", "f3", "f2"] and pooled.offset_per_key() == [0, 3, 6, 10]
    assert ebc.tables() == {}  # nothing allocated on meta


def test_fx():
    ours, theirs = ours_and_theirs(weighted_configs(), is_weighted=True)
    for trace in (symbolic_trace, torch.fx.symbolic_trace):
        gm = trace(ours)
        pooled = gm(weighted_kjt())
        assert pooled.values().size() == (2, 10)
        assert pooled.keys() == ["f1", "f3", "f2"] and pooled.offset_per_key() == [0, 3, 6, 10]
        torch.testing.assert_close(pooled.values(), theirs(weighted_kjt()).values())
        # TorchRec scripts the traced module; ours says to use torch.export instead.
        with pytest.raises(RuntimeError, match="TorchScript.*torch.export"):
            torch.jit.script(gm)


def test_scripting():
    ebc = rt.HashEmbeddingBagCollection(
        [EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"])]
    )
    with pytest.raises(RuntimeError, match="cannot be compiled by TorchScript.*torch.export"):
        torch.jit.script(ebc)


def test_duplicate_config_name_fails():
    configs = [
        EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"]),
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["f2"]),
    ]
    with pytest.raises(ValueError, match="Duplicate table name"):
        rt.HashEmbeddingBagCollection(configs)
    with pytest.raises(ValueError, match="feature_names lists \\['f1'\\] more than once"):
        rt.HashEmbeddingBagCollection(
            [EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1", "f1"])]
        )


def test_device():
    configs = [EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"])]
    assert rt.HashEmbeddingBagCollection(configs, device=torch.device("cpu")).device.type == "cpu"
    assert rt.HashEmbeddingBagCollection(configs, device=torch.device("meta")).device.type == "meta"
    with torch.device("meta"):
        assert rt.HashEmbeddingBagCollection(configs).device.type == "meta"
    with pytest.raises(NotImplementedError, match="device mps is not supported"):
        rt.HashEmbeddingBagCollection(configs, device="mps")


# -- TorchRec's EmbeddingCollectionTest ------------------------------------------------------


def ec_pair(need_indices=False):
    configs = [
        EmbeddingConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["f1"]),
        EmbeddingConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"]),
    ]
    torch.manual_seed(0)
    theirs = EmbeddingCollection(tables=configs, need_indices=need_indices)
    return rt.convert(copy.deepcopy(theirs), fused_params=SGD), theirs


def test_ec_forward_and_indices():
    for need_indices in (False, True):
        ours, theirs = ec_pair(need_indices)
        got, want = ours(kjt_f1_f2()), theirs(kjt_f1_f2())
        assert list(got) == list(want) == ["f1", "f2"]
        for k in want:
            torch.testing.assert_close(got[k].values(), want[k].values())
            assert torch.equal(got[k].lengths(), want[k].lengths())
            if need_indices:
                assert torch.equal(got[k].weights(), want[k].weights())


def test_ec_fx_and_scripting():
    ours, theirs = ec_pair()
    for trace in (symbolic_trace, torch.fx.symbolic_trace):
        gm = trace(ours)
        got, want = gm(kjt_f1_f2()), theirs(kjt_f1_f2())
        for k in want:
            torch.testing.assert_close(got[k].values(), want[k].values())
        with pytest.raises(RuntimeError, match="TorchScript.*torch.export"):
            torch.jit.script(gm)
    with pytest.raises(RuntimeError, match="cannot be compiled by TorchScript"):
        torch.jit.script(ours)


def test_ec_device_and_duplicate_names():
    configs = [EmbeddingConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["f1"])]
    ec = rt.HashEmbeddingCollection(configs, device=torch.device("meta"))
    meta = KeyedJaggedTensor.from_offsets_sync(
        keys=["f1"], values=torch.tensor([1, 2, 3], device="meta"), offsets=torch.tensor([0, 2, 3], device="meta")
    )
    assert ec(meta)["f1"].values().shape == (3, 4) and ec(meta)["f1"].values().device.type == "meta"
    ec.to_empty(device="cpu")
    assert ec.device.type == "cpu" and list(ec.tables()) == ["t1"]
    with pytest.raises(ValueError, match="Duplicate table name"):
        rt.HashEmbeddingCollection(configs * 2)


# -- torch.export ------------------------------------------------------------------------


def random_kjt(keys, batch, seed, weighted=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)
    n = int(lengths.sum())
    return KeyedJaggedTensor(
        keys=keys, values=torch.randint(-50, 50, (n,), generator=g), lengths=lengths,
        weights=torch.rand(n, generator=g) if weighted else None,
    )


AUTO = torch.export.Dim.AUTO


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_export_ebc_with_dynamic_batch_equals_eager(mode):
    ours, _ = ours_and_theirs(weighted_configs(), is_weighted=True)
    keys = ["f1", "f3", "f2"]
    ours.train(mode == "train")
    spec = ([{0: AUTO}, {0: AUTO}, {0: AUTO}, None, None, None],)  # values, weights, lengths
    ep = torch.export.export(ours, (random_kjt(keys, 4, 0, True),), dynamic_shapes=spec, strict=False)
    ours.eval()
    for batch, seed in [(4, 1), (9, 2), (2, 3)]:
        kjt = random_kjt(keys, batch, seed, True)
        got = ep.module()(kjt)
        assert got.keys() == ["f1", "f3", "f2"]
        torch.testing.assert_close(got.values(), ours(kjt).values(), atol=0, rtol=0)


def test_export_ec_with_dynamic_batch_equals_eager():
    ours, _ = ec_pair(need_indices=True)
    ours.eval()
    spec = ([{0: AUTO}, None, {0: AUTO}, None, None, None],)
    ep = torch.export.export(ours, (random_kjt(["f1", "f2"], 4, 0),), dynamic_shapes=spec, strict=False)
    for batch, seed in [(4, 1), (7, 2)]:
        kjt = random_kjt(["f1", "f2"], batch, seed)
        got, want = ep.module()(kjt), ours(kjt)
        for k in want:
            torch.testing.assert_close(got[k].values(), want[k].values(), atol=0, rtol=0)
            assert torch.equal(got[k].lengths(), want[k].lengths()) and torch.equal(got[k].weights(), want[k].weights())


def test_fx_and_export_of_a_model_holding_our_ebc_and_compile():
    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=20, feature_names=[f"f{i}"])
               for i in range(2)]
    model = DLRM(EmbeddingBagCollection(configs), 3, [8, 4], [8, 1])
    rt.convert(model, fused_params=SGD)
    model.eval()
    dense, kjt = torch.rand(5, 3), random_kjt(["f0", "f1"], 5, 7)
    want = model(dense, kjt)
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(dense, kjt), want, atol=0, rtol=0)
    spec = ({0: AUTO}, [{0: AUTO}, None, {0: AUTO}, None, None, None])
    ep = torch.export.export(model, (torch.rand(4, 3), random_kjt(["f0", "f1"], 4, 8)), dynamic_shapes=spec,
                             strict=False)
    torch.testing.assert_close(ep.module()(dense, kjt), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.compile(model)(dense, kjt), want, atol=1e-6, rtol=1e-6)


# -- meta device, .to(), reset_parameters ------------------------------------------------


def test_convert_of_a_meta_device_model_imports_no_placeholder_rows():
    ebc = EmbeddingBagCollection(weighted_configs(), is_weighted=True, device=torch.device("meta"))
    ours = rt.convert(ebc)
    assert ours.device.type == "cpu" and all(len(t) == 0 for t in ours.tables().values())
    # ...and it computes: unseen ids read their initial values.
    assert ours(weighted_kjt()).values().shape == (2, 10)


def test_meta_module_materialises_on_to_and_to_empty():
    for move in (lambda m: m.to("cpu"), lambda m: m.to_empty(device="cpu"), lambda m: m.cpu()):
        m = rt.HashEmbeddingBagCollection(weighted_configs(), is_weighted=True, device="meta", fused_params=SGD)
        move(m)
        assert m.device.type == "cpu" and sorted(m.tables()) == ["t1", "t2"]
        out = m(weighted_kjt())
        out.values().sum().backward()
        assert len(m.tables()["t1"]) > 0 and m.fused_optimizer.steps() == {"t1": 1, "t2": 1}


def test_to_and_dtype_conversions_take_effect_or_raise():
    m, _ = ours_and_theirs(weighted_configs(), is_weighted=True)
    assert m.to("cpu") is m and m.to(torch.float32) is m and m.float() is m and m.cpu() is m
    for call, match in [
        (lambda: m.to("meta"), "to\\(meta\\).*drop its rows"),
        (lambda: m.to(torch.float16), "to\\(torch.float16\\)"),
        (lambda: m.half(), "half"),
        (lambda: m.bfloat16(), "bfloat16"),
        (lambda: m.double(), "double"),
        (lambda: m.to_empty(device="cpu"), "to_empty"),
        (lambda: m.type(torch.float64), "type"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            call()


def test_reset_parameters_reinitialises_every_row():
    m = rt.HashEmbeddingBagCollection(weighted_configs(), is_weighted=True,
                                      fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.5})
    initial = m(weighted_kjt()).values().detach()
    for _ in range(3):
        m(weighted_kjt()).values().sum().backward()
    assert not torch.allclose(m(weighted_kjt()).values(), initial)
    ids_before = {n: sorted(t.export()[0].tolist()) for n, t in m.tables().items()}
    m.reset_parameters()
    torch.testing.assert_close(m(weighted_kjt()).values(), initial, atol=0, rtol=0)
    assert {n: sorted(t.export()[0].tolist()) for n, t in m.tables().items()} == ids_before
    assert all(float(t.export()[2].abs().sum()) == 0.0 for t in m.tables().values())  # optimizer state too


# -- state dict, weighted features ------------------------------------------------------


def test_state_dict_round_trip_and_torchrec_state_dict():
    ours, theirs = ours_and_theirs(weighted_configs(), is_weighted=True)
    other = rt.HashEmbeddingBagCollection(weighted_configs(), is_weighted=True)
    other.load_state_dict(ours.state_dict())
    torch.testing.assert_close(other(weighted_kjt()).values(), theirs(weighted_kjt()).values())
    fresh = rt.HashEmbeddingBagCollection(weighted_configs(), is_weighted=True)
    fresh.load_state_dict(theirs.state_dict())  # TorchRec's keys: row i is id i
    torch.testing.assert_close(fresh(weighted_kjt()).values(), theirs(weighted_kjt()).values())


def test_per_sample_weights_receive_torchrec_s_gradients():
    ours, theirs = ours_and_theirs(
        weighted_configs() + [EmbeddingBagConfig(name="t3", embedding_dim=2, num_embeddings=10, feature_names=["f1"])],
        is_weighted=True,
    )
    target = torch.linspace(-1, 1, 12)
    grads = []
    for m in (theirs, ours):
        w = torch.tensor([0.1, 0.2, 0.4, 0.5, 0.4, 0.3, 0.2, 0.9, 0.1, 0.3, 0.4, 0.7], requires_grad=True)
        ((m(weighted_kjt(weights=w)).values() * target).sum()).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_mean_pooled_weight_gradients_against_plain_pytorch():
    configs = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f1", "f3", "f2"],
                                  pooling=PoolingType.MEAN)]
    torch.manual_seed(0)
    theirs = EmbeddingBagCollection(tables=configs, is_weighted=True)
    ours = rt.convert(copy.deepcopy(theirs), fused_params=SGD)
    ours.eval()  # ids 15 and 17 have no row: they read their initial values
    w = torch.rand(12, requires_grad=True)
    kjt = KeyedJaggedTensor.from_offsets_sync(
        keys=["f1", "f3", "f2"], values=torch.tensor([1, 2, 4, 15, 4, 3, 2, 9, 17, 3, 4, 7]),
        offsets=torch.tensor([0, 2, 4, 6, 8, 10, 12]), weights=w,
    )
    table = ours.tables()["t"]
    rows = table.lookup(kjt.values())  # before the backward updates them
    out = ours(kjt).values()
    (out * torch.arange(out.numel()).view_as(out)).sum().backward()
    # Plain PyTorch: the same mean of weighted rows.
    w2 = w.detach().clone().requires_grad_()
    lengths = kjt.lengths()
    bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    pooled = torch.zeros(lengths.numel(), 4).index_add(0, bag, rows * w2[:, None]) / lengths.clamp(min=1)[:, None]
    ref = pooled.view(3, 2, 4).transpose(0, 1).reshape(2, 12)
    (ref * torch.arange(ref.numel()).view_as(ref)).sum().backward()
    torch.testing.assert_close(out.detach(), ref.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-6, rtol=1e-5)


def test_feature_processed_ebc_trains_its_position_weights_as_torchrec_does():
    configs = [EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1", "f2"])]
    torch.manual_seed(0)
    theirs_ebc = EmbeddingBagCollection(configs, is_weighted=True)

    def fpebc(ebc):
        torch.manual_seed(1)
        return FeatureProcessedEmbeddingBagCollection(ebc, PositionWeightedModuleCollection({"f1": 4, "f2": 4}))

    theirs = fpebc(theirs_ebc)
    ours = fpebc(rt.convert(copy.deepcopy(theirs_ebc), fused_params=SGD))
    for m in (theirs, ours):
        out = m(kjt_f1_f2()).values()
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    mine = dict(ours.named_parameters())
    compared = 0
    for name, p in theirs.named_parameters():
        if "position_weight" in name:
            assert mine[name].grad is not None and p.grad is not None, name
            torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-6, rtol=1e-5)
            compared += 1
    assert compared == 2
    # It traces with our EBC inside (tracing caches state in TorchRec's processor: on a fresh one).
    gm = torch.fx.symbolic_trace(fpebc(rt.convert(copy.deepcopy(theirs_ebc), fused_params=SGD)))
    torch.testing.assert_close(gm(kjt_f1_f2()).values(), fpebc(copy.deepcopy(theirs_ebc))(kjt_f1_f2()).values())


def test_dense_optimizers_over_model_parameters_keep_working():
    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=20, feature_names=["f0"])]
    model = DLRM(EmbeddingBagCollection(configs), 3, [8, 4], [8, 1])
    rt.convert(model, fused_params=SGD)
    params = list(model.parameters())
    assert params and all(p.requires_grad for p in params)  # the dense part; our tables are not parameters
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss = model(torch.rand(3, 3), random_kjt(["f0"], 3, 1)).sum()
    loss.backward()
    opt.step()
    # Our tables passed to a dense optimizer: no parameters there, and torch says so.
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.SGD(model.sparse_arch.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="HashTable"):
        torch.optim.SGD([model.sparse_arch.embedding_bag_collection.tables()["t0"]], lr=0.1)


def test_embedding_bags_and_embeddings_as_torchrec_code_reads_them():
    # TorchRec's test_device reads ebc.embedding_bags["t1"].weight.device; code reading a table's
    # config, dim or rows goes the same way. What a hash table cannot honestly give raises.
    config = EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"])
    meta = rt.HashEmbeddingBagCollection([config], device=torch.device("meta"))
    assert meta.embedding_bags["t1"].weight.device == torch.device("meta")  # TorchRec's test_device

    ours, theirs = ours_and_theirs([config, EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10,
                                                               feature_names=["f2"])])
    assert list(ours.embedding_bags) == list(theirs.embedding_bags) == ["t1", "t2"]
    view = ours.embedding_bags["t2"]
    assert view.config is ours.embedding_bag_configs()[1] and view.embedding_dim == 4 and view.num_embeddings == 10
    assert view.weight.device == theirs.embedding_bags["t2"].weight.device and view.weight.dtype == torch.float32
    order = torch.argsort(view.ids)
    assert torch.equal(view.ids[order], torch.arange(10))  # converted: rows 0..9 imported
    torch.testing.assert_close(view.weight[order], theirs.embedding_bags["t2"].weight.detach())
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        view.weight.add_(1.0)  # a copy: writing to it would change nothing, so it cannot be written
    with pytest.raises(RuntimeError, match="table 't2' of a HashEmbeddingBagCollection has no parameters"):
        list(view.parameters())
    with pytest.raises(AttributeError, match="is a hash table: it has config, .* not 'padding_idx'"):
        view.padding_idx

    ec, theirs_ec = ec_pair()
    assert list(ec.embeddings) == ["t1", "t2"] and ec.embeddings["t1"].weight.shape == (10, 4)
    assert ec.embeddings["t1"].embedding_dim == theirs_ec.embeddings["t1"].embedding_dim
