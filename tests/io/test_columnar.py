# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""ColumnarDataset: round trips, rank splits, resume, Criteo, and errors that name file and column."""

import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.orc as paorc
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recis_torchrec.io import ColumnarDataset, ColumnError, Schema, SourceError, criteo_schema, hash_string
from recis_torchrec.io import rank_batch_sizes

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def test_string_hash_is_xxh64():
    # Test vectors of the reference XXH64 implementation (seed 0), as unsigned.
    vectors = {
        "": 0xEF46DB3751D8E999,
        "a": 0xD24EC4F1A98C6E5B,
        "abc": 0x44BC2CF5AD770999,
        "68fd1e64": 0x5D3CCD85C9C22FE4,
        "hello world, this is a longer string of more than 32 bytes!!": 0x5D168DE170C91F1D,
    }
    for s, h in vectors.items():
        assert hash_string(s) & (2**64 - 1) == h, s
    assert hash_string("a", seed=1) != hash_string("a")


def full_table() -> pa.Table:
    return pa.table(
        {
            "price": pa.array([1.5, None, 3.0, 4.0, None, 6.0, 7.0], pa.float64()),
            "count": pa.array([1, 2, None, 4, 5, 6, 7], pa.int32()),
            "user": pa.array([10, -(2**63), None, 2**63 - 1, 0, -5, 7], pa.int64()),
            "items": pa.array([[1, 2], [], None, [3, None, 4], [5], [6, 6, 6], [2**40]], pa.list_(pa.int64())),
            "city": pa.array(["berlin", None, "", "paris", "berlin", "rome", "oslo"]),
            "tags": pa.array([["a", "b"], None, [], ["c"], ["a", None], ["d", "e", "f"], ["g"]], pa.list_(pa.string())),
            "item_w": pa.array(
                [[0.5, 1.0], [], None, [2.0, 0.0, 3.0], [4.0], [1.0, 2.0, 3.0], [9.0]], pa.list_(pa.float32())
            ),
            "click": pa.array([0, 1, 0, 1, 1, 0, 1], pa.int8()),
            "buy": pa.array([0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]),
        }
    )


FULL_SCHEMA = Schema(
    dense=["price", "count"],
    sparse={"user": "user", "items": "items", "city": "city", "tags": "tags"},
    weights={"items": "item_w"},
    labels=["click", "buy"],
    defaults={"count": -1.0},
)


def expected_rows(table: pa.Table, schema: Schema):
    """Per row: (dense, {key: ids}, {key: weights}, labels), written plainly."""
    rows = table.to_pylist()
    out = []
    for r in rows:
        dense = [r[c] if r[c] is not None else schema.defaults.get(c, schema.dense_default) for c in schema.dense]
        ids, weights = {}, {}
        for key, col in schema.sparse.items():
            v = r[col]
            vals = [] if v is None else (v if isinstance(v, list) else [v])
            wcol = schema.weights.get(key)
            ws = (r[wcol] or []) if wcol else [1.0] * len(vals)
            kept = [(x, w) for x, w in zip(vals, ws) if x is not None]
            ids[key] = [hash_string(x) if isinstance(x, str) else x for x, _ in kept]
            weights[key] = [w for _, w in kept]
        labels = [float(r[c]) for c in schema.labels]
        out.append((dense, ids, weights, labels))
    return out


def batches_to_rows(batches, schema: Schema):
    rows = []
    for b in batches:
        d = b.sparse_features.to_dict()
        for i in range(b.dense_features.shape[0]):
            ids = {k: d[k].to_dense()[i].tolist() for k in schema.sparse}
            weights = (
                {k: d[k].to_dense_weights()[i].tolist() for k in schema.sparse} if schema.weights else None
            )
            labels = b.labels[i].reshape(-1).tolist()
            rows.append((b.dense_features[i].tolist(), ids, weights, labels))
    return rows


def check_round_trip(path, table, schema, fmt=None, batch_size=3):
    got = batches_to_rows(ColumnarDataset(path, schema, batch_size, format=fmt, prefetch=1), schema)
    want = expected_rows(table, schema)
    assert len(got) == len(want)
    for (gd, gi, gw, gl), (wd, wi, ww, wl) in zip(got, want):
        assert gd == pytest.approx(wd)
        assert gi == wi
        if gw is not None:
            for k in gw:
                assert gw[k] == pytest.approx(ww[k])
        assert gl == pytest.approx(wl)


def test_parquet_round_trip_every_column_kind(tmp_path):
    table = full_table()
    path = str(tmp_path / "full.parquet")
    pq.write_table(table, path, row_group_size=3)
    check_round_trip(path, table, FULL_SCHEMA)


def test_orc_round_trip_every_column_kind(tmp_path):
    table = full_table()
    path = str(tmp_path / "full.orc")
    paorc.write_table(table, path)
    check_round_trip(path, table, FULL_SCHEMA)


def test_csv_and_tsv_round_trip_scalar_columns(tmp_path):
    # CSV has no list type: scalar ids (integers and strings), dense and labels.
    table = full_table().select(["price", "count", "user", "city", "click"])
    schema = Schema(dense=["price", "count"], sparse={"user": "user", "city": "city"}, labels=["click"])
    csv_path = str(tmp_path / "t.csv")
    pacsv.write_csv(table, csv_path)
    tsv_path = str(tmp_path / "t.tsv")
    pacsv.write_csv(table, tsv_path, write_options=pacsv.WriteOptions(delimiter="\t"))
    # CSV cannot tell an empty string from a null: the empty "city" of row 2 reads back null (empty bag).
    want_table = table.set_column(3, "city", pa.array(["berlin", None, None, "paris", "berlin", "rome", "oslo"]))
    check_round_trip(csv_path, want_table, schema)
    check_round_trip(tsv_path, want_table, schema)


def test_scalar_defaults_fill_nulls(tmp_path):
    table = full_table()
    path = str(tmp_path / "d.parquet")
    pq.write_table(table, path)
    schema = Schema(dense=["price"], sparse={"user": "user", "city": "city"}, labels=["click"],
                    defaults={"user": 42, "city": "unknown", "price": 9.0})
    b = next(iter(ColumnarDataset(path, schema, 7)))
    d = b.sparse_features.to_dict()
    assert d["user"].lengths().tolist() == [1] * 7 and d["user"].values()[2] == 42
    assert d["city"].values()[1] == hash_string("unknown")
    assert b.dense_features[1, 0] == 9.0


def write_numbered(tmp_path, sizes, row_groups=4):
    """Files of consecutive row ids, split into row groups."""
    paths, start = [], 0
    for i, n in enumerate(sizes):
        t = pa.table({"rid": pa.array(range(start, start + n), pa.int64()), "x": pa.array([1.0] * n)})
        p = str(tmp_path / f"part-{i}.parquet")
        pq.write_table(t, p, row_group_size=row_groups)
        paths.append(p)
        start += n
    return paths, start


NUMBERED = Schema(dense=["x"], sparse={"rid": "rid"})


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_splits_cover_rows_once_with_equal_batch_counts(tmp_path, shuffle, drop_last, world_size):
    paths, n = write_numbered(tmp_path, [13, 7, 22, 1, 9])
    seen, counts = [], []
    for rank in range(world_size):
        ds = ColumnarDataset(
            str(tmp_path), NUMBERED, 4, rank, world_size, shuffle=shuffle, seed=3, shuffle_buffer=6,
            drop_last=drop_last,
        )
        batches = list(ds)
        counts.append(len(batches))
        assert all(b.dense_features.shape[0] <= 4 for b in batches)
        assert all(b.dense_features.shape[0] == 4 for b in batches[:-2])
        seen += [v for b in batches for v in b.sparse_features.values().tolist()]
    assert len(set(counts)) == 1
    assert len(seen) == len(set(seen))
    if drop_last:
        assert n - len(seen) < world_size * 4
    else:
        assert sorted(seen) == list(range(n))
    if shuffle:
        assert seen != sorted(seen)


@given(st.integers(1, 500), st.integers(1, 8), st.integers(1, 40), st.booleans())
def test_rank_batch_sizes(n, world_size, batch, drop_last):
    try:
        sizes = rank_batch_sizes(n, world_size, batch, drop_last)
    except ValueError:
        assert not drop_last and (n < world_size or batch < 2)
        return
    assert len({len(s) for s in sizes}) == 1
    assert all(0 < x <= batch for s in sizes for x in s)
    total = sum(map(sum, sizes))
    assert total == n if not drop_last else n - total < world_size * batch


def test_resume_mid_file_gives_the_next_batch(tmp_path):
    write_numbered(tmp_path, [30, 25], row_groups=7)
    kwargs = dict(shuffle=True, seed=11, shuffle_buffer=10, rank=1, world_size=2)
    ref = ColumnarDataset(str(tmp_path), NUMBERED, 3, **kwargs)
    ref_batches = [b.sparse_features.values().tolist() for b in ref]
    for stop in (1, 4, len(ref_batches) - 1):
        ds = ColumnarDataset(str(tmp_path), NUMBERED, 3, **kwargs)
        it = iter(ds)
        for _ in range(stop):
            next(it)
        state = ds.state_dict()
        fresh = ColumnarDataset(str(tmp_path), NUMBERED, 3, **kwargs)
        fresh.load_state_dict(state)
        rest = [b.sparse_features.values().tolist() for b in fresh]
        assert rest == ref_batches[stop:]
    # The next epoch reshuffles (ranks get other parts of the stream), deterministically.
    again = ColumnarDataset(str(tmp_path), NUMBERED, 3, **kwargs)
    list(again)
    second = [b.sparse_features.values().tolist() for b in again]
    assert second != ref_batches
    other = ColumnarDataset(str(tmp_path), NUMBERED, 3, **kwargs)
    other.set_epoch(1)
    assert [b.sparse_features.values().tolist() for b in other] == second
    with pytest.raises(ValueError, match="the state has rank=1 but this dataset has 0"):
        ColumnarDataset(str(tmp_path), NUMBERED, 3).load_state_dict(state)


def test_errors_name_file_and_column(tmp_path):
    table = full_table()
    good = str(tmp_path / "good.parquet")
    pq.write_table(table, good)
    with pytest.raises(SourceError, match="missing.parquet: no such file"):
        ColumnarDataset(str(tmp_path / "missing.parquet"), FULL_SCHEMA, 2)
    with pytest.raises(ColumnError, match=r"good.parquet: column 'nope' is missing"):
        ColumnarDataset(good, Schema(dense=["price"], sparse={"k": "nope"}), 2)
    with pytest.raises(ColumnError, match=r"good.parquet: dense column 'city' must be numeric"):
        ColumnarDataset(good, Schema(dense=["city"], sparse={"k": "user"}), 2)
    floats = str(tmp_path / "floats.parquet")
    pq.write_table(pa.table({"f": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))}), floats)
    with pytest.raises(ColumnError, match=r"floats.parquet: column 'f' \(KJT key 'k'\) holds list<element: float>"):
        ColumnarDataset(floats, Schema(sparse={"k": "f"}), 2)
    corrupt = str(tmp_path / "corrupt.parquet")
    with open(corrupt, "wb") as f:
        f.write(os.urandom(1000))
    with pytest.raises(SourceError, match="corrupt.parquet: cannot read as parquet"):
        ColumnarDataset(corrupt, FULL_SCHEMA, 2)
    truncated = str(tmp_path / "truncated.parquet")
    with open(good, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[: os.path.getsize(good) // 2])
    with pytest.raises(SourceError, match="truncated.parquet: cannot read as parquet"):
        ColumnarDataset(truncated, FULL_SCHEMA, 2)
    bad_weights = Schema(sparse={"items": "items"}, weights={"items": "city"})
    with pytest.raises(ColumnError, match=r"good.parquet: weight column 'city' \(KJT key 'items'\) must be list<float>"):
        ColumnarDataset(good, bad_weights, 2)
    with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
        if torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (skipped: CUDA is available)")
        ColumnarDataset(good, FULL_SCHEMA, 2, pin_memory=True)


def test_weights_must_match_ids(tmp_path):
    t = pa.table({"ids": pa.array([[1, 2]], pa.list_(pa.int64())), "w": pa.array([[1.0]], pa.list_(pa.float32()))})
    path = str(tmp_path / "w.parquet")
    pq.write_table(t, path)
    ds = ColumnarDataset(path, Schema(sparse={"k": "ids"}, weights={"k": "w"}), 1)
    with pytest.raises(ColumnError, match=r"weight column 'w' has 1 weights at row 0 but KJT key 'k' has 2 ids"):
        next(iter(ds))


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is absent")
def test_criteo_sample_parses_with_empty_fields(tmp_path):
    from recis_torchrec.io.criteo import convert

    src = os.path.join(SHARED, "criteo", "wide_resdnn", "dev.csv")  # raw TSV, no header
    dst = str(tmp_path / "dev.parquet")
    rows = convert(src, dst, row_group_size=100, progress=False)
    assert rows == 409
    table = pq.read_table(dst)
    assert table.column("I12").null_count > 0 and table.column("C22").null_count > 0  # empty fields
    batches = list(ColumnarDataset(dst, criteo_schema(), 128))
    assert sum(b.labels.numel() for b in batches) == 409
    kjt = batches[0].sparse_features
    assert kjt.keys() == [f"cat_{i}" for i in range(26)]
    assert batches[0].dense_features.shape == (128, 13) and torch.isfinite(batches[0].dense_features).all()
    # An empty category is an empty bag; the others are one hashed id each.
    first = table.slice(0, 128)
    c22_present = first.column("C22").is_valid().to_pylist()
    assert kjt["cat_21"].lengths().tolist() == [int(v) for v in c22_present]
    assert kjt["cat_0"].values()[0] == hash_string(first.column("C1")[0].as_py())
    # DeepCTR's sample: comma-separated with a header, counts written as floats.
    deepctr = os.path.join(SHARED, "criteo", "deepctr", "criteo_sample.txt")
    ds = ColumnarDataset(deepctr, criteo_schema(), 64, format="csv")
    assert sum(b.labels.numel() for b in ds) == 200


def test_uri_and_glob_paths(tmp_path):
    write_numbered(tmp_path, [5, 6])
    by_uri = ColumnarDataset(f"file://{tmp_path}/part-*.parquet", NUMBERED, 4)
    by_dir = ColumnarDataset(str(tmp_path), NUMBERED, 4)
    got = [b.sparse_features.values().tolist() for b in by_uri]
    assert got == [b.sparse_features.values().tolist() for b in by_dir]
    assert sorted(sum(got, [])) == list(range(11))
    with pytest.raises(SourceError, match="no file matches"):
        ColumnarDataset(str(tmp_path / "nothing-*.parquet"), NUMBERED, 4)


def test_a_delimited_list_without_a_declared_delimiter_warns_once(tmp_path):
    # A '^'-joined field read without list_delimiter is one hashed id per row: it trains, silently
    # wrong, unless the user hears of it.
    import warnings

    path = str(tmp_path / "t.csv")
    with open(path, "w") as f:
        f.write("tags,city,click\n")
        for i in range(40):
            f.write(f"{i}^{i + 1}^{i + 2},c{i % 3},{i % 2}\n")
    schema = Schema(sparse={"tags": "tags", "city": "city"}, labels=["click"])
    with pytest.warns(UserWarning, match=r"100% of column 'tags'.s values contain '\^', yet it is read as one id per "
                                         r"row .*Schema\(list_delimiter=\{'tags': '\^'\}\)") as caught:
        batches = list(ColumnarDataset(path, schema, batch_size=8, prefetch=0))
    assert len([w for w in caught if "list delimiter" in str(w.message)]) == 1  # once, for 'tags' only
    assert batches[0].sparse_features["tags"].lengths().tolist() == [1] * 8
    declared = Schema(sparse={"tags": "tags", "city": "city"}, labels=["click"], list_delimiter={"tags": "^"})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*list delimiter")
        batches = list(ColumnarDataset(path, declared, batch_size=8, prefetch=0))
    assert batches[0].sparse_features["tags"].lengths().tolist() == [3] * 8


def test_a_header_less_file_read_by_name_points_to_column_names(tmp_path):
    path = str(tmp_path / "nohead.csv")
    open(path, "w").write("1,a,0.5\n0,b,1.5\n")
    schema = Schema(dense=["x"], sparse={"s": "s"}, labels=["y"])
    with pytest.raises(ColumnError, match=r"column 'x' is missing .*no header line .*Schema.column_names"):
        ColumnarDataset(path, schema, batch_size=1)
    named = Schema(dense=["x"], sparse={"s": "s"}, labels=["y"], column_names=["y", "s", "x"])
    assert len(list(ColumnarDataset(path, named, batch_size=1, prefetch=0))) == 2


def test_the_examples_generator_creates_its_folder(tmp_path):
    from recis_torchrec.datasets.formats import write_avazu_csv

    path = write_avazu_csv(str(tmp_path / "data" / "avazu" / "train.csv"), rows=5)
    assert len(open(path).read().splitlines()) == 6


def test_a_headered_file_beside_header_less_ones_reads_with_one_schema(tmp_path):
    # column_names names the columns of header-less files; a file of the same dataset that has the
    # header line (a headered train file beside header-less eval parts) skips it instead of reading
    # it as a row.
    bare, headed = str(tmp_path / "part-0.csv"), str(tmp_path / "train.csv")
    open(bare, "w").write("1,a,0.5\n0,b,1.5\n")
    open(headed, "w").write("y,s,x\n1,a,0.5\n0,b,1.5\n")
    schema = Schema(dense=["x"], sparse={"s": "s"}, labels=["y"], column_names=["y", "s", "x"])
    for path in (bare, headed):
        batches = list(ColumnarDataset(path, schema, batch_size=2, prefetch=0))
        assert len(batches) == 1 and batches[0].dense_features.reshape(-1).tolist() == [0.5, 1.5], path
