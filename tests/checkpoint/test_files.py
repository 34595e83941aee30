# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""The checkpoint file writer against the safetensors library: the same bytes, the same checksum."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recis_torchrec import ops
from recis_torchrec.checkpoint import CheckpointError
from recis_torchrec.checkpoint import files

STAGE = 8 << 20  # the writer's staging buffer


def some_tensors(seed: int, big: int):
    g = torch.Generator().manual_seed(seed)
    return {
        "ids": torch.randint(-(2**62), 2**62, (big // 8,), generator=g),
        "weights": torch.randn(big // 64 + 1, 16, generator=g),
        "state": torch.rand(7, generator=g, dtype=torch.float64),
        "half": torch.randn(3, 5, generator=g).half(),
        "bf": torch.randn(9, generator=g).bfloat16(),
        "count": torch.randint(0, 9, (11,), generator=g, dtype=torch.int32),
        "small": torch.randint(-5, 5, (13,), generator=g, dtype=torch.int8),
        "bytes": torch.randint(0, 255, (big % 4099 + 1,), generator=g, dtype=torch.uint8),
        "flags": torch.rand(6, generator=g) > 0.5,
        "short": torch.randint(-5, 5, (4,), generator=g, dtype=torch.int16),
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("big", [0, 24, 4096 - 8, STAGE - 200, STAGE + 4096 * 3 + 5, 2 * STAGE + 77])
def test_files_are_byte_for_byte_what_the_safetensors_library_writes(tmp_path, big):
    """Sizes on either side of the staging buffer and of O_DIRECT's block: the file, its length
    (cut back after the padded last block) and its streamed XXH64 equal save_file's bytes and the
    one-shot hash of them."""
    tensors = some_tensors(big, big)
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    entry = files.write_tensors(ours, tensors, {"table": "t"})
    save_file(tensors, theirs, metadata={"table": "t"})
    got, want = open(ours, "rb").read(), open(theirs, "rb").read()
    assert got == want
    assert entry["bytes"] == len(want) == os.path.getsize(ours)
    assert entry["xxh64_file"] == files.checksum(want)


def test_metadata_and_views_read_back_through_safe_open(tmp_path):
    """Metadata with several keys (the library orders them as it likes, so bytes may differ), a
    strided view and a one-row slice: safe_open reads back every tensor and the metadata."""
    base = torch.randn(10, 8)
    tensors = {"col": base[:, 3], "row": base[4:5], "t": torch.arange(5)}
    path = str(tmp_path / "f.safetensors")
    entry = files.write_tensors(path, tensors, {"table": "a/b", "rank": "3", "x": "y"})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"table": "a/b", "rank": "3", "x": "y"}
        assert sorted(f.keys()) == ["col", "row", "t"]
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    assert files.read_tensors(str(tmp_path), entry).keys() == tensors.keys()


def test_a_file_system_without_o_direct_gets_the_same_file(tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    tensors = some_tensors(1, STAGE + 123)
    path = os.path.join(shm, f"recis-test-{os.getpid()}.safetensors")
    try:
        entry = files.write_tensors(path, tensors)
        save_file(tensors, str(tmp_path / "theirs.safetensors"))
        got = open(path, "rb").read()
        assert got == open(tmp_path / "theirs.safetensors", "rb").read()
        assert entry["xxh64_file"] == files.checksum(got)
    finally:
        if os.path.exists(path):
            os.remove(path)


def test_write_errors_name_the_file_and_tensor(tmp_path):
    with pytest.raises(RuntimeError, match="no-such-dir"):
        files.write_tensors(str(tmp_path / "no-such-dir" / "f.safetensors"), {"a": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="'c'.*complex"):
        files.write_tensors(str(tmp_path / "f.safetensors"), {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="tensor 0 must be a dense CPU tensor"):
        ops.write_file(str(tmp_path / "g"), b"", [torch.eye(3).to_sparse()])


def test_strided_tensors_are_written_row_major_across_the_staging_buffer(tmp_path):
    """Columns of wide tables, transposes and expanded tensors, with rows straddling the end of
    the staging buffer: the file holds their row-major bytes."""
    wide = torch.randn(STAGE // 40 + 777, 10)
    tensors = [wide[:, 3], wide[:, 2:7], wide.t(), torch.arange(7).expand(5, 7), wide[::3]]
    path = str(tmp_path / "f")
    digest = ops.write_file(path, b"head", tensors)
    want = b"head" + b"".join(t.contiguous().numpy().tobytes() for t in tensors)
    got = open(path, "rb").read()
    assert got == want
    assert f"{digest:016x}" == files.checksum(want)


@pytest.mark.parametrize("share", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_a_write_share_outside_0_1_is_refused(tmp_path, share):
    model = torch.nn.Linear(2, 2)
    from recis_torchrec import checkpoint

    with pytest.raises(CheckpointError, match="write_share"):
        checkpoint.save(str(tmp_path), model, step=1, blocking=False, write_share=share)
    with pytest.raises(RuntimeError, match="share must be in"):
        ops.write_file(str(tmp_path / "f"), b"x", [], share=share if type(share) in (int, float) else 2.0)


def test_a_paced_write_is_the_same_file(tmp_path):
    tensors = some_tensors(3, 3 * STAGE)
    a = files.write_tensors(str(tmp_path / "a"), tensors, share=0.5)
    b = files.write_tensors(str(tmp_path / "b"), tensors)
    assert a["xxh64_file"] == b["xxh64_file"]
    assert open(tmp_path / "a", "rb").read() == open(tmp_path / "b", "rb").read()


@pytest.mark.parametrize("reuse", [1, 0, "yes", None])
def test_reuse_buffers_must_be_a_bool(tmp_path, reuse):
    from recis_torchrec import checkpoint

    with pytest.raises(CheckpointError, match="reuse_buffers must be True or False"):
        checkpoint.save(str(tmp_path), torch.nn.Linear(2, 2), step=1, blocking=False, reuse_buffers=reuse)
