"""File layout and chunk planning (driver side: reads file heads only).

This module owns what the driver learns before any row is parsed: the input file checks, the
resolution of configured columns against a file's header (``FileLayout``), the split of a file
into byte ranges aligned to line starts or Parquet row groups (``Chunk``), and the line counting
that turns those ranges into absolute line numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import pyarrow.parquet as pq

from deftrec.config.data import PreprocessConfig
from deftrec.data.readers import InputError


@dataclasses.dataclass
class FileLayout:
    """What the driver learned from a file's head: field positions and the expected field count."""

    path: str
    file_idx: int
    n_fields: int  # 0 = not applicable (jsonl / parquet)
    positions: dict  # role -> position (text) or column name (jsonl/parquet)
    data_start: int  # byte offset of the first data line
    first_line: int  # 1-based line number of the first data line


@dataclasses.dataclass
class Chunk:
    layout: FileLayout
    start: int  # byte range [start, end) or row group index for parquet
    end: int
    first_line: int = 0  # filled after line counting


def check_file(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{path}: file does not exist")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected a file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: file is empty")


def _read_first_line(path: str, encoding: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        raw = f.readline()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: line 1: header is not valid {encoding} (byte {e.start}); "
                         f"pass --encoding if the file uses another encoding") from None
    return text.rstrip("\r\n"), len(raw)


def _split_header(text: str, delim: str) -> list[str]:
    if len(delim) == 1:
        return [c.strip() for c in next(csv.reader([text], delimiter=delim))]
    return [c.strip().strip('"') for c in text.split(delim)]


def plan_layout(cfg: PreprocessConfig, path: str, file_idx: int) -> FileLayout:
    """Resolve the columns of one input file against the config; raise InputError naming the file."""
    check_file(path)
    cols = cfg.columns
    roles = {"user": cols.user, "item": cols.item, "timestamp": cols.timestamp}
    if cols.rating:
        roles["rating"] = cols.rating
    if cfg.format == "parquet":
        try:
            schema = pq.read_schema(path)
        except Exception as e:  # pyarrow raises several types for non-parquet files
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        missing = {r: c for r, c in roles.items() if c not in schema.names}
        if missing:
            raise InputError(f"{path}: missing column(s) {_fmt_missing(missing)}; the file has {schema.names}")
        return FileLayout(path, file_idx, 0, roles, 0, 1)
    if cfg.format == "jsonl":
        return FileLayout(path, file_idx, 0, roles, 0, 1)
    first, nbytes = _read_first_line(path, cfg.encoding)
    if not first.strip():
        raise InputError(f"{path}: line 1 is empty; expected {'a header' if cfg.header else 'data'}")
    fields = _split_header(first, cfg.delimiter)
    if cfg.header:
        positions = {}
        missing = {}
        for role, name in roles.items():
            if name in fields:
                positions[role] = fields.index(name)
            elif name.isdigit() and int(name) < len(fields):
                positions[role] = int(name)
            else:
                missing[role] = name
        if missing:
            raise InputError(f"{path}: line 1 (header): missing column(s) {_fmt_missing(missing)}; "
                             f"the header has {fields} (set --user-col/--item-col/--time-col/--rating-col)")
        return FileLayout(path, file_idx, len(fields), positions, nbytes, 2)
    positions = {}
    for role, name in roles.items():
        if not str(name).isdigit():
            raise InputError(f"{path}: the file has no header, so column {role} must be a 0-based position, "
                             f"got {name!r}")
        if int(name) >= len(fields):
            raise InputError(f"{path}: line 1 has {len(fields)} fields; column {role} at position {name} "
                             f"does not exist")
        positions[role] = int(name)
    return FileLayout(path, file_idx, len(fields), positions, 0, 1)


def _fmt_missing(missing: dict) -> str:
    return ", ".join(f"{role}={name!r}" for role, name in missing.items())


def plan_chunks(layout: FileLayout, chunk_bytes: int, fmt: str) -> list[Chunk]:
    """Byte ranges aligned to line starts (or Parquet row groups)."""
    if fmt == "parquet":
        md = pq.ParquetFile(layout.path).metadata
        chunks, row = [], 0
        for rg in range(md.num_row_groups):
            chunks.append(Chunk(layout, rg, rg + 1, first_line=row + 1))
            row += md.row_group(rg).num_rows
        return chunks
    size = os.path.getsize(layout.path)
    bounds = [layout.data_start]
    with open(layout.path, "rb") as f:
        pos = layout.data_start + chunk_bytes
        while pos < size:
            f.seek(pos)
            rest = f.readline()  # move to the next line start
            pos = f.tell()
            if pos >= size or not rest:
                break
            bounds.append(pos)
            pos += chunk_bytes
    bounds.append(size)
    return [Chunk(layout, s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def count_lines(path: str, start: int, end: int) -> int:
    """Number of lines in a byte range (a last line without newline counts)."""
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            buf = f.read(min(remaining, 1 << 24))
            if not buf:
                break
            n += buf.count(b"\n")
            last = buf[-1:]
            remaining -= len(buf)
    return n + (0 if last == b"\n" else 1)
