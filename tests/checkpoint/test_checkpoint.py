# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints: exact resume, resharding between world sizes, crash safety, errors, deltas."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

import recis_torchrec as rt
from recis_torchrec import checkpoint
from recis_torchrec.checkpoint import CheckpointError
from recis_torchrec.testing.multiprocess import run_ranks
from tests.distributed.test_sharded_ebc import BATCH, make_model, rank_batch, union_batch

FUSED = {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "eps": 1e-6}


def loss_of(logits):
    return ((logits - 0.5) ** 2).sum()


def unsharded(seed: int = 0):
    model = make_model(seed)
    model.ebc = rt.convert(model.ebc, fused_params=FUSED)
    return model, torch.optim.Adam(model.dense.parameters(), lr=0.01)


def train_union(model, opt, steps, world_size=2):
    """Unsharded steps equal to a world_size-rank run: union batch, loss averaged over ranks."""
    outs = []
    bounds = [0] + torch.tensor([BATCH[r % len(BATCH)] for r in range(world_size)]).cumsum(0).tolist()
    for s in steps:
        logits, _ = model(union_batch(s, world_size))
        opt.zero_grad()
        (sum(loss_of(logits[bounds[r] : bounds[r + 1]]) for r in range(world_size)) / world_size).backward()
        opt.step()
        outs.append(logits.detach())
    return outs


def table_rows(model):
    out = {}
    for ref in checkpoint.files.hash_tables(model):
        ids, w, s, _ = ref.table.export_rows()
        order = torch.argsort(ids)
        out[ref.key] = (ids[order], w[order], s[order])
    return out


def assert_same_rows(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k], b[k]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# -- single process ------------------------------------------------------------------


def test_exact_resume_unsharded_with_dense_optimizer_and_loader(tmp_path):
    from recis_torchrec.testing.kjt import random_kjt  # noqa: F401

    model, opt = unsharded()
    train_union(model, opt, [0, 1])
    loader = _Counter()
    loader.position = 7
    ckpt = checkpoint.save(str(tmp_path / "ckpt"), model, opt, loader, step=2, max_file_bytes=4096)
    index = json.load(open(os.path.join(ckpt, "index.json")))
    assert len(index["tables"]["ebc/t0"]["files"]) > 1  # split into bounded-size files
    expected = train_union(model, opt, [2, 3, 4])
    rows_after = table_rows(model)

    fresh, fresh_opt = unsharded(seed=99)  # other initial dense weights
    fresh_loader = _Counter()
    assert checkpoint.load(str(tmp_path / "ckpt"), fresh, fresh_opt, fresh_loader) == 2
    assert fresh_loader.position == 7
    got = train_union(fresh, fresh_opt, [2, 3, 4])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert_same_rows(table_rows(fresh), rows_after)


def test_one_row_files_round_trip(tmp_path):
    """Files of a single row (a one-row table, or a tiny file size) hold strided column slices."""
    model, opt = unsharded()
    train_union(model, opt, [0])
    rows = table_rows(model)
    checkpoint.save(str(tmp_path / "ckpt"), model, opt, step=1, max_file_bytes=1)
    fresh, fresh_opt = unsharded(seed=99)
    checkpoint.load(str(tmp_path / "ckpt"), fresh, fresh_opt)
    assert_same_rows(table_rows(fresh), rows)


class _Counter:
    """A stand-in loader: anything with state_dict/load_state_dict."""

    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, s):
        self.position = s["position"]


def test_errors_name_the_file_or_table_and_load_nothing(tmp_path):
    model, opt = unsharded()
    train_union(model, opt, [0])
    root = str(tmp_path / "ckpt")
    ckpt = checkpoint.save(root, model, opt, step=1)
    index = json.load(open(os.path.join(ckpt, "index.json")))
    table_file = os.path.join(ckpt, index["tables"]["ebc/t0"]["files"][0]["file"])
    original = open(table_file, "rb").read()

    target, target_opt = unsharded(seed=5)
    train_union(target, target_opt, [3])
    before = table_rows(target)
    dense_before = target.dense.weight.detach().clone()

    def expect(match):
        with pytest.raises(CheckpointError, match=match):
            checkpoint.load(root, target, target_opt)
        assert_same_rows(table_rows(target), before)  # nothing was loaded half-way
        assert torch.equal(target.dense.weight, dense_before)

    with open(table_file, "wb") as f:
        f.write(original[: len(original) // 2])
    expect(r"rank0-part0.safetensors: \d+ bytes but the index says \d+ \(truncated\?\)")
    flipped = bytearray(original)
    flipped[-3] ^= 0xFF
    with open(table_file, "wb") as f:
        f.write(bytes(flipped))
    expect("rank0-part0.safetensors: checksum mismatch")
    os.remove(table_file)
    expect("rank0-part0.safetensors: missing")
    with open(table_file, "wb") as f:
        f.write(original)
    index["tables"]["ebc/t1"]["dim"] = 16
    json.dump(index, open(os.path.join(ckpt, "index.json"), "w"))
    expect("table 'ebc/t1': the checkpoint has dim 16 but the model's table has dim 8")


def test_keep_last_include_and_exclude(tmp_path):
    model, opt = unsharded()
    root = str(tmp_path / "ckpt")
    for step in range(4):
        train_union(model, opt, [step])
        checkpoint.save(root, model, opt, step=step, keep_last=2)
    assert [s for s, _ in checkpoint.checkpoints(root)] == [2, 3]
    saved = table_rows(model)
    target, _ = unsharded(seed=3)
    untouched = table_rows(target)
    checkpoint.load(root, target, include=["t0"], strict=False)
    rows = table_rows(target)
    assert_same_rows({"ebc/t0": rows["ebc/t0"]}, {"ebc/t0": saved["ebc/t0"]})
    assert_same_rows({"ebc/t1": rows["ebc/t1"]}, {"ebc/t1": untouched["ebc/t1"]})
    target2, _ = unsharded(seed=3)
    checkpoint.load(root, target2, exclude=["ebc/t0"])
    rows = table_rows(target2)
    assert_same_rows({"ebc/t0": rows["ebc/t0"]}, {"ebc/t0": untouched["ebc/t0"]})
    assert_same_rows({"ebc/t2": rows["ebc/t2"]}, {"ebc/t2": saved["ebc/t2"]})


def test_delta_applied_to_the_earlier_checkpoint_equals_the_later_one(tmp_path):
    from recis_torchrec import HashTableOptions

    def capped():
        model = make_model()
        model.ebc = rt.convert(
            model.ebc,
            fused_params=FUSED,
            options=HashTableOptions(max_capacity=60, eviction_policy="lru", block_rows=16),
        )
        return model, torch.optim.Adam(model.dense.parameters(), lr=0.01)

    model, opt = capped()
    train_union(model, opt, [0, 1])
    a = checkpoint.save(str(tmp_path / "ckpt"), model, opt, step=2)
    train_union(model, opt, [2, 3, 4, 5])
    evicted = sum(ref.table.info()["evicted"] for ref in checkpoint.files.hash_tables(model))
    assert evicted > 0  # the delta must carry evictions too
    b_rows = table_rows(model)
    checkpoint.export_delta(str(tmp_path / "delta"), model, since_step=a)
    restored, _ = capped()
    checkpoint.load(a, restored)
    checkpoint.apply_delta(str(tmp_path / "delta"), restored)
    assert_same_rows(table_rows(restored), b_rows)


# -- crash safety ---------------------------------------------------------------------

_CRASH_CHILD = r"""
import os, sys, json, torch
sys.path.insert(0, {root!r})
from tests.checkpoint.test_checkpoint import unsharded, train_union, table_rows
from recis_torchrec import checkpoint
model, opt = unsharded()
for ref in checkpoint.files.hash_tables(model):  # big tables, so that a save takes a while
    ref.table.import_(torch.arange(10**6, 10**6 + 300_000), torch.randn(300_000, ref.table.dim))
def fingerprint(step):
    fp = {{k: float(v[1].sum()) for k, v in table_rows(model).items()}}
    json.dump(fp, open({out!r} + "/fp-%d.json" % step, "w"))
train_union(model, opt, [0])
fingerprint(1)
checkpoint.save({out!r} + "/ckpt", model, opt, step=1)
print("saved 1", flush=True)
step = 1
while True:  # keep saving: the kill lands inside some save
    train_union(model, opt, [step])
    step += 1
    fingerprint(step)
    checkpoint.save({out!r} + "/ckpt", model, opt, step=step, keep_last=1)
"""


def test_sigkill_during_save_leaves_the_previous_checkpoint_intact(tmp_path):
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    code = _CRASH_CHILD.format(root=root, out=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "saved 1", line
        ckpt = tmp_path / "ckpt"
        deadline = time.monotonic() + 60
        while not any(".tmp-" in n for n in os.listdir(ckpt)):  # the next save has begun writing
            assert time.monotonic() < deadline, "the child never started its next save"
            time.sleep(0.002)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    found = checkpoint.checkpoints(str(tmp_path / "ckpt"))
    assert found  # the last complete checkpoint is still there
    leftovers = [n for n in os.listdir(tmp_path / "ckpt") if ".tmp-" in n]
    step = found[-1][0]
    model, opt = unsharded(seed=4)
    assert checkpoint.load(str(tmp_path / "ckpt"), model, opt) == step  # verified against its checksums
    fp = json.load(open(tmp_path / f"fp-{step}.json"))
    got = {k: float(v[1].sum()) for k, v in table_rows(model).items()}
    assert got == pytest.approx(fp)
    assert len(leftovers) == 1  # the save that was killed, left unfinished and ignored


# -- resharding across world sizes ------------------------------------------------------


def _two_rank_worker(rank, world_size, root, mode):
    from torchrec.distributed.model_parallel import DistributedModelParallel

    model = make_model()
    dmp = DistributedModelParallel(model, sharders=rt.sharders(FUSED), plan=rt.plan(model, world_size))
    opt = torch.optim.Adam([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.01)

    def steps(ids):
        outs = []
        for s in ids:
            logits, _ = dmp(rank_batch(s, rank, world_size))
            opt.zero_grad()
            loss_of(logits).backward()
            opt.step()
            outs.append(logits.detach())
        return outs

    if mode == "save":  # train, save, continue: the reference continuation
        steps([0, 1])
        checkpoint.save(os.path.join(root, "from2"), dmp, opt, step=2)
        cont = steps([2, 3, 4])
        torch.save(cont, os.path.join(root, f"cont2-rank{rank}.pt"))
    else:  # load a checkpoint (saved at world size 1 or 2) and continue
        assert checkpoint.load(os.path.join(root, mode), dmp, opt) == 2
        cont = steps([2, 3, 4])
        torch.save(cont, os.path.join(root, f"{mode}-loaded2-rank{rank}.pt"))


def test_save_at_two_load_at_one_and_two_and_back(tmp_path):
    root = str(tmp_path)
    run_ranks(_two_rank_worker, 2, args=(root, "save"), timeout=300)
    ranks = [torch.load(os.path.join(root, f"cont2-rank{r}.pt")) for r in range(2)]
    reference = [torch.cat([ranks[0][i], ranks[1][i]]) for i in range(3)]

    # 2 -> 1: the unsharded model continues exactly as the 2-rank run did.
    model, opt = unsharded(seed=11)
    assert checkpoint.load(os.path.join(root, "from2"), model, opt) == 2
    for a, b in zip(train_union(model, opt, [2, 3, 4]), reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # 2 -> 2.
    run_ranks(_two_rank_worker, 2, args=(root, "from2"), timeout=300)
    for r in range(2):
        for a, b in zip(torch.load(os.path.join(root, f"from2-loaded2-rank{r}.pt")), ranks[r]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # 1 -> 2: save unsharded, load at two ranks; compare with the unsharded continuation.
    model, opt = unsharded()
    train_union(model, opt, [0, 1])
    checkpoint.save(os.path.join(root, "from1"), model, opt, step=2)
    expected = train_union(model, opt, [2, 3, 4])
    run_ranks(_two_rank_worker, 2, args=(root, "from1"), timeout=300)
    got = [torch.load(os.path.join(root, f"from1-loaded2-rank{r}.pt")) for r in range(2)]
    for i in range(3):
        torch.testing.assert_close(torch.cat([got[0][i], got[1][i]]), expected[i], atol=1e-5, rtol=1e-5)


# -- sequence tables -------------------------------------------------------------------


def _ec_save_worker(rank: int, world_size: int, directory: str) -> None:
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from tests.distributed.test_sharded_ec import SeqTower, rank_batch as seq_batch

    torch.manual_seed(0)
    model = SeqTower(with_ebc=True)
    dmp = DistributedModelParallel(
        model, sharders=rt.sharders(FUSED), plan=rt.plan(model, world_size, share_tables=True)
    )
    opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "dense" in n], lr=0.05)
    for step in range(3):
        logits, _ = dmp(seq_batch(step, rank, world_size))
        opt.zero_grad()
        loss_of(logits).backward()
        opt.step()
    refs = checkpoint.files.hash_tables(dmp)
    # The shared table is saved once, under the EBC that owns it.
    assert sorted(r.key for r in refs) == ["ebc/item", "ec/users"]
    checkpoint.save(directory, dmp, opt, step=3)


def test_sequence_and_shared_tables_save_sharded_and_load_unsharded(tmp_path):
    from tests.distributed.test_sharded_ec import FUSED as SEQ_FUSED, SeqTower, union_batch as seq_union

    directory = str(tmp_path / "ckpt")
    run_ranks(_ec_save_worker, world_size=2, args=(directory,), timeout=300)

    # The same three steps unsharded, on the union batches.
    torch.manual_seed(0)
    reference = rt.convert(SeqTower(with_ebc=True), fused_params=SEQ_FUSED, share_tables=True)
    opt = torch.optim.SGD(reference.dense.parameters(), lr=0.05)
    for step in range(3):
        logits, _ = reference(seq_union(step, 2))
        opt.zero_grad()
        (sum(loss_of(part) for part in logits.split(BATCH)) / 2).backward()
        opt.step()

    torch.manual_seed(1)
    fresh = rt.convert(SeqTower(with_ebc=True), fused_params=SEQ_FUSED, share_tables=True, import_weights=False)
    fresh_opt = torch.optim.SGD(fresh.dense.parameters(), lr=0.05)
    checkpoint.load(directory, fresh, fresh_opt)
    assert_same_rows(table_rows(fresh), table_rows(reference))
    assert fresh.ec._groups[0].tables[0] is fresh.ebc.tables()["item"]
    kjt = seq_union(5, 2)
    fresh.eval()
    reference.eval()
    torch.testing.assert_close(fresh(kjt)[0], reference(kjt)[0], atol=1e-5, rtol=1e-5)
