# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The modules on every device: the sequence module against TorchRec's EC, state and checkpoints,
copies, eval mode, streams, and the options a device does not have."""

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from torchrec.modules.embedding_configs import PoolingType

import recis_torchrec as rt
from recis_torchrec.testing import random_kjt
from tests.devices import devices, needs_cuda
from tests.tables.test_tables_on_devices import make_table
from tests.optim.test_optimizers_on_devices import KEYS, OPTIMIZERS, configs, loss_of


@pytest.mark.parametrize("device", devices())
def test_sequence_module_matches_torchrec_ec(device):
    torch.manual_seed(0)
    ec = EmbeddingCollection([EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=40,
                                              feature_names=["hist", "cand"])], need_indices=True)
    reference = EmbeddingCollection(ec.embedding_configs(), need_indices=True)
    reference.load_state_dict(ec.state_dict())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    hec = rt.convert(ec, fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}, device=device)
    for s in range(3):
        kjt = random_kjt(["hist", "cand"], 4, 6, num_ids=40, seed=s)
        out = hec(kjt.to(device))
        ref = reference(kjt)
        for k in ref:
            torch.testing.assert_close(out[k].values().cpu(), ref[k].values().detach(), atol=1e-6, rtol=1e-6)
            assert torch.equal(out[k].weights().cpu(), ref[k].weights())
        ref_opt.zero_grad()
        sum(loss_of(v.values()) for v in ref.values()).backward()
        ref_opt.step()
        sum(loss_of(v.values()) for v in out.values()).backward()
    ids, w, _ = hec.tables()["item"].export()
    order = torch.argsort(ids)
    torch.testing.assert_close(w[order], reference.embeddings["item"].weight.detach()[ids[order]], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_state_dict_and_optimizer_state_round_trip(device):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(configs(PoolingType.SUM))
    fused = OPTIMIZERS["adam"]
    hebc = rt.convert(ebc, fused_params=fused, device=device)
    for s in range(2):
        loss_of(hebc(random_kjt(KEYS, 4, 4, num_ids=30, seed=s).to(device)).values()).backward()
    sd, osd = hebc.state_dict(), hebc.fused_optimizer.state_dict()
    fresh = rt.HashEmbeddingBagCollection(configs(PoolingType.SUM), device=device, fused_params=fused)
    fresh.load_state_dict(sd)
    fresh.fused_optimizer.load_state_dict(osd)
    for name in ("t0", "t1"):
        a, b = hebc.tables()[name].export(), fresh.tables()[name].export()
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@needs_cuda
def test_options_that_cuda_tables_do_not_have_yet_raise():
    with pytest.raises(NotImplementedError, match="admit_threshold"):
        make_table("cuda", admit_threshold=3)
    with pytest.raises(ValueError, match="a module's tables share its device"):
        rt.HashEmbeddingBagCollection(
            [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])],
            device="cuda", options=rt.HashTableOptions(device="cpu"),
        )


SGD = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.5}


def rows_by_id(table) -> dict:
    ids, w, _ = table.export()
    return {i: r for i, r in zip(ids.tolist(), w)}


@pytest.mark.parametrize("device", devices())
def test_eval_mode_backward_updates_present_rows_and_skips_absent_ids(device):
    """In eval mode nothing is inserted; a backward through it still trains the rows that exist
    (a fused optimizer has no eval mode in TorchRec either) and drops the absent ids' gradients."""
    hebc = rt.HashEmbeddingBagCollection(configs(PoolingType.SUM), device=device, fused_params=SGD)
    present = random_kjt(KEYS, 4, 3, num_ids=10, seed=1)
    with torch.no_grad():
        hebc(present.to(device))
    before = {n: rows_by_id(t) for n, t in hebc.tables().items()}
    mixed = random_kjt(KEYS, 6, 4, num_ids=40, seed=2)
    hebc.eval()
    out = hebc(mixed.to(device)).values()
    out.sum().backward()
    after = {n: rows_by_id(t) for n, t in hebc.tables().items()}
    assert {n: sorted(r) for n, r in after.items()} == {n: sorted(r) for n, r in before.items()}
    # d(sum)/d(row) is the id's count in the table's features: SGD moves each present row by -lr * count.
    d = mixed.to_dict()
    tables = {"t0": ["f0", "f1"], "t1": ["f2"]}
    for name, feats in tables.items():
        counts = torch.bincount(torch.cat([d[f].values() for f in feats]), minlength=40)
        for i, row in before[name].items():
            torch.testing.assert_close(after[name][i], row - SGD["learning_rate"] * float(counts[i]))


@pytest.mark.parametrize("device", devices())
def test_checkpoint_round_trip_and_deepcopy(device, tmp_path):
    from recis_torchrec import checkpoint

    torch.manual_seed(0)
    fused = OPTIMIZERS["adam"]
    model = torch.nn.ModuleDict({"ebc": rt.HashEmbeddingBagCollection(configs(PoolingType.SUM), device=device,
                                                                       fused_params=fused)})
    for s in range(2):
        loss_of(model["ebc"](random_kjt(KEYS, 4, 4, num_ids=30, seed=s).to(device)).values()).backward()
    checkpoint.save(str(tmp_path), model, step=2)
    fresh = torch.nn.ModuleDict({"ebc": rt.HashEmbeddingBagCollection(configs(PoolingType.SUM), device=device,
                                                                       fused_params=fused)})
    assert checkpoint.load(str(tmp_path), fresh) == 2
    clone = copy.deepcopy(model)
    for other in (fresh, clone):
        for name, table in model["ebc"].tables().items():
            got = other["ebc"].tables()[name]
            assert got.device.type == device
            for x, y in zip(table.export(), got.export()):
                assert torch.equal(x, y), name
    # Each copy trains its own tables, and the next step agrees between them.
    kjt = random_kjt(KEYS, 4, 4, num_ids=30, seed=9).to(device)
    outs = []
    for m in (model, fresh, clone):
        loss_of(m["ebc"](kjt).values()).backward()
        outs.append({n: t.export()[1] for n, t in m["ebc"].tables().items()})
    for o in outs[1:]:
        for n in o:
            torch.testing.assert_close(o[n], outs[0][n], atol=0, rtol=0)
    del clone  # freeing the copy leaves the original's table alive
    assert len(model["ebc"].tables()["t0"]) > 0
    loss_of(model["ebc"](kjt).values()).backward()


@needs_cuda
def test_a_non_default_stream_gives_the_default_streams_results():
    torch.manual_seed(0)
    kjts = [random_kjt(KEYS, 8, 5, num_ids=30, seed=s).to("cuda") for s in range(3)]
    results = []
    for use_side_stream in (False, True):
        torch.manual_seed(0)
        hebc = rt.HashEmbeddingBagCollection(configs(PoolingType.MEAN), device="cuda", fused_params=OPTIMIZERS["adam"])
        stream = torch.cuda.Stream() if use_side_stream else torch.cuda.current_stream()
        outs = []
        with torch.cuda.stream(stream):
            for kjt in kjts:
                kjt.record_stream(stream)
                out = hebc(kjt).values()
                loss_of(out).backward()
                outs.append(out.detach().cpu())
        torch.cuda.synchronize()
        results.append((outs, {n: t.export()[1] for n, t in hebc.tables().items()}))
    (a_out, a_rows), (b_out, b_rows) = results
    for x, y in zip(a_out, b_out):
        torch.testing.assert_close(y, x, atol=0, rtol=0)
    for n in a_rows:
        torch.testing.assert_close(b_rows[n], a_rows[n], atol=0, rtol=0)


def test_torch_kjt_paths_equal_fbgemms():
    """The torch ops used off the CPU give what FBGEMM's CPU ops give (permute_2D_sparse_data,
    asynchronous_complete_cumsum), weights included."""
    from recis_torchrec.modules.kjt import offsets_from_lengths, permute_keys_by_torch

    kjt = random_kjt(["a", "b", "c", "d"], 5, 4, num_ids=50, weighted=True, seed=3)
    for permute in ([2, 0, 3, 1], [1], [3, 3, 0], []):
        want, got = kjt.permute(permute), permute_keys_by_torch(kjt, permute)
        assert got.keys() == want.keys()
        for a, b in ((got.values(), want.values()), (got.lengths(), want.lengths()), (got.weights(), want.weights())):
            assert torch.equal(a, b.to(a.dtype)), permute
    assert torch.equal(offsets_from_lengths(kjt.lengths()), kjt.offsets().to(torch.int64))
    assert torch.equal(offsets_from_lengths(torch.zeros(0, dtype=torch.int32)), torch.zeros(1, dtype=torch.int64))


@needs_cuda
def test_no_fbgemm_op_sees_a_gpu_tensor():
    """On our CUDA path every KJT op is a torch op, so it runs with fbgemm-gpu-cpu (no CUDA kernels)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fbgemm":
                flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
                if any(isinstance(a, torch.Tensor) and a.is_cuda for a in flat):
                    seen.append(str(func))
            return func(*args, **(kwargs or {}))

    hebc = rt.HashEmbeddingBagCollection(configs(PoolingType.MEAN), device="cuda", fused_params=OPTIMIZERS["adam"],
                                         is_weighted=True)
    ec = EmbeddingCollection([EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=40,
                                              feature_names=["hist", "cand"])])
    hec = rt.convert(ec, fused_params=OPTIMIZERS["sgd"], device="cuda")
    with Spy():
        kjt = random_kjt(KEYS[::-1], 4, 4, num_ids=30, weighted=True, seed=0).to("cuda")
        loss_of(hebc(kjt).values()).backward()
        out = hec(random_kjt(["cand", "hist"], 4, 4, num_ids=40, seed=1).to("cuda"))
        sum(loss_of(v.values()) for v in out.values()).backward()
    assert not seen, seen


@pytest.mark.parametrize("device", devices())
def test_tables_with_different_optimizers_in_one_module(device):
    # Per-table optimizers put the tables in separate lookup groups whose outputs are put back in
    # TorchRec's order by an index: on a GPU that index was a CPU tensor and the forward crashed.
    torch.manual_seed(0)
    cfgs = [EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=30, feature_names=["f0"]),
            EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=30, feature_names=["f1"]),
            EmbeddingBagConfig(name="c", embedding_dim=4, num_embeddings=30, feature_names=["f2"])]
    theirs = EmbeddingBagCollection(cfgs)
    sgd = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
    ours = rt.HashEmbeddingBagCollection(cfgs, device=device, table_fused_params={
        "a": sgd, "b": {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1}, "c": sgd})
    ours.load_state_dict(theirs.state_dict())  # TorchRec's rows: row i becomes id i
    assert len(ours._group_tables) == 2
    kjt = random_kjt(["f0", "f1", "f2"], 5, 3, num_ids=30, seed=1)
    got, want = ours(kjt.to(device)), theirs(kjt)
    assert got.keys() == want.keys()
    torch.testing.assert_close(got.values().cpu(), want.values().detach(), atol=1e-6, rtol=1e-6)
