# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""CTR data as it is published: files generated here in the same formats (Avazu-style CSV with
string ids, Taobao/Alimama-style header-less parts with delimited behaviour sequences, fixed-width
histories under one repeated header name, weighted lists, all-null columns), read as a user would,
each checked against the ids and weights written."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recis_torchrec.io import ColumnarDataset, Schema, hash_string


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _per_key(batch):
    kjt = batch.sparse_features
    out = {}
    for k, jt in kjt.to_dict().items():
        lengths = jt.lengths().tolist()
        vals = jt.values().tolist()
        w = jt.weights().tolist() if jt.weights_or_none() is not None else None
        rows, pos = [], 0
        for n in lengths:
            rows.append((vals[pos:pos + n], None if w is None else w[pos:pos + n]))
            pos += n
        out[k] = rows
    return out


def _rows(ds):
    out = []
    for b in ds:
        keys = _per_key(b)
        for r in range(b.labels.shape[0]):
            out.append({k: keys[k][r] for k in keys} | {"_dense": b.dense_features[r].tolist(),
                                                        "_label": float(b.labels[r])})
    return out


def test_a_delimited_sequence_in_a_csv_field_is_a_list_of_ids(tmp_path):
    """Taobao's behaviour logs write a history as "170301^573514": each item an id, not the field one."""
    path = _write(tmp_path / "seq.csv", ["clk,item,hist", "1,573514,170301^573514", "0,42,", "1,7,x9^^12"])
    schema = Schema(sparse={"item": "item", "hist": "hist"}, labels=["clk"], list_delimiter="^")
    rows = _rows(ColumnarDataset(path, schema, 3, prefetch=0))
    assert rows[0]["hist"][0] == [170301, 573514]
    assert rows[0]["item"][0] == [573514]  # the target shares ids with the history
    assert rows[1]["hist"][0] == []  # an empty field is an empty bag
    assert rows[2]["hist"][0] == [hash_string("x9"), 12]  # empty items are dropped; strings hashed


def test_weighted_lists_give_per_sample_weights(tmp_path):
    path = _write(tmp_path / "w.csv", ['y,tags', '1,"3:0.5,9:2"', '0,4', '1,'])
    schema = Schema(sparse={"tags": "tags"}, labels=["y"], list_delimiter=",", weight_delimiter=":")
    rows = _rows(ColumnarDataset(path, schema, 3, prefetch=0))
    assert rows[0]["tags"] == ([3, 9], [0.5, 2.0])
    assert rows[1]["tags"] == ([4], [1.0])
    assert rows[2]["tags"] == ([], [])


def test_columns_gathered_into_one_sequence_with_a_mask(tmp_path):
    """his_cate_1..his_cate_4 with a mask of which are real (the rest are padding)."""
    header = "y," + ",".join(f"his_cate_{i}" for i in range(1, 5)) + "," + ",".join(f"m{i}" for i in range(1, 5))
    path = _write(tmp_path / "g.csv", [header, "1,10,11,12,0,1,1,1,0", "0,5,,7,0,1,1,1,0"])
    schema = Schema(sparse={"hist": [f"his_cate_{i}" for i in range(1, 5)]}, labels=["y"],
                    masks={"hist": [f"m{i}" for i in range(1, 5)]})
    rows = _rows(ColumnarDataset(path, schema, 2, prefetch=0))
    assert rows[0]["hist"][0] == [10, 11, 12]
    assert rows[1]["hist"][0] == [5, 7]  # a null field and a masked one give no id


def test_a_repeated_header_name_is_every_column_of_that_name_by_position(tmp_path):
    """50 columns all named his_cate: a KeyError once; now one sequence, in column order."""
    header = "y,user," + ",".join(["his_cate"] * 50)
    line = "1,u1," + ",".join(str(i) for i in range(100, 150))
    short = "0,u2,7,8" + "," * 48
    path = _write(tmp_path / "r.csv", [header, line, short])
    schema = Schema(sparse={"user": "user", "hist": "his_cate"}, labels=["y"])
    rows = _rows(ColumnarDataset(path, schema, 2, prefetch=0))
    assert rows[0]["hist"][0] == list(range(100, 150))
    assert rows[1]["hist"][0] == [7, 8]
    assert rows[0]["user"][0] == [hash_string("u1")]


def test_header_less_parts_with_column_names_and_a_different_header_order(tmp_path):
    names = ["label", "user", "item", "hist"]
    a = _write(tmp_path / "part-0.txt", ["1,5,6,1^2", "0,5,7,"])  # comma-separated .txt
    b = _write(tmp_path / "part-1.txt", ["1\t8\t9\t3", "0\t8\t6\t4^5"])  # tab-separated .txt
    schema = Schema(sparse={"user": "user", "item": "item", "hist": "hist"}, labels=["label"],
                    list_delimiter="^", column_names=names)
    rows = _rows(ColumnarDataset([a, b], schema, 2, prefetch=0))
    assert [r["item"][0] for r in rows] == [[6], [7], [9], [6]]
    assert [r["hist"][0] for r in rows] == [[1, 2], [], [3], [4, 5]]
    # Headers in another order per part, one part's ids all digits (an int64 column to a reader that
    # infers types), the other's mixed (a string column): the same id is the same id in both.
    c = _write(tmp_path / "c.csv", ["item,y", "123,1", "456,0"])
    d = _write(tmp_path / "d.csv", ["y,item", "1,123", "0,ab"])
    s2 = Schema(sparse={"item": "item"}, labels=["y"])
    got = [r["item"][0] for r in _rows(ColumnarDataset([c, d], s2, 2, prefetch=0))]
    assert got == [[123], [456], [123], [hash_string("ab")]]


def test_explicit_format_overrides_the_extension(tmp_path):
    path = _write(tmp_path / "data.tsv", ["y,a", "1,3", "0,4"])  # a comma file with a .tsv name
    schema = Schema(sparse={"a": "a"}, labels=["y"])
    rows = _rows(ColumnarDataset(path, schema, 2, format="csv", prefetch=0))
    assert [r["a"][0] for r in rows] == [[3], [4]]


def test_nulls_everywhere_are_empty_bags_and_fills(tmp_path):
    """An all-null id column passed the start-up checks and crashed on the first batch."""
    path = _write(tmp_path / "n.csv", ["y,a,b,d", "1,,3,", "0,,,"])
    schema = Schema(sparse={"a": "a", "b": "b"}, dense=["d"], labels=["y"], defaults={"d": 2.5})
    rows = _rows(ColumnarDataset(path, schema, 2, prefetch=0))
    assert [r["a"][0] for r in rows] == [[], []]
    assert [r["b"][0] for r in rows] == [[3], []]
    assert [r["_dense"] for r in rows] == [[2.5], [2.5]]
    pq.write_table(pa.table({"y": pa.array([1, 0], pa.int8()), "a": pa.nulls(2), "d": pa.nulls(2)}),
                   tmp_path / "n.parquet")
    rows = _rows(ColumnarDataset(str(tmp_path / "n.parquet"), Schema(sparse={"a": "a"}, dense=["d"], labels=["y"]),
                                 2, prefetch=0))
    assert [r["a"][0] for r in rows] == [[], []] and [r["_dense"] for r in rows] == [[0.0], [0.0]]


def test_per_column_dense_transforms(tmp_path):
    path = _write(tmp_path / "d.csv", ["y,count,price", "1,0,10", "0,9,30"])
    schema = Schema(sparse={}, dense=["count", "price"], labels=["y"],
                    dense_transform={"count": "log1p", "price": "standardize"}, dense_stats={"price": (20.0, 10.0)})
    rows = _rows(ColumnarDataset(path, schema, 2, prefetch=0))
    assert rows[0]["_dense"] == pytest.approx([0.0, -1.0]) and rows[1]["_dense"] == pytest.approx([np.log(10), 1.0])
    with pytest.raises(ValueError, match="'price' is to be standardized but Schema.dense_stats"):
        ColumnarDataset(path, Schema(dense=["price"], labels=["y"], dense_transform={"price": "standardize"}), 2)


def test_bad_inputs_name_the_file_and_column(tmp_path):
    path = _write(tmp_path / "bad.csv", ["y,tags", "1,3:x"])
    with pytest.raises(ValueError, match="bad.csv: .*column 'tags': row 0: an item's weight 'x' is not a number"):
        ColumnarDataset(path, Schema(sparse={"tags": "tags"}, labels=["y"], list_delimiter="|", weight_delimiter=":"), 1)
    a = _write(tmp_path / "a.csv", ["y,h,h", "1,1,2"])
    b = _write(tmp_path / "b.csv", ["y,h,h,h", "1,1,2,3"])
    with pytest.raises(ValueError, match="b.csv: its header repeats names"):
        ColumnarDataset([a, b], Schema(sparse={"h": "h"}, labels=["y"]), 1)
    with pytest.raises(ValueError, match="masks.*2 columns but Schema.sparse.*3"):
        Schema(sparse={"h": ["a", "b", "c"]}, masks={"h": ["m", "n"]})
    with pytest.raises(ValueError, match="weight_delimiter splits the items of delimited lists"):
        Schema(sparse={"h": "h"}, weight_delimiter=":")
    assert os.path.exists(a)


def _reference_id(item: str, seed: int = 0) -> int:
    """The id rule, in plain Python: a canonical decimal int64 is itself, anything else hashed."""
    import re

    if re.fullmatch(r"0|-?[1-9][0-9]{0,18}", item) and -(2**63) <= int(item) < 2**63:
        return int(item)
    return hash_string(item, seed)


@pytest.mark.parametrize("delimiter,wdelim", [("^", ""), ("||", ""), (",", ":"), ("", "")])
def test_parse_id_lists_against_a_python_reference(delimiter, wdelim):
    import random

    from recis_torchrec import ops

    rnd = random.Random(0)
    atoms = ["0", "-0", "7", "007", "-5", "9223372036854775807", "9223372036854775808", "-9223372036854775808",
             "-9223372036854775809", "abc", "x y", "é", "", "12345678901234567890"]
    rows, want_ids, want_w, want_len = [], [], [], []
    for _ in range(200):
        items = [rnd.choice(atoms) for _ in range(rnd.randint(0, 5))]
        if not delimiter:
            items = items[:1]
        ws = [rnd.choice(["", "0.5", "2", "-1e-3"]) for _ in items]
        text = delimiter.join(f"{i}{wdelim}{w}" if wdelim and w else i for i, w in zip(items, ws))
        rows.append(text)
        kept = [(i, w) for i, w in zip(items, ws) if (f"{i}{wdelim}{w}" if wdelim and w else i)]
        want_len.append(len(kept))
        want_ids += [_reference_id(i, 5) for i, _ in kept]
        want_w += [float(w) if w else 1.0 for _, w in kept]
    data = "".join(rows).encode()
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + len(r.encode()))
    lengths, ids, w = ops.parse_id_lists(torch.tensor(list(data), dtype=torch.uint8), torch.tensor(offsets), None,
                                         delimiter, wdelim, 5, "c")
    assert lengths.tolist() == want_len
    assert ids.tolist() == want_ids
    if wdelim:
        assert w.tolist() == pytest.approx(want_w)
    else:
        assert w is None


def test_parse_id_lists_rejects_corrupt_buffers():
    from recis_torchrec import ops

    with pytest.raises(RuntimeError, match="column 'tags': row 1 spans bytes"):
        ops.parse_id_lists(torch.zeros(3, dtype=torch.uint8), torch.tensor([0, 2, 9]), None, "^", "", 0, "tags")
    with pytest.raises(RuntimeError, match="nulls has 1 entries for 2 rows"):
        ops.parse_id_lists(torch.zeros(3, dtype=torch.uint8), torch.tensor([0, 1, 2]), torch.zeros(1, dtype=torch.bool),
                           "^", "", 0, "tags")
