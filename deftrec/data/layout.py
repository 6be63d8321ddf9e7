"""File layout and chunk planning (driver side: reads file heads only).

This module owns what the driver learns before any row is parsed: the input file checks, the
resolution of configured columns against a file's header (``FileLayout``) and the split of a file
into byte ranges aligned to line starts or Parquet row groups (``Chunk``).

File-level rules (each an ``InputError`` naming the file): a header (or Parquet schema) that
names a column twice; a configured Parquet column that is not a scalar (list, struct, map...);
a header that opens a quoted field it does not close. A UTF-8 byte order mark before the header
is ignored. A file in an encoding that cannot be cut at ``b"\\n"`` (UTF-16, UTF-32, ...) is read
from its UTF-8 copy (``FileLayout.data_path``, see ``deftrec.data.transcode``); messages and
rejects still name the original file.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from deftrec.config.data import PreprocessConfig
from deftrec.data.readers import InputError
from deftrec.data.records import ends_in_quote, parse_record, read_continuation
from deftrec.data.transcode import splits_on_newline_bytes


@dataclasses.dataclass
class FileLayout:
    """What the driver learned from a file's head: field positions and the expected field count."""

    path: str
    file_idx: int
    n_fields: int  # 0 = not applicable (jsonl / parquet)
    positions: dict  # role -> position (text) or column name (jsonl/parquet)
    data_start: int  # byte offset of the first data line
    first_line: int  # 1-based line number of the first data line
    data_path: str = ""  # the file whose bytes are read: ``path`` itself, or its UTF-8 copy
    data_encoding: str = "utf-8"  # the encoding of data_path's bytes

    def __post_init__(self):
        self.data_path = self.data_path or self.path

    @property
    def transcoded(self) -> bool:
        """Whether the bytes come from a UTF-8 copy (its undecodable bytes are ``transcode.BAD_BYTES`` marks)."""
        return self.data_path != self.path


@dataclasses.dataclass
class Chunk:
    layout: FileLayout
    start: int  # byte range [start, end) or row group index for parquet
    end: int
    first_line: int = 0  # filled after line counting
    start_in_quote: bool = False  # CSV: the range starts inside a quoted field opened before it
    rows: int = 0  # parquet: rows of the row group


def check_file(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{path}: file does not exist")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected a file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: file is empty")


def _read_first_line(path: str, data_path: str, encoding: str, declared: str) -> tuple[str, int, int]:
    """-> (line 1 without EOL or byte order mark, its bytes, the byte order mark's bytes)."""
    with open(data_path, "rb") as f:
        raw = f.readline()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        where = f" (byte {e.start})" if data_path == path else ""  # a copy's offsets are not the file's
        raise InputError(f"{path}: line 1: header is not valid {declared}{where}; "
                         f"pass --encoding if the file uses another encoding") from None
    bom = len(b"\xef\xbb\xbf") if text.startswith("\ufeff") and raw.startswith(b"\xef\xbb\xbf") else 0
    return text.rstrip("\r\n").lstrip("\ufeff"), len(raw), bom


def _split_header(path: str, text: str, delim: str) -> list[str]:
    if len(delim) == 1:
        row = parse_record(text, delim)
        if row is None:
            raise InputError(f"{path}: line 1: not a readable CSV record")
        return [c.strip() for c in row]
    return [c.strip().strip('"') for c in text.split(delim)]


def check_unique_names(path: str, names: list[str], where: str = "line 1 (header)") -> None:
    """A column named twice would silently read the first one: refuse the file instead."""
    dup = [n for n, k in Counter(names).items() if k > 1 and n != ""]
    if dup:
        raise InputError(f"{path}: {where}: column {dup[0]!r} appears {names.count(dup[0])} times; "
                         f"column names must be unique")


def is_scalar_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    checks = ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary", "is_binary_view",
              "is_fixed_size_binary", "is_integer", "is_floating", "is_decimal", "is_boolean", "is_timestamp",
              "is_date", "is_null")
    return any(getattr(pa.types, c, lambda _: False)(t) for c in checks)


def check_scalar_columns(path: str, schema: pa.Schema, roles: dict) -> None:
    for role, name in roles.items():
        t = schema.field(name).type
        if not is_scalar_type(t):
            raise InputError(f"{path}: column {name!r} ({role}) has type {t}; expected a string, number, boolean, "
                             f"timestamp or date column (one value per row)")


def needs_transcoding(cfg: PreprocessConfig) -> bool:
    """Whether text inputs must be read from a UTF-8 copy (``deftrec.data.transcode``)."""
    return cfg.format != "parquet" and not splits_on_newline_bytes(cfg.encoding)


def plan_layout(cfg: PreprocessConfig, path: str, file_idx: int, data_path: str | None = None) -> FileLayout:
    """Resolve the columns of one input file against the config; raise InputError naming the file.
    ``data_path``: the file's UTF-8 copy, required when :func:`needs_transcoding`."""
    check_file(path)
    if data_path is None and needs_transcoding(cfg):
        raise ValueError(f"{path}: {cfg.encoding} input is read from a UTF-8 copy; pass data_path "
                         f"(deftrec.data.transcode.transcode_to_utf8)")
    read = {"data_path": data_path or path, "data_encoding": "utf-8" if data_path else cfg.encoding}
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
        check_unique_names(path, schema.names, "schema")
        check_scalar_columns(path, schema, roles)
        return FileLayout(path, file_idx, 0, roles, 0, 1, **read)
    if cfg.format == "jsonl":
        return FileLayout(path, file_idx, 0, roles, 0, 1, **read)
    first, nbytes, bom = _read_first_line(path, read["data_path"], read["data_encoding"], cfg.encoding)
    if not first.strip():
        raise InputError(f"{path}: line 1 is empty; expected {'a header' if cfg.header else 'data'}")
    if len(cfg.delimiter) == 1 and ends_in_quote(first, cfg.delimiter, False):
        if cfg.header:
            raise InputError(f"{path}: line 1: a quoted field is not closed on the line (a header cannot span lines)")
        # without a header the first record is data, and a data record may span lines: count its fields
        more, _, _ = read_continuation(read["data_path"], nbytes, read["data_encoding"], cfg.delimiter)
        first = "\n".join([first, *more])
    fields = _split_header(path, first, cfg.delimiter)
    if cfg.header:
        check_unique_names(path, fields)
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
        return FileLayout(path, file_idx, len(fields), positions, nbytes, 2, **read)
    positions = {}
    for role, name in roles.items():
        if not str(name).isdigit():
            raise InputError(f"{path}: the file has no header, so column {role} must be a 0-based position, "
                             f"got {name!r}")
        if int(name) >= len(fields):
            raise InputError(f"{path}: line 1 has {len(fields)} fields; column {role} at position {name} "
                             f"does not exist")
        positions[role] = int(name)
    return FileLayout(path, file_idx, len(fields), positions, bom, 1, **read)


def _fmt_missing(missing: dict) -> str:
    return ", ".join(f"{role}={name!r}" for role, name in missing.items())


def plan_chunks(layout: FileLayout, chunk_bytes: int, fmt: str) -> list[Chunk]:
    """Byte ranges aligned to line starts (or Parquet row groups)."""
    if fmt == "parquet":
        md = pq.ParquetFile(layout.path).metadata
        chunks, row = [], 0
        for rg in range(md.num_row_groups):
            chunks.append(Chunk(layout, rg, rg + 1, first_line=row + 1, rows=md.row_group(rg).num_rows))
            row += md.row_group(rg).num_rows
        return chunks
    size = os.path.getsize(layout.data_path)
    bounds = [layout.data_start]
    with open(layout.data_path, "rb") as f:
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
