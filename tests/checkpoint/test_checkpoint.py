# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints: exact resume, resharding between world sizes, crash safety, errors, deltas."""

import json
import os
import random
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
from recis_torchrec.optim.registry import OPTIMIZERS as REGISTERED
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
    expect("index.json: checksum mismatch")  # an edited index
    index["xxh64"] = checkpoint.files.index_checksum(index)  # a consistent one of another model
    json.dump(index, open(os.path.join(ckpt, "index.json"), "w"))
    expect("table 'ebc/t1': the checkpoint has dim 16 but the model's table has dim 8")


def test_checkpoints_that_do_not_fit_the_model_are_refused_before_it_changes(tmp_path):
    # Indexes edited consistently (their checksum recomputed, as a buggy writer or a hand edit leaves
    # them): every mismatch with the model is found before a table is cleared or a tensor copied.
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from tests.distributed.test_sharded_ebc import table_configs

    model, opt = unsharded()
    train_union(model, opt, [0])
    root = str(tmp_path / "ckpt")
    ckpt = checkpoint.save(root, model, opt, step=1)
    index_path = os.path.join(ckpt, "index.json")
    original = json.load(open(index_path))

    target, target_opt = unsharded(seed=5)
    train_union(target, target_opt, [3])
    before = table_rows(target)
    dense_before = target.dense.weight.detach().clone()

    def expect(index, match, model=target, optimizer=target_opt):
        if index is not None:
            json.dump(index, open(index_path, "w"))
        with pytest.raises(CheckpointError, match=match):
            checkpoint.load(root, model, optimizer)
        assert_same_rows(table_rows(target), before)
        assert torch.equal(target.dense.weight, dense_before)

    def edited(fn):
        index = json.loads(json.dumps(original))
        fn(index)
        index["xxh64"] = checkpoint.files.index_checksum(index)
        return index

    # Rows of another dim under a table's entry (t2's dim-4 file listed for the dim-8 t1).
    expect(edited(lambda ix: ix["tables"]["ebc/t1"].update(files=ix["tables"]["ebc/t2"]["files"])),
           r"table 'ebc/t1': 'weights' has shape \(\d+, 4\), the model's table needs \(\d+, 8\)")
    # No checksum at all.
    no_sum = json.loads(json.dumps(original))
    del no_sum["xxh64"]
    expect(no_sum, "index.json: has no checksum")
    json.dump(original, open(index_path, "w"))

    # Extra dense tensors: the checkpoint of another model.
    bigger, bigger_opt = unsharded(seed=5)
    bigger.extra = torch.nn.Linear(2, 2)
    expect(None, r"holds dense tensors the model does not have|lacks dense tensors \['extra", bigger, bigger_opt)

    # The dense optimizer's state under another optimizer (SGD's state, an Adam to load it into).
    sgd_root = str(tmp_path / "sgd")
    sgd_model, _ = unsharded()
    checkpoint.save(sgd_root, sgd_model, torch.optim.SGD(sgd_model.dense.parameters(), lr=0.1, momentum=0.9), step=1)
    with pytest.raises(CheckpointError, match="saved by another optimizer than Adam"):
        checkpoint.load(sgd_root, target, target_opt)
    assert_same_rows(table_rows(target), before)

    # Sparse state of one optimizer under another's code: SGD rows (no state slots) said to be Adam's.
    plain = make_model(0)
    plain.ebc = rt.convert(plain.ebc, fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1})
    sgd_ckpt = checkpoint.save(str(tmp_path / "sparse_sgd"), plain, step=1)
    ix = json.load(open(os.path.join(sgd_ckpt, "index.json")))
    for entry in ix["tables"].values():
        entry["optimizer"], entry["state_dim"] = original["tables"][f"ebc/{entry['table']}"]["optimizer"], 0
    ix["xxh64"] = checkpoint.files.index_checksum(ix)
    json.dump(ix, open(os.path.join(sgd_ckpt, "index.json"), "w"))
    with pytest.raises(CheckpointError, match="lacks 'momentum1'"):
        checkpoint.load(sgd_ckpt, target)
    assert_same_rows(table_rows(target), before)

    # The same tables with their features in another order: the dense layer would read them permuted.
    permuted = make_model(5)
    permuted.ebc = rt.convert(EmbeddingBagCollection(list(reversed(table_configs()))), fused_params=FUSED)
    with pytest.raises(CheckpointError, match=r"ebc's features are in another order than when the checkpoint was "
                                              r"saved \(saved \['t0:f0', 't0:f1', 't1:f2', 't2:f3'\]"):
        checkpoint.load(root, permuted)


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
    checkpoint.save({out!r} + "/ckpt", model, opt, step=step, keep_last=1, blocking={blocking})
"""


# Twenty moments inside a save: ten blocking, ten in the background, at seeded random delays after
# the save's temporary directory appears.
_KILL_MOMENTS = [(blocking, round(random.Random(i).uniform(0.0, 0.4), 3)) for blocking in (True, False)
                 for i in range(10)]


@pytest.mark.parametrize("blocking,delay", _KILL_MOMENTS)
def test_sigkill_during_save_leaves_the_previous_checkpoint_intact(tmp_path, blocking, delay):
    """A kill inside a save, blocking or in the background (the child keeps training while its
    writer runs): the newest complete checkpoint loads, verified, with the rows it was saved with."""
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    code = _CRASH_CHILD.format(root=root, out=str(tmp_path), blocking=blocking)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "saved 1", line
        ckpt = tmp_path / "ckpt"
        deadline = time.monotonic() + 60
        while not any(".tmp-" in n for n in os.listdir(ckpt)):  # the next save has begun writing
            assert time.monotonic() < deadline, "the child never started its next save"
            time.sleep(0.002)
        time.sleep(delay)
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
    assert len(leftovers) <= 1  # the save that was killed (if it had not finished), left unfinished and ignored


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
        torch.save(cont, os.path.join(root, f"{mode}-loaded{world_size if world_size != 2 else 2}-rank{rank}.pt"))


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


def test_save_at_two_load_at_three(tmp_path):
    """N -> M with both above 1: every id moves to its owner among three ranks, and the 3-rank run
    continues as the unsharded model on the 3-rank union batch does."""
    root = str(tmp_path)
    run_ranks(_two_rank_worker, 2, args=(root, "save"), timeout=300)
    model, opt = unsharded(seed=11)
    assert checkpoint.load(os.path.join(root, "from2"), model, opt) == 2
    expected = train_union(model, opt, [2, 3, 4], world_size=3)
    run_ranks(_two_rank_worker, 3, args=(root, "from2"), timeout=300)
    got = [torch.load(os.path.join(root, f"from2-loaded3-rank{r}.pt")) for r in range(3)]
    for i in range(3):
        torch.testing.assert_close(torch.cat([g[i] for g in got]), expected[i], atol=1e-5, rtol=1e-5)


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


def test_every_file_reads_with_the_safetensors_library(tmp_path):
    """The files are plain safetensors: safetensors.safe_open reads each, and its tensors are the
    model's rows and dense state."""
    import glob

    from safetensors import safe_open

    model, opt = unsharded()
    train_union(model, opt, range(2))
    path = checkpoint.save(str(tmp_path), model, opt, step=2)
    files = sorted(glob.glob(os.path.join(path, "**", "*.safetensors"), recursive=True))
    assert len(files) >= 3
    seen = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                seen[(os.path.relpath(f, path), k)] = st.get_tensor(k)
    dense = {k: v for (f, k), v in seen.items() if f == "dense.safetensors"}
    for name, p in model.dense.named_parameters():
        assert any(torch.equal(v, p.detach()) for k, v in dense.items() if k.endswith(name)), name
    rows = table_rows(model)
    for key, (ids, w, _) in rows.items():
        folder = os.path.join("tables", key.replace("/", "__")) + os.sep
        got_ids = torch.cat([v for (f, k), v in seen.items() if k == "ids" and f.startswith(folder)])
        assert sorted(got_ids.tolist()) == sorted(ids.tolist()), key


def test_index_entries_cannot_leave_the_checkpoint_and_headers_are_checksummed(tmp_path):
    model, opt = unsharded()
    train_union(model, opt, range(1))
    path = checkpoint.save(str(tmp_path), model, opt, step=1)
    index_path = os.path.join(path, "index.json")
    index = json.load(open(index_path))
    # A header edit that keeps the file's size (a shape's digit changed) is caught by the checksum.
    dense = os.path.join(path, index["dense"]["file"]) if isinstance(index.get("dense"), dict) else None
    target = dense or sorted(
        os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs if f.endswith(".safetensors"))[0]
    raw = bytearray(open(target, "rb").read())
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].decode()
    digit = next(i for i, ch in enumerate(header) if ch.isdigit() and header[i - 1] in "[,")
    header = header[:digit] + ("1" if header[digit] != "1" else "2") + header[digit + 1:]
    raw[8:8 + n] = header.encode()
    open(target, "wb").write(bytes(raw))
    fresh, fresh_opt = unsharded(seed=1)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(str(tmp_path), fresh, fresh_opt)
    # An entry naming a file outside the directory (an absolute or a .. path) is refused, not read.
    for bad in ("/etc/hostname", "../outside.safetensors"):
        mangled = json.loads(json.dumps(index))
        mangled["tables"][next(iter(mangled["tables"]))]["files"][0]["file"] = bad
        mangled["xxh64"] = checkpoint.files.index_checksum(mangled)  # past the index's own checksum
        json.dump(mangled, open(index_path, "w"))
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            checkpoint.load(str(tmp_path), fresh, fresh_opt)


def test_index_and_loader_edits_are_caught_and_bad_arguments_refused(tmp_path):
    model, opt = unsharded()
    train_union(model, opt, range(1))

    class Loader:
        def __init__(self):
            self.pos = 3

        def state_dict(self):
            return {"pos": self.pos}

        def load_state_dict(self, s):
            self.pos = s["pos"]

    path = checkpoint.save(str(tmp_path / "a"), model, opt, Loader(), step=1)
    fresh, fresh_opt = unsharded(seed=1)
    index_path = os.path.join(path, "index.json")
    original = open(index_path).read()
    index = json.loads(original)
    index["step"] = 999  # an edited step
    json.dump(index, open(index_path, "w"))
    with pytest.raises(CheckpointError, match="index.json: checksum mismatch"):
        checkpoint.load(path, fresh, fresh_opt)
    open(index_path, "w").write(original)
    loader_path = os.path.join(path, "loader-rank0.json")
    json.dump({"pos": 0}, open(loader_path, "w"))  # an edited loader position
    with pytest.raises(CheckpointError, match="loader-rank0.json: checksum mismatch"):
        checkpoint.load(path, fresh, fresh_opt, Loader())
    for keep in (0, -1):
        with pytest.raises(CheckpointError, match="keep_last must be a positive int"):
            checkpoint.save(str(tmp_path / "b"), model, opt, step=2, keep_last=keep)
    with pytest.raises(CheckpointError, match="step must be an int >= 0"):
        checkpoint.save(str(tmp_path / "b"), model, opt, step=-1)
    big = checkpoint.save(str(tmp_path / "c"), model, opt, step=12_345_678_901)
    checkpoint.save(str(tmp_path / "c"), model, opt, step=99)
    assert checkpoint.resolve(str(tmp_path / "c")) == big  # 11 digits sort after 2
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not an empty directory"):
        checkpoint.export_delta(str(tmp_path / "d"), model, since_step=0)
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"


def test_a_background_save_holds_the_state_it_started_with(tmp_path):
    """save(blocking=False) returns at once; training goes on while it writes; what loads is the
    state at the call, and the next save (or wait) joins it."""
    model, opt = unsharded()
    train_union(model, opt, range(2))
    at_save = table_rows(model)
    dense_at_save = model.dense.weight.detach().clone()
    path = checkpoint.save(str(tmp_path), model, opt, step=2, blocking=False)
    train_union(model, opt, range(2, 5))  # the tables change under the writer
    assert checkpoint.wait() == path
    assert checkpoint.wait() is None  # nothing left to join
    fresh, fresh_opt = unsharded(seed=3)
    assert checkpoint.load(str(tmp_path), fresh, fresh_opt) == 2
    assert_same_rows(table_rows(fresh), at_save)
    assert torch.equal(fresh.dense.weight, dense_at_save)
    # A save joins the one before it; both complete.
    checkpoint.save(str(tmp_path), model, opt, step=5, blocking=False)
    last = checkpoint.save(str(tmp_path), model, opt, step=6, blocking=False)
    checkpoint.wait()
    assert [s for s, _ in checkpoint.checkpoints(str(tmp_path))] == [2, 5, 6]
    assert checkpoint.resolve(str(tmp_path)) == last


@pytest.mark.parametrize("reuse", [True, False])
def test_background_saves_into_kept_buffers_hold_each_state_exactly(tmp_path, reuse):
    """Background saves snapshot into host buffers kept from the save before: a table that grew
    past them, one that shrank below what they hold, and one with rows replaced are each saved as
    they were at their call, nothing left over from the previous snapshot."""
    model, opt = unsharded()
    table = next(iter(model.ebc.tables().values()))
    checkpoint.release_buffers()
    states = []
    for step, change in enumerate(["none", "grow", "shrink", "replace"]):
        if change == "grow":
            table.find_or_insert(torch.arange(10_000, 13_000))
        elif change == "shrink":
            ids = table.export_rows()[0]
            table.erase(ids[: ids.numel() - 50])
        elif change == "replace":
            table.find_or_insert(torch.arange(50_000, 50_400))
        train_union(model, opt, range(step, step + 1))
        states.append(table_rows(model))
        checkpoint.save(str(tmp_path / str(step)), model, opt, step=step, blocking=False, reuse_buffers=reuse)
        train_union(model, opt, range(7, 8))  # changes under the writer
    checkpoint.wait()
    assert bool(checkpoint.saver._snapshot_buffers) == reuse
    assert table.info()["snapshot_copies"] == 0  # the snapshots ended with their reads
    for step, want in enumerate(states):
        fresh, fresh_opt = unsharded(seed=3)
        assert checkpoint.load(str(tmp_path / str(step)), fresh, fresh_opt) == step
        got = table_rows(fresh)
        for key in want:
            assert torch.equal(got[key][0], want[key][0]), (step, key)
        assert_same_rows(got, want)
    checkpoint.release_buffers()
    assert not checkpoint.saver._snapshot_buffers


def _async_worker(rank, world_size, root):
    from torchrec.distributed.model_parallel import DistributedModelParallel

    model = make_model()
    dmp = DistributedModelParallel(model, sharders=rt.sharders(FUSED), plan=rt.plan(model, world_size))
    logits, _ = dmp(rank_batch(0, rank, world_size))
    loss_of(logits).backward()
    checkpoint.save(root, dmp, step=1, blocking=False)
    logits, _ = dmp(rank_batch(1, rank, world_size))  # training goes on, collectives and all
    loss_of(logits).backward()
    checkpoint.wait()


def test_a_background_save_at_two_ranks_loads_at_one(tmp_path):
    root = str(tmp_path / "ckpt")
    run_ranks(_async_worker, world_size=2, args=(root,), timeout=300)
    model, opt = unsharded()
    assert checkpoint.load(root, model) == 1
    assert sum(len(r[0]) for r in table_rows(model).values()) > 0


def test_each_tables_hyperparameters_resume_from_its_own_param_group(tmp_path):
    # Tables with different optimizers have different param groups. A checkpoint recorded the first
    # group's hyperparameters for every table, and a load wrote every table's into the first group:
    # a learning rate changed (by a scheduler) on the second table's group came back as it was built.
    import warnings

    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from recis_torchrec.testing import random_kjt

    def build():
        torch.manual_seed(0)
        ebc = EmbeddingBagCollection([
            EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=20, feature_names=["f0"]),
            EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=20, feature_names=["f1"]),
        ])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            apply_optimizer_in_backward(torch.optim.Adagrad, [ebc.embedding_bags["t0"].weight], {"lr": 0.1})
            apply_optimizer_in_backward(torch.optim.Adam, [ebc.embedding_bags["t1"].weight], {"lr": 0.01, "eps": 1e-6})
        return rt.convert(ebc)

    model = build()
    model(random_kjt(["f0", "f1"], 4, 3, num_ids=20, seed=0)).values().sum().backward()
    opt = model.fused_optimizer
    assert len(opt.param_groups) == 2
    opt.param_group_of("t1")["lr"] = 0.005  # a scheduler's step on the second table's group
    opt.param_group_of("t0")["lr"] = 0.05
    checkpoint.save(str(tmp_path / "ckpt"), model, step=1)
    fresh = build()
    checkpoint.load(str(tmp_path / "ckpt"), fresh)
    for name, lr, eps in (("t0", 0.05, 1e-8), ("t1", 0.005, 1e-6)):
        group = fresh.fused_optimizer.param_group_of(name)
        assert (group["lr"], group["eps"]) == (lr, eps), (name, group)


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_every_optimizers_state_round_trips_under_its_slot_names(tmp_path, name):
    """Each registered optimizer's state is saved as its slots (a row-wise slot after per-element ones
    in the partial row-wise optimizers), loads into a fresh model, and training goes on identically."""
    from safetensors import safe_open

    definition = REGISTERED[name]
    fused = {"optimizer": definition.emb_optim_types[0], "learning_rate": 0.05}

    def model_of(seed):
        model = make_model(seed)
        model.ebc = rt.convert(model.ebc, fused_params=fused)
        return model, torch.optim.SGD(model.dense.parameters(), lr=0.01)

    model, opt = model_of(0)
    train_union(model, opt, [0, 1])
    checkpoint.save(str(tmp_path / "ckpt"), model, opt, step=2)
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "ckpt") for f in fs if f.endswith(".safetensors")]
    shapes = {}
    for path in files:
        with safe_open(path, "pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    for slot in definition.slots:
        found = [s for k, s in shapes.items() if k.endswith(f"/{slot.name}") or k.endswith(f".{slot.name}")
                 or k == slot.name]
        assert found, (slot.name, sorted(shapes))
        assert all(len(s) == (2 if slot.per_element else 1) for s in found), (slot.name, found)
    fresh, fresh_opt = model_of(99)
    checkpoint.load(str(tmp_path / "ckpt"), fresh, fresh_opt)
    assert_same_rows(table_rows(fresh), table_rows(model))
    a, b = train_union(model, opt, [2]), train_union(fresh, fresh_opt, [2])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert_same_rows(table_rows(fresh), table_rows(model))
