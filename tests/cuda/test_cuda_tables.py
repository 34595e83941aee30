# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""CUDA tables (csrc/cuda/): they compile wherever nvcc is (CI); with a GPU and a RECIS_CUDA=1
build, every test below runs on each device and checks it against a plain-PyTorch reference or the
CPU implementation. Without a GPU the CUDA cases skip; nothing here has run on a GPU unless a run
log says so.

On a GPU machine:

    RECIS_CUDA=1 .venv/bin/pip install --no-build-isolation --no-deps -e . && .venv/bin/python -m pytest tests/cuda
"""

import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from torchrec.modules.embedding_configs import PoolingType

import recis_torchrec as rt
from recis_torchrec import ops
from recis_torchrec.ops.devices import cuda_tables_available
from recis_torchrec.modules.hash_table import HashTable
from recis_torchrec.optim.fused import WeightDecayMode
from recis_torchrec.testing import random_kjt, reference_adam_rows, reference_rowwise_adagrad_rows

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NVCC = shutil.which("nvcc")
HAS_CUDA_TABLES = cuda_tables_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA_TABLES, reason="needs a GPU and an extension built with RECIS_CUDA=1"))]
needs_cuda = pytest.mark.skipif(not HAS_CUDA_TABLES, reason="needs a GPU and an extension built with RECIS_CUDA=1")


# -- compiled here -------------------------------------------------------------------------


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", [None, "sm_90"])
def test_gpu_table_compiles(tmp_path, arch):
    cmd = [NVCC, "-std=c++17", "-O2", "-fmad=false", "-c", os.path.join(ROOT, "csrc", "cuda", "gpu_table.cu"),
           "-I", os.path.join(ROOT, "csrc"), "-o", str(tmp_path / "gpu_table.o")]
    if arch:
        cmd += [f"-arch={arch}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc (and the CUDA headers) are not installed")
def test_gpu_table_op_registration_compiles():
    from torch.utils.cpp_extension import include_paths

    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))]
    found = [os.path.join(h, "include") for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_runtime_api.h"))]
    if not found:
        pytest.skip("the CUDA runtime headers are not found (set CUDA_HOME)")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", *[f"-I{p}" for p in include_paths()], f"-I{found[0]}",
           f"-I{os.path.join(ROOT, 'csrc')}", os.path.join(ROOT, "csrc", "cuda", "gpu_table_ops.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_without_cuda_tables_the_error_says_how_to_get_them():
    if HAS_CUDA_TABLES:
        pytest.skip("this build has CUDA tables")
    with pytest.raises((NotImplementedError, RuntimeError), match="RECIS_CUDA=1|needs a GPU|need a GPU"):
        rt.HashEmbeddingBagCollection(
            [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])], device="cuda"
        )


# -- run on every device ---------------------------------------------------------------------


def make_table(device: str, name="t", dim=8, state_dim=0, **options):
    return HashTable(name, dim, state_dim, rt.HashTableOptions(**options), num_embeddings=16, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_find_or_insert_duplicates_extremes_and_growth(device):
    table = make_table(device, initial_capacity=4, block_rows=8)
    ids = torch.tensor([5, -(2**63), 2**63 - 1, 5, 0, -1, 5, 2**63 - 1], device=device)
    rows = table.find_or_insert(ids)
    assert len(table) == 5
    assert rows[0] == rows[3] == rows[6] and rows[2] == rows[7]
    assert rows.unique().numel() == 5
    assert torch.equal(table.find(ids), rows)
    assert int(table.find(torch.tensor([42], device=device))[0]) == -1
    before = table.lookup(ids).cpu()
    # Grow well past the initial capacity and block size: earlier rows neither move nor change.
    many = torch.arange(10_000, 30_000, device=device)
    table.find_or_insert(many)
    assert len(table) == 5 + 20_000
    torch.testing.assert_close(table.lookup(ids).cpu(), before, atol=0, rtol=0)
    assert torch.equal(table.find(ids), rows)


@needs_cuda
@pytest.mark.parametrize("initializer", ["uniform", "normal", "truncated_normal", "constant"])
def test_initial_rows_equal_the_cpu_tables(initializer):
    ids = torch.cat([torch.arange(-50, 50), torch.tensor([-(2**63), 2**63 - 1])])
    cpu = make_table("cpu", name="items", dim=12, initializer=initializer, init_value=0.5)
    gpu = make_table("cuda", name="items", dim=12, initializer=initializer, init_value=0.5)
    cpu.find_or_insert(ids)
    gpu.find_or_insert(ids.cuda())
    c_ids, c_w, _ = cpu.export()
    g_ids, g_w, _ = gpu.export()
    order = torch.argsort(c_ids)
    assert torch.equal(g_ids, c_ids[order])
    if initializer in ("uniform", "constant"):
        assert torch.equal(g_w, c_w[order])  # bit for bit
    else:  # the GPU's logf/cosf may differ from the host's by a few ulps
        torch.testing.assert_close(g_w, c_w[order], atol=1e-6, rtol=1e-5)
    # Absent ids read the same initial value without being inserted.
    probe = torch.tensor([1000, -1000])
    torch.testing.assert_close(gpu.lookup(probe.cuda()).cpu(), cpu.lookup(probe), atol=1e-6, rtol=1e-5)


@needs_cuda
def test_concurrent_inserts_of_one_hot_id():
    """Every thread of a launch asks for the same few ids: each gets one row."""
    table = make_table("cuda", initial_capacity=2)
    ids = torch.tensor([7, 8, 9], device="cuda").repeat(100_000)
    rows = table.find_or_insert(ids)
    assert len(table) == 3
    assert rows.view(-1, 3).unique(dim=0).shape[0] == 1


@needs_cuda
def test_host_rows_table_matches_device_rows():
    ids = torch.arange(0, 5000, 7)
    dev = make_table("cuda", name="h", dim=16)
    host = make_table("cuda", name="h", dim=16, host_rows=True)
    dev.find_or_insert(ids.cuda())
    host.find_or_insert(ids.cuda())
    assert torch.equal(host.lookup(ids.cuda()).cpu(), dev.lookup(ids.cuda()).cpu())


@needs_cuda
def test_owner_of_and_bucketing_match_the_cpu():
    ids = torch.randint(-(2**62), 2**62, (50_000,))
    for world_size in (1, 2, 3, 8):
        want = ops.owner_of(ids, world_size)
        got = ops.owner_of(ids.cuda(), world_size).cpu()
        assert torch.equal(got, want)
        perm, counts = torch.ops.recis.gpu_bucketize_by_owner(ids.cuda(), world_size)
        assert torch.equal(counts.cpu(), torch.bincount(want, minlength=world_size))
        expected = torch.argsort(want, stable=True)
        assert torch.equal(perm.cpu(), expected)


# -- the module on every device, against plain PyTorch ---------------------------------------

KEYS = ["f0", "f1", "f2"]
STEPS = 4
OPTIMIZERS = {
    "sgd": {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1},
    "adagrad": {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8},
    "rowwise_adagrad": {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1, "eps": 1e-8},
    "adam": {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "eps": 1e-6},
    "adamw": {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "eps": 1e-6, "weight_decay": 0.1,
              "weight_decay_mode": WeightDecayMode.DECOUPLE},
}


def configs(pooling):
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=30, feature_names=["f0", "f1"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=12, num_embeddings=30, feature_names=["f2"], pooling=pooling),
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
                mode = "mean" if c.pooling == PoolingType.MEAN else "sum"
                outs.append(F.embedding_bag(jt.values(), params[c.name], jt.offsets(), mode=mode,
                                            per_sample_weights=jt.weights() if weighted else None,
                                            include_last_offset=True))
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
            else:
                w, m, v = reference_adam_rows(
                    w, self.m[c.name][touched], self.v[c.name][touched], g, lr, 0.9, 0.999, eps, self.step,
                    weight_decay=p.get("weight_decay", 0.0), decoupled=p.get("weight_decay_mode") is not None,
                )
                self.m[c.name][touched], self.v[c.name][touched] = m, v
            self.w[c.name][touched] = w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False),
                                              (PoolingType.SUM, True)])
def test_training_matches_plain_pytorch(device, optimizer, pooling, weighted):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(configs(pooling), is_weighted=weighted)
    fused = OPTIMIZERS[optimizer]
    reference = ReferenceTables(ebc, fused)
    hebc = rt.convert(ebc, fused_params=fused, device=device)
    assert hebc.device.type == device
    for s in range(STEPS):
        kjt = random_kjt(KEYS, 6, 5, num_ids=30, weighted=weighted, seed=10 + s)
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
    assert hebc.fused_optimizer.steps() == {"t0": STEPS, "t1": STEPS}


@pytest.mark.parametrize("device", DEVICES)
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


@pytest.mark.parametrize("device", DEVICES)
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
