# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Inference packages: export -> load in a fresh process -> the eval model's predictions (FP32
exact, quantized within a stated error), bad packages and requests named, deltas applied while
requests are served."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM

import recis_torchrec as rt
from recis_torchrec import checkpoint, inference
from recis_torchrec.inference import InferenceError
from tests.models.test_sequence_models import batch as seq_batch
from tests.models.test_sequence_models import make as make_seq

FUSED = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05}
KEYS = ["f0", "f1", "f2"]
# Largest |prediction - eval model| each quantization may show on these models (measured: fp16
# 1.5e-6-1.0e-5, bf16 9e-6-7.2e-5, int8 1.1e-5-5.5e-5 over DLRM, DeepFM and DIN; printed by the test).
TOLERANCE = {"fp32": 0.0, "fp16": 1e-4, "bf16": 1e-3, "int8": 1e-3}


def bag_batch(step, size=16, weighted=False, max_id=300):
    g = torch.Generator().manual_seed(500 + step)
    lengths = torch.randint(0, 4, (len(KEYS) * size,), generator=g)
    values = torch.randint(0, max_id, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    kjt = KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths, weights=weights)
    return torch.rand(size, 4, generator=g), kjt, torch.randint(0, 2, (size,), generator=g).float()


def configs(pooling=None):
    from torchrec.modules.embedding_configs import PoolingType

    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=300, feature_names=[k],
                               pooling=PoolingType.MEAN if (pooling and i == 1) else PoolingType.SUM)
            for i, k in enumerate(KEYS)]


def make_model(name, seed=0):
    torch.manual_seed(seed)
    if name == "dlrm":
        cfg = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=300, feature_names=[k])
               for i, k in enumerate(KEYS)]
        model = DLRM(EmbeddingBagCollection(cfg), 4, [16, 8], [16, 1])
    elif name == "deepfm":
        model = SimpleDeepFMNN(4, EmbeddingBagCollection(configs(pooling="mean")), hidden_layer_size=16,
                               deep_fm_dimension=4)
    else:
        return rt.convert(make_seq("DIN", seed), fused_params=FUSED), "seq"
    return rt.convert(model, fused_params=FUSED), "bag"


def trained(name, steps=6):
    model, kind = make_model(name)
    dense_opt = torch.optim.Adam([p for p in model.parameters()], lr=0.01)
    for s in range(steps):
        dense, kjt, labels = seq_batch(s) if kind == "seq" else bag_batch(s)
        out = model(dense, kjt).reshape(-1)
        loss = (torch.nn.functional.binary_cross_entropy(out, labels) if name == "deepfm"
                else torch.nn.functional.binary_cross_entropy_with_logits(out, labels))
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()
    model.eval()
    return model, kind


def requests(kind, n=3):
    # Ids beyond the trained ones too: unseen ids read their initial rows, as in the eval model.
    return [seq_batch(100 + i, size=5 + 3 * i)[:2] if kind == "seq" else bag_batch(100 + i, size=5 + 3 * i,
                                                                                   max_id=400)[:2]
            for i in range(n)]


PREDICT = """
import sys, torch
from recis_torchrec import inference
predictor = inference.load(sys.argv[1])
reqs = torch.load(sys.argv[2], weights_only=False)
torch.save([predictor(*r) for r in reqs], sys.argv[3])
"""


def rewrite_manifest(package, change):
    """Edits a package's manifest consistently (its checksum recomputed), as a buggy writer would."""
    from recis_torchrec.inference.package import write_manifest

    with open(os.path.join(package, "manifest.json")) as f:
        manifest = json.load(f)
    change(manifest)
    write_manifest(package, manifest)


def predict_in_subprocess(package, reqs, tmp_path):
    req_file, out_file = str(tmp_path / "reqs.pt"), str(tmp_path / "out.pt")
    torch.save(reqs, req_file)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    subprocess.run([sys.executable, "-c", PREDICT, package, req_file, out_file], check=True, env=env, timeout=300)
    return torch.load(out_file, weights_only=False)


@pytest.mark.parametrize("name", ["dlrm", "deepfm", "din"])
def test_a_fresh_process_predicts_what_the_eval_model_does(name, tmp_path):
    model, kind = trained(name)
    example = requests(kind, 1)[0]
    reqs = requests(kind)
    with torch.no_grad():
        want = [model(*r) for r in reqs]
    errors = {}
    for q in ["fp32", "fp16", "bf16", "int8"]:
        package = inference.export(model, str(tmp_path / q), example, quantize=q)
        got = predict_in_subprocess(package, reqs, tmp_path)
        errors[q] = max(float((g - w).abs().max()) for g, w in zip(got, want))
        if q == "fp32":
            for g, w in zip(got, want):
                assert torch.equal(g, w), (name, q)
        assert errors[q] <= TOLERANCE[q], (name, errors)
    print(name, "largest prediction error per quantization:", errors)
    assert errors["int8"] > 0  # the quantization took effect


def test_the_package_holds_no_optimizer_state_and_is_read_only(tmp_path):
    model, _ = trained("dlrm")
    example = requests("bag", 1)[0]
    package = inference.export(model, str(tmp_path / "p"), example, quantize="int8")
    manifest = inference.read_manifest(package)
    assert manifest["quantization"] == "int8" and manifest["unseen"] == "init"
    assert sorted(manifest["features"]) == KEYS
    from safetensors import safe_open

    table = model.sparse_arch.embedding_bag_collection.tables()["t0"]
    for key, entry in manifest["tables"].items():
        for e in entry["files"]:
            with safe_open(os.path.join(package, e["file"]), framework="pt") as f:
                assert sorted(f.keys()) == ["ids", "rows"]
                assert f.get_tensor("rows").dtype == torch.uint8 and f.get_tensor("rows").shape[1] == 8 + 8
    predictor = inference.load(package)
    before = {k: len(t) for k, t in predictor.tables.items()}
    predictor(*bag_batch(7, max_id=10_000)[:2])  # mostly unseen ids
    assert {k: len(t) for k, t in predictor.tables.items()} == before
    assert len(table) == before["sparse_arch.embedding_bag_collection/t0"]


def test_unseen_ids_read_zeros_when_the_package_says_so(tmp_path):
    model, _ = trained("dlrm")
    dense, kjt = requests("bag", 1)[0]
    package = inference.export(model, str(tmp_path / "p"), (dense, kjt), unseen="zero")
    table = inference.load(package).tables["sparse_arch.embedding_bag_collection/t0"]
    fresh = torch.tensor([10**12, 10**12 + 1, int(table.ids[0])])
    rows = table.rows_of(fresh)
    assert torch.equal(rows[:2], torch.zeros(2, 8))
    live = model.sparse_arch.embedding_bag_collection.tables()["t0"]
    assert torch.equal(rows[2], live.export_rows()[1][live.export_rows()[0] == fresh[2]][0])


def test_weighted_features_and_shared_tables(tmp_path):
    torch.manual_seed(0)
    cfg = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=300, feature_names=["f0", "f1"]),
           EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=300, feature_names=["f2"])]
    model = DLRM(EmbeddingBagCollection(cfg, is_weighted=True), 4, [16, 8], [16, 1])
    rt.convert(model, fused_params=FUSED)
    for s in range(3):
        dense, kjt, _ = bag_batch(s, weighted=True)
        model(dense, kjt).sum().backward()
    model.eval()
    example = bag_batch(50, weighted=True)[:2]
    predictor = inference.load(inference.export(model, str(tmp_path / "p"), example))
    for s in range(3):
        dense, kjt, _ = bag_batch(60 + s, size=7, weighted=True)
        assert torch.equal(predictor(dense, kjt), model(dense, kjt))
    with pytest.raises(InferenceError, match="'f0' needs per-id weights"):
        predictor(*bag_batch(1)[:2])


# -- bad packages and requests ------------------------------------------------------------


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    model, _ = trained("dlrm")
    return inference.export(model, str(tmp_path_factory.mktemp("pkg") / "p"), requests("bag", 1)[0])


def copy_of(package_dir, tmp_path):
    import shutil

    dst = str(tmp_path / "copy")
    shutil.copytree(package_dir, dst)
    return dst, json.load(open(os.path.join(dst, "manifest.json")))


def test_a_corrupt_table_shard_is_named(package_dir, tmp_path):
    dst, manifest = copy_of(package_dir, tmp_path)
    entry = manifest["tables"]["sparse_arch.embedding_bag_collection/t1"]["files"][0]
    path = os.path.join(dst, entry["file"])
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(InferenceError, match=r"'sparse_arch.embedding_bag_collection/t1'.*part0.safetensors.*checksum"):
        inference.load(dst)


def test_a_missing_table_file_is_named(package_dir, tmp_path):
    dst, manifest = copy_of(package_dir, tmp_path)
    os.remove(os.path.join(dst, manifest["tables"]["sparse_arch.embedding_bag_collection/t2"]["files"][0]["file"]))
    with pytest.raises(InferenceError, match=r"t2.*missing"):
        inference.load(dst)


def test_an_edited_manifest_and_a_corrupt_program_are_refused(package_dir, tmp_path):
    dst, manifest = copy_of(package_dir, tmp_path)
    manifest["unseen"] = "zero"
    json.dump(manifest, open(os.path.join(dst, "manifest.json"), "w"))
    with pytest.raises(InferenceError, match="manifest.json: checksum mismatch"):
        inference.load(dst)
    dst2, _ = copy_of(package_dir, tmp_path / "b")
    with open(os.path.join(dst2, "dense.pt2"), "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 16)
    with pytest.raises(InferenceError, match="dense.pt2: checksum mismatch"):
        inference.load(dst2)
    with pytest.raises(InferenceError, match="not an inference package"):
        inference.load(str(tmp_path))


def test_the_manifest_checksum_covers_its_bytes_and_older_packages_still_load(package_dir, tmp_path):
    from recis_torchrec.checkpoint.files import index_checksum

    # One byte of the file changed, the document unchanged (a space): refused, as the checksum is of the bytes.
    dst, _ = copy_of(package_dir, tmp_path)
    path = os.path.join(dst, "manifest.json")
    with open(path, "ab") as f:
        f.write(b" ")
    with pytest.raises(InferenceError, match="manifest.json: checksum mismatch"):
        inference.load(dst)
    # A package written before the sidecar: its checksum is of the canonical JSON, in the manifest.
    old, manifest = copy_of(package_dir, tmp_path / "old")
    os.remove(os.path.join(old, "manifest.xxh64"))
    with pytest.raises(InferenceError, match="manifest.json: checksum mismatch"):
        inference.load(old)  # no sidecar and no embedded checksum
    manifest["xxh64"] = index_checksum(manifest)
    json.dump(manifest, open(os.path.join(old, "manifest.json"), "w"))
    dense, kjt = requests("bag", 1)[0]
    assert torch.equal(inference.load(old)(dense, kjt), inference.load(package_dir)(dense, kjt))
    manifest["unseen"] = "zero"
    json.dump(manifest, open(os.path.join(old, "manifest.json"), "w"))
    with pytest.raises(InferenceError, match="manifest.json: checksum mismatch"):
        inference.load(old)


def test_requests_missing_a_feature_or_with_two_kjts_are_named(package_dir):
    predictor = inference.load(package_dir)
    dense, kjt = requests("bag", 1)[0]
    partial = KeyedJaggedTensor(keys=["f0", "f2"], values=torch.tensor([1, 2]),
                                lengths=torch.tensor([1, 0, 0, 0, 0, 1, 0, 0, 0, 0]))
    with pytest.raises(InferenceError, match=r"lacks features \['f1'\]"):
        predictor(dense[:5], partial)
    with pytest.raises(InferenceError, match="exactly one KeyedJaggedTensor"):
        predictor(kjt, kjt)


def test_export_refuses_bad_arguments(tmp_path):
    model, _ = trained("dlrm", steps=1)
    example = requests("bag", 1)[0]
    with pytest.raises(InferenceError, match="quantize must be one of"):
        inference.export(model, str(tmp_path / "a"), example, quantize="int4")
    with pytest.raises(InferenceError, match="unseen must be one of"):
        inference.export(model, str(tmp_path / "a"), example, unseen="random")
    for bad in (0, -5, 1.5, "256", True):
        with pytest.raises(InferenceError, match="max_file_bytes must be a positive int"):
            inference.export(model, str(tmp_path / "a"), example, max_file_bytes=bad)
    for bad in ("yes", 1, None):
        with pytest.raises(InferenceError, match="aot_inductor must be True or False"):
            inference.export(model, str(tmp_path / "a"), example, aot_inductor=bad)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(InferenceError, match="exists and is not empty"):
        inference.export(model, str(tmp_path / "full"), example)
    with pytest.raises(InferenceError, match="holds no HashEmbeddingBagCollection"):
        inference.export(torch.nn.Linear(2, 2), str(tmp_path / "b"), example)


# -- online updates -----------------------------------------------------------------------------


def test_deltas_applied_while_threads_predict_are_seen_whole(tmp_path):
    """Four threads predict one request over and over while 20 deltas are applied: every answer
    equals the model's eval output at one of the 21 versions (no mix of two), and the last
    answers equal the last version's."""
    model, _ = trained("dlrm")
    dense, kjt = bag_batch(900, size=12)[:2]
    example = bag_batch(901)[:2]
    ckpt = checkpoint.save(str(tmp_path / "ckpt"), model, step=0)
    predictor = inference.load(inference.export(model, str(tmp_path / "p"), example))
    versions = [model(dense, kjt).detach()]
    deltas = []
    for s in range(20):
        model.train()
        d, k, labels = bag_batch(s + 10)
        torch.nn.functional.binary_cross_entropy_with_logits(model(d, k).reshape(-1), labels).backward()
        model.eval()
        versions.append(model(dense, kjt).detach())
        deltas.append(checkpoint.export_delta(str(tmp_path / f"delta{s}"), model, since_step=ckpt))
    # The dense layers do not change: only the tables do (the package's dense program is fixed).
    seen, stop, failures = [], threading.Event(), []

    def hammer():
        while not stop.is_set():
            out = predictor(dense, kjt)
            match = [i for i, v in enumerate(versions) if torch.equal(out, v)]
            if not match:
                failures.append(out)
            seen.append(match[0] if match else -1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for path in deltas:
        predictor.apply_delta(path)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, f"{len(failures)} answers matched no version"
    assert torch.equal(predictor(dense, kjt), versions[-1])
    assert predictor.deltas_applied == 20 and len(set(seen)) >= 2


def test_torchrec_quantize_embeddings_on_our_modules_raises_and_names_the_way(tmp_path):
    """TorchRec's quantize_embeddings would return our modules unquantized without a word; it
    raises instead, naming inference.export. torch.ao's dynamic quantization of the dense layers
    alone still works on a model holding them."""
    from torchrec.inference.modules import quantize_embeddings

    model, _ = trained("dlrm", steps=1)
    with pytest.raises(NotImplementedError, match="quantize_embeddings cannot quantize HashEmbeddingBagCollection"
                                                  ".*inference.export"):
        quantize_embeddings(model, dtype=torch.qint8, inplace=True)
    # Called directly, TorchRec's quantized collections' from_float asserted a qconfig, bare.
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEC

    ebc = trained("dlrm", steps=1)[0].sparse_arch.embedding_bag_collection
    with pytest.raises(NotImplementedError, match="from_float cannot quantize HashEmbeddingBagCollection"):
        QuantEBC.from_float(ebc)
    import recis_torchrec as rt
    from torchrec.modules.embedding_configs import EmbeddingConfig

    ec = rt.HashEmbeddingCollection(tables=[EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=10,
                                                            feature_names=["f"])])
    with pytest.raises(NotImplementedError, match="from_float cannot quantize HashEmbeddingCollection"):
        QuantEC.from_float(ec)
    assert not hasattr(ebc, "qconfig") and not hasattr(ebc, "no_such_attribute")  # elsewhere: AttributeError as before
    model, _ = trained("dlrm", steps=1)
    dense, kjt = requests("bag", 1)[0]
    want = model(dense, kjt)
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert type(q.sparse_arch.embedding_bag_collection).__name__ == "HashEmbeddingBagCollection"
    torch.testing.assert_close(q(dense, kjt), want, atol=0.05, rtol=0.05)


def test_export_refuses_a_package_that_would_predict_otherwise(tmp_path, monkeypatch):
    # A writer that puts a table's rows under the wrong ids (here: rolled by one) makes a package that
    # loads and serves other predictions; export reads the package back, runs the example batch
    # through it and the eval model, and writes nothing.
    from recis_torchrec.inference import package as pkg

    model, kind = trained("dlrm")
    example = requests(kind, 1)[0]
    real = pkg._write_table

    def rolled(directory, key, table, quantize, max_file_bytes, allow_nonfinite=False, version=0):
        ids, weights = table.export_rows()[:2]
        table.import_(ids.roll(1), weights)  # the bug: every id gets its neighbour's row
        try:
            return real(directory, key, table, quantize, max_file_bytes, allow_nonfinite, version)
        finally:
            table.import_(ids, weights)

    monkeypatch.setattr(pkg, "_write_table", rolled)
    with pytest.raises(InferenceError, match=r"output 0 of the exported program differs from the model's eval output "
                                             r"on the example batch by [0-9.e-]+ \(the bound for fp32 rows is 1e-05\); "
                                             r"no package written"):
        inference.export(model, str(tmp_path / "p"), example)
    assert not os.path.exists(tmp_path / "p") and os.listdir(tmp_path) == []
    monkeypatch.setattr(pkg, "_write_table", real)
    inference.export(model, str(tmp_path / "p"), example)  # the same export, written right, passes its check


def test_non_finite_rows_are_refused_at_export_and_in_deltas(tmp_path):
    model, kind = trained("dlrm")
    example = requests(kind, 1)[0]
    ckpt = checkpoint.save(str(tmp_path / "ckpt"), model, step=0)
    predictor = inference.load(inference.export(model, str(tmp_path / "p"), example))
    dense, kjt = requests(kind, 1)[0]
    before = predictor(dense, kjt)

    model.train()  # one more step, so that the delta holds rows
    d, k, labels = bag_batch(50)
    torch.nn.functional.binary_cross_entropy_with_logits(model(d, k).reshape(-1), labels).backward()
    model.eval()
    table = model.sparse_arch.embedding_bag_collection.tables()["t1"]
    ids, weights, state, meta = table.export_rows()
    order = torch.argsort(meta[:, 1], descending=True)  # the rows that step updated first
    ids, weights, state, meta = ids[order], weights[order], state[order], meta[order]
    poisoned = weights.clone()
    poisoned[:3, 0] = float("nan")
    poisoned[3, 1] = float("inf")
    table.import_(ids, poisoned, state, meta)
    with pytest.raises(InferenceError, match=rf"table 'sparse_arch.embedding_bag_collection/t1': 4 of {ids.numel()} "
                                             r"rows in the model hold NaN or infinite values .*allow_nonfinite=True"):
        inference.export(model, str(tmp_path / "nan"), example)
    assert not os.path.exists(tmp_path / "nan")
    with pytest.raises(InferenceError, match="allow_nonfinite must be True or False"):
        inference.export(model, str(tmp_path / "nan"), example, allow_nonfinite=1)

    delta = checkpoint.export_delta(str(tmp_path / "delta"), model, since_step=ckpt)
    with pytest.raises(InferenceError, match=r"t1': 4 of \d+ rows in the delta .* hold NaN or infinite values"):
        predictor.apply_delta(delta)
    assert torch.equal(predictor(dense, kjt), before) and predictor.deltas_applied == 0  # unchanged
    with pytest.raises(InferenceError, match="apply_delta: allow_nonfinite must be True or False, got 'yes'"):
        predictor.apply_delta(delta, allow_nonfinite="yes")
    predictor.apply_delta(delta, allow_nonfinite=True)  # asked for: taken
    assert predictor.deltas_applied == 1


def test_int32_requests_are_served_and_a_format_the_files_do_not_hold_is_named(tmp_path):
    model, kind = trained("dlrm")
    example = requests(kind, 1)[0]
    package = inference.export(model, str(tmp_path / "p"), example)
    predictor = inference.load(package)
    dense, kjt = requests(kind, 1)[0]
    narrow = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().int(), lengths=kjt.lengths().int())
    assert torch.equal(predictor(dense, narrow), predictor(dense, kjt))  # as the training modules take them
    with torch.no_grad():
        assert torch.equal(predictor(dense, narrow), model(dense, narrow))
    floats = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().float(), lengths=kjt.lengths())
    with pytest.raises(InferenceError, match=r"ids \(values\) must be int64 or int32 .*got torch.float32"):
        predictor(dense, floats)

    key = sorted(inference.read_manifest(package)["tables"])[0]
    rewrite_manifest(package, lambda m: m["tables"][key].update(quantization="int8"))  # the files hold fp32 rows
    with pytest.raises(InferenceError, match=rf"table {key!r}: the manifest says int8 rows of dim 8 .*its files hold "
                                             r"torch.float32 rows of shape \(\d+, 8\)"):
        inference.load(package)


def test_requests_the_program_would_misread_are_refused_or_put_in_order(tmp_path):
    model, kind = trained("dlrm")
    example = requests(kind, 1)[0]
    package = inference.export(model, str(tmp_path / "p"), example)
    predictor = inference.load(package)
    dense, kjt = requests(kind, 1)[0]
    want = predictor(dense, kjt)
    per = kjt.to_dict()

    def build(keys, extra=None):
        d = dict(per, **(extra or {}))
        return KeyedJaggedTensor.from_jt_dict({k: d[k] for k in keys})

    # Features in another order, and one the model does not read: served as the model reads them.
    other = KeyedJaggedTensor.from_lengths_sync(keys=["zz"], values=torch.tensor([7] * dense.shape[0]),
                                                lengths=torch.ones(dense.shape[0], dtype=torch.long))
    assert torch.equal(predictor(dense, build(["f2", "f0", "f1"])), want)
    assert torch.equal(predictor(dense, build(["f1", "zz", "f2", "f0"], other.to_dict())), want)
    with pytest.raises(InferenceError, match=r"lacks features \['f1'\]"):
        predictor(dense, build(["f0", "f2"]))
    with pytest.raises(InferenceError, match="input 0 has 4 rows but the KeyedJaggedTensor a batch of 5"):
        predictor(dense[:4], kjt)
    with pytest.raises(InferenceError, match=r"input 0: the model takes float32 of shape \(batch, 4\), got float32 "
                                             r"of shape \(5, 3\)"):
        predictor(dense[:, :3], kjt)
    with pytest.raises(InferenceError, match="input 0: the model takes float32 .*got float64"):
        predictor(dense.double(), kjt)
    bad = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths().clone())
    bad.lengths()[3] += 1
    with pytest.raises(InferenceError, match=r"lengths sum to \d+ but it holds \d+ ids"):
        predictor(dense, bad)
    neg = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths().clone())
    neg.lengths()[0], neg.lengths()[1] = -1, neg.lengths()[1] + 1 + neg.lengths()[0]
    with pytest.raises(InferenceError, match=r"feature 'f0': length -1 at batch index 0 is negative"):
        predictor(dense, neg)

    # A table the modules read, removed from the manifest (its checksum recomputed): named at load.
    key = sorted(inference.read_manifest(package)["tables"])[0]
    rewrite_manifest(package, lambda m: m["tables"].pop(key))
    with pytest.raises(InferenceError, match=rf"looks feature 'f0' up in table {key!r}, which the manifest does not "
                                             r"list"):
        inference.load(package)


def test_deltas_of_another_run_or_out_of_order_are_refused(tmp_path):
    model, kind = trained("dlrm")
    example = requests(kind, 1)[0]
    dense, kjt = requests(kind, 1)[0]
    ckpt0 = checkpoint.save(str(tmp_path / "ckpt"), model, step=0)
    predictor = inference.load(inference.export(model, str(tmp_path / "p"), example))
    before = predictor(dense, kjt)

    def train(steps, seed):
        model.train()
        for s in range(steps):
            d, k, labels = bag_batch(seed + s)
            torch.nn.functional.binary_cross_entropy_with_logits(model(d, k).reshape(-1), labels).backward()
        model.eval()

    train(2, 300)
    first = checkpoint.export_delta(str(tmp_path / "d1"), model, since_step=ckpt0)
    ckpt2 = checkpoint.save(str(tmp_path / "ckpt"), model, step=2)
    train(2, 400)
    second = checkpoint.export_delta(str(tmp_path / "d2"), model, since_step=ckpt2)

    # Another training run's delta, with the same table names: refused.
    other, _ = trained("dlrm")
    other_ckpt = checkpoint.save(str(tmp_path / "other"), other, step=0)
    train_other = bag_batch(500)
    other.train()
    torch.nn.functional.binary_cross_entropy_with_logits(other(*train_other[:2]).reshape(-1), train_other[2]).backward()
    stranger = checkpoint.export_delta(str(tmp_path / "d_other"), other, since_step=other_ckpt)
    with pytest.raises(InferenceError, match="is of another training run"):
        predictor.apply_delta(stranger)
    # The second delta before the first: it does not follow the package's version.
    with pytest.raises(InferenceError, match=r"holds the updates after \d+ up to \d+, but the package is at \d+"):
        predictor.apply_delta(second)
    assert torch.equal(predictor(dense, kjt), before) and predictor.deltas_applied == 0
    predictor.apply_delta(first)
    predictor.apply_delta(second)
    with torch.no_grad():
        assert torch.equal(predictor(dense, kjt), model(dense, kjt))
    with pytest.raises(InferenceError, match="does not follow it"):  # an old one again
        predictor.apply_delta(first)


def test_trainer_checkpoints_and_deltas_load_into_the_model_alone_and_its_package(tmp_path):
    # The Trainer saves the model inside its task wrapper, so its checkpoint and delta keys read
    # "model.sparse_arch...": export(model, checkpoint=...) of the model alone refused them, and a
    # package exported from the model alone (as the CLI does) refused the Trainer's deltas.
    from recis_torchrec.checkpoint.files import read_index

    class Task(torch.nn.Module):  # the Trainer's TaskModel in shape: the model under "model"
        def __init__(self, model):
            super().__init__()
            self.model = model

    model, kind = trained("dlrm")
    wrapped = Task(model)
    ckpt = checkpoint.save(str(tmp_path / "ckpt"), wrapped, step=6)
    assert all(k.startswith("model.") for k in read_index(checkpoint.resolve(ckpt))["tables"])
    reqs = requests(kind)
    fresh = make_model("dlrm")[0].eval()  # untrained: everything it predicts comes from the checkpoint
    package = inference.export(fresh, str(tmp_path / "pkg"), reqs[0], checkpoint=ckpt)
    predictor = inference.load(package)
    for r in reqs:
        assert torch.equal(predictor(*r), model(*r))

    # More training of the tables (the dense layers stay: a delta carries rows), then the wrapper's delta.
    model.train()
    for s in range(2):
        d, k, labels = bag_batch(20 + s)
        torch.nn.functional.binary_cross_entropy_with_logits(model(d, k).reshape(-1), labels).backward()
    model.eval()
    delta = checkpoint.export_delta(str(tmp_path / "delta"), wrapped, since_step=ckpt)
    predictor.apply_delta(delta)
    for r in reqs:
        assert torch.equal(predictor(*r), model(*r))

    # The reverse: a checkpoint of the model alone loads into the wrapper.
    alone = checkpoint.save(str(tmp_path / "alone"), model, step=8)
    other = Task(make_model("dlrm")[0].eval())
    checkpoint.load(alone, other)
    for r in reqs:
        assert torch.equal(other.model(*r), model(*r))


def test_a_delta_with_the_dense_part_serves_a_model_whose_dense_layers_train(tmp_path):
    """A run whose dense layers also train: a delta of its rows alone leaves the served dense part
    stale; with export_dense's dense part inside it, the package predicts what the trained model
    does, bit for bit. A dense part of another model is refused and changes nothing."""
    model, _ = trained("dlrm")
    example = requests("bag", 1)[0]
    ckpt = checkpoint.save(str(tmp_path / "ckpt"), model, step=0)
    package = inference.export(model, str(tmp_path / "p"), example)
    model.train()
    d, k, labels = bag_batch(77)
    torch.nn.functional.binary_cross_entropy_with_logits(model(d, k).reshape(-1), labels).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    model.eval()
    reqs = requests("bag", 3)
    want = [model(*r).detach() for r in reqs]
    rows_only = inference.load(package)
    rows_only.apply_delta(checkpoint.export_delta(str(tmp_path / "d_rows"), model, since_step=ckpt))
    assert not all(torch.equal(rows_only(*r), w) for r, w in zip(reqs, want))  # stale dense part
    delta = checkpoint.export_delta(str(tmp_path / "d"), model, since_step=ckpt)
    inference.export_dense(model, os.path.join(delta, "dense"), example)
    fresh = inference.load(package)
    fresh.apply_delta(delta)
    assert fresh.dense_from_delta
    for r, w in zip(reqs, want):
        assert torch.equal(fresh(*r), w)
    # A dense part of a model with other embedding modules: refused, nothing changes.
    other, _ = trained("deepfm")
    other_delta = checkpoint.export_delta(str(tmp_path / "d_other"), model, since_step=ckpt)
    inference.export_dense(other, os.path.join(other_delta, "dense"), requests("bag", 1)[0])
    stale = inference.load(package)
    before = [stale(*r) for r in reqs]
    with pytest.raises(InferenceError, match="other embedding modules or inputs"):
        stale.apply_delta(other_delta)
    assert all(torch.equal(stale(*r), b) for r, b in zip(reqs, before)) and stale.deltas_applied == 0
