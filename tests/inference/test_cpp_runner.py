# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The C++ runner (``recis-serve``, built by setup): the same package, served without Python,
prints the predictions the Python predictor returns, bit for bit; a corrupt or incomplete package
and a bad batch are refused with the file, table or feature named."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from recis_torchrec import inference
from recis_torchrec.inference import runner
from tests.inference.test_package import requests, rewrite_manifest, trained


def serve(package, batch_file, *flags):
    """The runner's outputs as tensors, or its error."""
    done = subprocess.run([runner.binary(), package, batch_file, *flags], capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        return None, done.stderr
    outputs, lines = [], done.stdout.splitlines()
    i = 0
    while i < len(lines):
        _, _, dtype, shape = lines[i].split(" ", 3)
        shape = json.loads(shape)
        rows = shape[0] if shape else 1
        values = [[float(x) for x in line.split()] for line in lines[i + 1:i + 1 + rows]]
        outputs.append(torch.tensor(values, dtype=torch.float64).reshape(shape).to(getattr(torch, dtype.lower())))
        i += 1 + rows
    return outputs, done.stderr


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """A DLRM package with INT8 rows and a DIN (EmbeddingCollection) package with FP32 rows, both with
    the AOTInductor program (each compile takes tens of seconds)."""
    root = tmp_path_factory.mktemp("cpp")
    out = {}
    for name, q in (("dlrm", "int8"), ("din", "fp32")):
        model, kind = trained(name)
        out[name] = (inference.export(model, str(root / name), requests(kind, 1)[0], quantize=q, aot_inductor=True),
                     kind, model)
    return out


@pytest.mark.parametrize("name", ["dlrm", "din"])
def test_the_cpp_runner_prints_what_the_python_predictor_returns(packages, name, tmp_path):
    package, kind, model = packages[name]
    assert "aoti_program" in inference.read_manifest(package)
    predictor = inference.load(package, dense="aoti")
    for i, r in enumerate(requests(kind, 4)):  # unseen ids among them: they read their initial rows
        batch_file = inference.write_batch(str(tmp_path / f"b{i}.safetensors"), *r)
        # One ATen thread on odd requests, the default on even ones: the same answer either way.
        got, err = serve(package, batch_file, *(("--threads", "1") if i % 2 else ()))
        assert got is not None, err
        want = predictor(*r)
        assert len(got) == 1 and got[0].shape == want.shape and got[0].dtype == want.dtype
        assert torch.equal(got[0], want), (name, i, float((got[0] - want).abs().max()))
        if i == 0:  # int32 ids and lengths, as the training modules take them
            dense, kjt = r
            narrow = type(kjt)(keys=kjt.keys(), values=kjt.values().int(), lengths=kjt.lengths().int())
            got32, err = serve(package, inference.write_batch(str(tmp_path / "int32.safetensors"), dense, narrow))
            assert got32 is not None, err
            assert torch.equal(got32[0], want)
        with torch.no_grad():  # and the package is the model: the compiled kernels may round differently
            # from eager (within 1e-5), INT8 rows within their error
            torch.testing.assert_close(got[0], model(*r), atol=1e-3 if name == "dlrm" else 1e-5, rtol=0)


def copy_package(packages, tmp_path, name="dlrm"):
    dst = str(tmp_path / "pkg")
    shutil.copytree(packages[name][0], dst)
    return dst


def test_a_bad_package_or_batch_is_named_by_the_runner(packages, tmp_path):
    _, kind, _ = packages["dlrm"]
    r = requests(kind, 1)[0]
    batch_file = inference.write_batch(str(tmp_path / "b.safetensors"), *r)
    table = "sparse_arch.embedding_bag_collection/t1"

    # A thread count that is not one.
    out, err = serve(packages["dlrm"][0], batch_file, "--threads", "0")
    assert out is None and "--threads needs a count >= 1, got 0" in err, err

    # A flipped byte in a table shard.
    p = copy_package(packages, tmp_path)
    shard = os.path.join(p, inference.read_manifest(p)["tables"][table]["files"][0]["file"])
    data = bytearray(open(shard, "rb").read())
    data[-3] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    out, err = serve(p, batch_file)
    assert out is None and "checksum mismatch (the file is corrupt)" in err and shard in err, err
    shutil.rmtree(p)

    # A missing shard.
    p = copy_package(packages, tmp_path)
    os.remove(os.path.join(p, inference.read_manifest(p)["tables"][table]["files"][0]["file"]))
    out, err = serve(p, batch_file)
    assert out is None and "missing or unreadable" in err and "part0.safetensors" in err, err
    shutil.rmtree(p)

    # An edited manifest (the rows count of one table), its checksum left as it was.
    p = copy_package(packages, tmp_path)
    text = open(os.path.join(p, "manifest.json")).read()
    n = inference.read_manifest(p)["tables"][table]["rows"]
    open(os.path.join(p, "manifest.json"), "w").write(text.replace(f'"rows": {n}', f'"rows": {n + 1}', 1))
    out, err = serve(p, batch_file)
    assert out is None and "checksum mismatch (the manifest was edited" in err, err
    shutil.rmtree(p)

    # The checksum is of the file's bytes: a space appended is refused; a missing sidecar is named.
    p = copy_package(packages, tmp_path)
    with open(os.path.join(p, "manifest.json"), "a") as f:
        f.write(" ")
    out, err = serve(p, batch_file)
    assert out is None and "checksum mismatch (the manifest was edited" in err, err
    shutil.rmtree(p)
    p = copy_package(packages, tmp_path)
    os.remove(os.path.join(p, "manifest.xxh64"))
    out, err = serve(p, batch_file)
    assert out is None and "manifest.xxh64: missing" in err and "export it again" in err, err

    # The same edit with a matching checksum: the table's files disagree, and the table is named.
    shutil.rmtree(p)
    p = copy_package(packages, tmp_path)
    rewrite_manifest(p, lambda m: m["tables"][table].update(rows=n + 1))
    out, err = serve(p, batch_file)
    assert out is None and f"table '{table}'" in err and f"the manifest says {n + 1}" in err, err
    shutil.rmtree(p)

    # A table the modules read but the manifest lacks.
    p = copy_package(packages, tmp_path)
    rewrite_manifest(p, lambda m: m["tables"].pop(table))
    out, err = serve(p, batch_file)
    assert out is None and f"no table '{table}'" in err, err
    shutil.rmtree(p)

    # A package exported without the AOTInductor program.
    p = copy_package(packages, tmp_path)
    rewrite_manifest(p, lambda m: m.pop("aoti_program"))
    out, err = serve(p, batch_file)
    assert out is None and "no AOTInductor program" in err, err
    with pytest.raises(inference.InferenceError, match="no AOTInductor program"):
        inference.load(p, dense="aoti")
    shutil.rmtree(p)

    # A batch whose KJT lacks a feature the model reads, and a file that is not a batch.
    dense, kjt = r
    from torchrec import KeyedJaggedTensor

    per = kjt.to_dict()
    partial = KeyedJaggedTensor.from_jt_dict({k: per[k] for k in ("f0", "f2")})
    out, err = serve(packages["dlrm"][0], inference.write_batch(str(tmp_path / "c.safetensors"), dense, partial))
    assert out is None and "lacks feature 'f1'" in err, err
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00")
    out, err = serve(packages["dlrm"][0], str(tmp_path / "junk.safetensors"))
    assert out is None and "junk.safetensors: not a safetensors file" in err, err
    with pytest.raises(inference.InferenceError, match="argument 1 is a str"):
        inference.write_batch(str(tmp_path / "d.safetensors"), dense, "f0")


def test_the_runner_refuses_a_batch_the_compiled_program_would_misread(packages, tmp_path):
    # The compiled program reads its inputs as the shapes and dtypes it was exported with: a dense part
    # of another batch size, width or dtype returned garbage. The Python predictor refuses the same.
    package, kind, _ = packages["dlrm"]
    dense, kjt = requests(kind, 1)[0]
    predictor = inference.load(package)
    for name, bad, message in [
        ("rows", dense[:-1], f"input 0 has {dense.shape[0] - 1} rows but the KeyedJaggedTensor a batch of "
                             f"{dense.shape[0]}"),
        ("width", dense[:, :-1], "input 0: the model takes float32 of shape (batch, 4), got"),
        ("dtype", dense.double(), "input 0: the model takes float32 of shape (batch, 4), got"),
    ]:
        out, err = serve(package, inference.write_batch(str(tmp_path / f"{name}.safetensors"), bad, kjt))
        assert out is None and message in err, (name, err)
        with pytest.raises(inference.InferenceError, match="input 0"):
            predictor(bad, kjt)

    # A package exported with another torch: both predictors serve it and warn, naming the versions.
    p = copy_package(packages, tmp_path)
    rewrite_manifest(p, lambda m: m["versions"].update(torch="1.13.1"))
    out, err = serve(p, inference.write_batch(str(tmp_path / "v.safetensors"), dense, kjt))
    assert out is not None and "exported with torch 1.13.1, this runner is built with torch" in err, err
    with pytest.warns(UserWarning, match="exported with torch 1.13.1, this is torch"):
        inference.load(p)
    shutil.rmtree(p)
    out, err = serve(package, inference.write_batch(str(tmp_path / "v2.safetensors"), dense, kjt))
    assert out is not None and "warning" not in err, err

    # A forged initializer kind (the manifest's checksum recomputed): named at load.
    p = copy_package(packages, tmp_path)
    table = "sparse_arch.embedding_bag_collection/t1"
    rewrite_manifest(p, lambda m: m["tables"][table]["init"].update(kind=7))
    out, err = serve(p, inference.write_batch(str(tmp_path / "ok.safetensors"), dense, kjt))
    assert out is None and "unknown initializer kind 7" in err and table in err, err
    with pytest.raises(inference.InferenceError, match=f"table '{table}': unknown initializer kind 7"):
        inference.load(p)
