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
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.orc as paorc
import pyarrow.parquet as pq

FORMATS = ("parquet", "orc", "csv", "tsv")
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".orc": "orc", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}


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


def format_of(path: str, fmt: Optional[str]) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise SourceError(f"{path}: cannot tell the format from the extension {ext!r}; pass format=")
    return _EXTENSIONS[ext]


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


def _csv_options(fmt: str, columns: Optional[Sequence[str]]):
    parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
    convert = pacsv.ConvertOptions(strings_can_be_null=True, include_columns=list(columns) if columns else None)
    return parse, convert


def read_csv(fs: pafs.FileSystem, path: str, fmt: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    parse, convert = _csv_options(fmt, columns)
    try:
        with fs.open_input_stream(path) as f:
            return pacsv.read_csv(f, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as e:
        raise SourceError(f"{path}: cannot read as {fmt.upper()} ({e})") from e


class File:
    """One open source file: its units and a reader per unit."""

    def __init__(self, fs: pafs.FileSystem, path: str, fmt: Optional[str] = None) -> None:
        self.fs, self.path = fs, path
        self.format = format_of(path, fmt)
        self._csv: Optional[pa.Table] = None
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
                self._csv = read_csv(fs, path, self.format)
                self.column_names = list(self._csv.column_names)
                self.units = [Unit(path, self.format, 0, self._csv.num_rows)]
        except SourceError:
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
