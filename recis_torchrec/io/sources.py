# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Files, formats and the units a dataset is split into.

A unit is the smallest piece read at once and split across ranks: a Parquet
row group, a whole ORC file (read stripe by stripe) or a whole CSV/TSV file.
Row counts come from metadata (Parquet, ORC); CSV/TSV files are parsed once
to count them. Paths may be files, directories, globs, or URIs of any
filesystem ``pyarrow.fs`` supports.
"""

import fnmatch
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.orc as paorc
import pyarrow.parquet as pq

from recis_torchrec.io.arrow import ColumnError, normalize_csv

FORMATS = ("parquet", "orc", "csv", "tsv")
# ".txt" is CSV or TSV by its first line (a tab: TSV); "format=" overrides any extension.
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".orc": "orc", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}


class SourceError(IOError):
    """A file that is missing, unreadable or corrupt; names the file."""


@dataclass(frozen=True)
class Unit:
    path: str
    format: str
    index: int  # row group (Parquet); 0 otherwise
    num_rows: int


def _filesystem(path: str, filesystem: Optional[pafs.FileSystem]) -> Tuple[pafs.FileSystem, str]:
    if filesystem is not None:
        return filesystem, path
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise SourceError(f"{path}: cannot open its filesystem ({e})") from e
    return pafs.LocalFileSystem(), os.path.abspath(path)


def format_of(path: str, fmt: Optional[str], fs: Optional[pafs.FileSystem] = None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise SourceError(f"{path}: cannot tell the format from the extension {ext!r}; pass format=")
    if _EXTENSIONS[ext] == "txt":
        return _sniff_delimited(fs or pafs.LocalFileSystem(), path)
    return _EXTENSIONS[ext]


def _sniff_delimited(fs: pafs.FileSystem, path: str) -> str:
    """"tsv" if the file's first line holds a tab, else "csv"."""
    try:
        with fs.open_input_stream(path) as f:
            head = f.read(1 << 16)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e})") from e
    first = head.split(b"\n", 1)[0]
    return "tsv" if b"\t" in first else "csv"


def dedupe_names(names: Sequence[str], path: str) -> Tuple[List[str], Dict[str, List[str]]]:
    """Header names made unique the way pandas does (``x``, ``x.1``, ``x.2``, ...), and each repeated
    name's columns in order."""
    seen: Dict[str, int] = {}
    out: List[str] = []
    groups: Dict[str, List[str]] = {}
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        new = n if k == 0 else f"{n}.{k}"
        out.append(new)
        groups.setdefault(n, []).append(new)
    if len(set(out)) != len(out):
        clash = sorted({n for n in out if out.count(n) > 1})
        raise SourceError(f"{path}: the header repeats names and also holds {clash}; rename the columns")
    return out, {n: g for n, g in groups.items() if len(g) > 1}


def expand(
    paths: Union[str, Sequence[str]], filesystem: Optional[pafs.FileSystem] = None
) -> List[Tuple[pafs.FileSystem, str]]:
    """Files named by paths, directories (recursive) and globs, sorted, each with its filesystem."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    out: List[Tuple[pafs.FileSystem, str]] = []
    for p in paths:
        fs, path = _filesystem(str(p), filesystem)
        if any(ch in path for ch in "*?["):
            base = path
            while any(ch in base for ch in "*?["):
                base = os.path.dirname(base)
            infos = fs.get_file_info(pafs.FileSelector(base or ".", recursive=True, allow_not_found=True))
            matched = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
            if not matched:
                raise SourceError(f"{p}: no file matches")
            out.extend((fs, m) for m in matched)
            continue
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"{p}: no such file or directory")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = sorted(
                i.path
                for i in infos
                if i.type == pafs.FileType.File
                and os.path.splitext(i.path)[1].lower() in _EXTENSIONS
                and not os.path.basename(i.path).startswith((".", "_"))
            )
            if not files:
                raise SourceError(f"{p}: the directory holds no .parquet, .orc, .csv or .tsv file")
            out.extend((fs, f) for f in files)
        else:
            out.append((fs, path))
    return out


def _csv_options(fmt: str, columns: Optional[Sequence[str]], schema: Any = None):
    parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
    # Id columns are read as strings, so that a column's ids never depend on the type the reader
    # infers for one file (an all-digit part as int64, the next as string): normalize_csv makes the ids.
    types = {}
    if schema is not None:
        for c in schema.sparse_columns():
            types[c] = pa.string()
            base, _, k = c.rpartition(".")
            if base and k.isdigit():
                types[base] = pa.string()
    convert = pacsv.ConvertOptions(
        strings_can_be_null=True, include_columns=list(columns) if columns else None, column_types=types
    )
    read = pacsv.ReadOptions(column_names=list(schema.column_names)) if schema is not None and schema.column_names \
        else pacsv.ReadOptions()
    return parse, convert, read


def _starts_with_header(fs: pafs.FileSystem, path: str, delimiter: str, names: Sequence[str]) -> bool:
    """Whether the file's first line is `names` (a header line in a file read with column_names, as
    when headered and header-less files of one dataset are read with one schema)."""
    with fs.open_input_stream(path) as f:
        head = f.read(1 << 16).decode("utf-8", errors="replace")
    first = head.split("\n", 1)[0].rstrip("\r")
    return [c.strip().strip('"') for c in first.split(delimiter)] == list(names)


def read_csv(fs: pafs.FileSystem, path: str, fmt: str, columns: Optional[Sequence[str]] = None,
             schema: Any = None) -> pa.Table:
    parse, convert, read = _csv_options(fmt, columns, schema)
    try:
        if schema is not None and schema.column_names and _starts_with_header(fs, path, parse.delimiter,
                                                                              schema.column_names):
            read = pacsv.ReadOptions(column_names=list(schema.column_names), skip_rows=1)
        with fs.open_input_stream(path) as f:
            return pacsv.read_csv(f, parse_options=parse, convert_options=convert, read_options=read)
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as e:
        raise SourceError(f"{path}: cannot read as {fmt.upper()} ({e})") from e


class File:
    """One open source file: its units and a reader per unit."""

    def __init__(self, fs: pafs.FileSystem, path: str, fmt: Optional[str] = None, schema: Any = None) -> None:
        self.fs, self.path = fs, path
        self.format = format_of(path, fmt, fs)
        self._csv: Optional[pa.Table] = None
        self.repeated: Dict[str, List[str]] = {}  # CSV/TSV: repeated header names -> their columns
        try:
            if self.format == "parquet":
                self._pq = pq.ParquetFile(fs.open_input_file(path))
                meta = self._pq.metadata
                self.column_names = list(self._pq.schema_arrow.names)
                self.units = [Unit(path, "parquet", i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
            elif self.format == "orc":
                self._orc = paorc.ORCFile(fs.open_input_file(path))
                self.column_names = list(self._orc.schema.names)
                self.units = [Unit(path, "orc", 0, self._orc.nrows)]
            else:
                self._csv = read_csv(fs, path, self.format, schema=schema)
                names, self.repeated = dedupe_names(self._csv.column_names, path)
                self._csv = self._csv.rename_columns(names)
                if schema is not None:
                    self._csv = normalize_csv(self._csv, schema.resolve(self.repeated), path)
                self.column_names = list(self._csv.column_names)
                self.units = [Unit(path, self.format, 0, self._csv.num_rows)]
        except (SourceError, ColumnError):
            raise
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError) as e:
            raise SourceError(f"{path}: cannot read as {self.format} ({e})") from e

    def read(self, unit: Unit, columns: Sequence[str], skip: int = 0) -> Iterator[pa.Table]:
        """The unit's rows from `skip` on, in one or more tables, with the given columns."""
        try:
            if self.format == "parquet":
                t = self._pq.read_row_group(unit.index, columns=list(columns), use_threads=True)
                yield t.slice(skip) if skip else t
            elif self.format == "orc":
                seen = 0
                for s in range(self._orc.nstripes):
                    if seen >= unit.num_rows:
                        break
                    t = self._orc.read_stripe(s, columns=list(columns))
                    t = pa.Table.from_batches([t]) if isinstance(t, pa.RecordBatch) else t
                    n = t.num_rows
                    if seen + n > skip:
                        yield t.slice(max(0, skip - seen))
                    seen += n
            else:
                assert self._csv is not None
                t = self._csv.select(list(columns))
                yield t.slice(skip) if skip else t
        except SourceError:
            raise
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise SourceError(f"{self.path}: cannot read as {self.format} ({e})") from e
