"""Readers: turn input files into validated interaction rows, chunk by chunk.

Every reader produces, per chunk, two Arrow tables:
- valid rows: ``user_id`` str, ``item_id`` str, ``timestamp`` int64, ``rating`` float64 (nullable),
  ``_ord`` int64 (file index << 40 | line number: the global input order, used for stable ties),
  ``_bucket`` int32 (user hash partition);
- rejected rows: ``file``, ``line``, ``field``, ``reason``, ``raw`` (the original line).

Text formats are split into byte ranges on line boundaries; lines and fields are handled with
vectorised Arrow kernels, never as one Python object per row (except the JSONL decoder and the
error path of a chunk that holds invalid UTF-8).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deftrec.config.data import PreprocessConfig

ORD_SHIFT = 40  # _ord = file_idx << 40 | line: 1e12 lines per file, 8M files

VALID_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()),
    ("rating", pa.float64()), ("_ord", pa.int64()), ("_bucket", pa.int32()),
])
REJECT_SCHEMA = pa.schema([
    ("file", pa.string()), ("line", pa.int64()), ("field", pa.string()),
    ("reason", pa.string()), ("raw", pa.string()),
])

_INT_RE = r"^[+-]?\d+$"
_FLOAT_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_TS_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d")


class InputError(ValueError):
    """Bad input that cannot be handled row by row (missing file, unknown column, ...)."""


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


# --------------------------------------------------------------------------------------------
# Planning (driver side: reads file heads only)


def _check_file(path: str) -> None:
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
    _check_file(path)
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


def _is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


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


# --------------------------------------------------------------------------------------------
# Shared vectorised helpers


def hash_strings(arr: pa.Array) -> np.ndarray:
    """Deterministic 64-bit polynomial hash of each string (platform- and process-independent)."""
    arr = pc.cast(arr, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4).astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    start, stop = offsets[0], offsets[-1]
    body = data[start:stop].astype(np.uint64)
    lengths = np.diff(offsets)
    pos = np.arange(stop - start, dtype=np.int64) - np.repeat(offsets[:-1] - start, lengths)
    maxlen = int(lengths.max()) if n else 0
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(max(maxlen, 1), np.uint64(1099511628211), dtype=np.uint64), dtype=np.uint64)
        terms = (body + np.uint64(1)) * powers[pos] if len(body) else body
        h = np.zeros(n, np.uint64)
        nz = lengths > 0
        if nz.any():
            sums = np.add.reduceat(terms, (offsets[:-1] - start)[nz])
            h[nz] = sums
        # final avalanche (splitmix64) so nearby ids spread across buckets
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def bucket_of(users: pa.Array, num_buckets: int) -> np.ndarray:
    if num_buckets <= 1:
        return np.zeros(len(users), np.int32)
    # Hash each distinct id once: a chunk holds far fewer users than rows.
    enc = pc.dictionary_encode(pc.cast(users, pa.string()))
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    per_key = (hash_strings(enc.dictionary) % np.uint64(num_buckets)).astype(np.int32)
    return per_key[enc.indices.to_numpy(zero_copy_only=False)]


def _clean_field(arr: pa.Array) -> pa.Array:
    """Trim whitespace and surrounding double quotes (ids never legitimately start or end with them)."""
    return pc.utf8_trim(arr, characters=' \t\r"')


def parse_timestamps(arr: pa.Array, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (int64 values, ok mask). 'auto' accepts integers, decimals (floored) and ISO dates."""
    arr = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
    n = len(arr)
    values = np.zeros(n, np.int64)
    ok = np.zeros(n, bool)
    if fmt in ("auto", "unix", "unix_ms"):
        try:  # fast path: every value is an integer
            return pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False), np.ones(n, bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        is_int = pc.fill_null(pc.match_substring_regex(arr, _INT_RE), False).to_numpy(zero_copy_only=False)
        if is_int.any():
            values[is_int] = pc.cast(pc.filter(arr, pa.array(is_int)), pa.int64()).to_numpy()
            ok |= is_int
        is_float = ~ok & pc.fill_null(pc.match_substring_regex(arr, _FLOAT_RE), False).to_numpy(zero_copy_only=False)
        if is_float.any():
            values[is_float] = np.floor(pc.cast(pc.filter(arr, pa.array(is_float)), pa.float64()).to_numpy()).astype(np.int64)
            ok |= is_float
        formats = _TS_FORMATS if fmt == "auto" else ()
    else:
        formats = (fmt,)
    for f in formats:
        todo = ~ok
        if not todo.any():
            break
        sub = pc.filter(arr, pa.array(todo))
        parsed = pc.strptime(sub, format=f, unit="s", error_is_null=True)
        good = pc.is_valid(parsed).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(todo)
        values[idx[good]] = pc.cast(pc.filter(parsed, good), pa.int64()).to_numpy()
        ok[idx[good]] = True
    return values, ok


def parse_ratings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (float64 values, null mask for empty fields, ok mask)."""
    arr = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
    empty = pc.fill_null(pc.equal(arr, ""), True).to_numpy(zero_copy_only=False)
    if not empty.any():
        try:  # fast path: every value is a number
            return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), empty, np.ones(len(arr), bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    is_num = pc.fill_null(pc.match_substring_regex(arr, _FLOAT_RE), False).to_numpy(zero_copy_only=False)
    values = np.full(len(arr), np.nan)
    if is_num.any():
        values[is_num] = pc.cast(pc.filter(arr, pa.array(is_num)), pa.float64()).to_numpy()
    return values, empty, is_num | empty


class _Rejects:
    """Accumulates the first failing reason per row."""

    def __init__(self, n: int):
        self.reason = np.full(n, None, dtype=object)
        self.field = np.full(n, None, dtype=object)

    def mark(self, mask: np.ndarray, reason: str, field: str) -> None:
        sel = mask & (self.reason == None)  # noqa: E711 - elementwise comparison on object array
        self.reason[sel] = reason
        self.field[sel] = field

    @property
    def ok(self) -> np.ndarray:
        return self.reason == None  # noqa: E711


def validate_fields(path: str, file_idx: int, lines: np.ndarray, raw: pa.Array, fields: dict,
                    cfg: PreprocessConfig, catalog_ids: Optional[pa.Array], rej: _Rejects,
                    num_buckets: int) -> tuple[pa.Table, pa.Table]:
    """Typed validation shared by all row formats. ``fields`` maps role -> string array (nullable)."""
    cols = cfg.columns
    user = fields["user"]
    item = fields["item"]
    rej.mark(pc.fill_null(pc.equal(user, ""), True).to_numpy(zero_copy_only=False), "missing user id", cols.user)
    rej.mark(pc.fill_null(pc.equal(item, ""), True).to_numpy(zero_copy_only=False), "missing item id", cols.item)
    ts, ts_ok = parse_timestamps(fields["timestamp"], cfg.timestamp_format)
    ts_missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(pc.cast(fields["timestamp"], pa.string())), ""),
                              True).to_numpy(zero_copy_only=False)
    rej.mark(ts_missing, "missing timestamp", cols.timestamp)
    rej.mark(~ts_ok, "unparseable timestamp", cols.timestamp)
    if "rating" in fields:
        rating, rating_null, rating_ok = parse_ratings(fields["rating"])
        rej.mark(~rating_ok, "unparseable rating", cols.rating)
    else:
        rating = np.full(len(user), np.nan)
        rating_null = np.ones(len(user), bool)
    if catalog_ids is not None:
        known = pc.fill_null(pc.is_in(item, value_set=catalog_ids), False).to_numpy(zero_copy_only=False)
        rej.mark(~known, "item not in catalog", cols.item)
    ok = rej.ok
    okm = pa.array(ok)
    users_ok = pc.filter(user, okm)
    valid = pa.table({
        "user_id": pc.cast(users_ok, pa.string()),
        "item_id": pc.cast(pc.filter(item, okm), pa.string()),
        "timestamp": pa.array(ts[ok], pa.int64()),
        "rating": pa.array(rating[ok], pa.float64(), mask=rating_null[ok]),
        "_ord": pa.array((np.int64(file_idx) << ORD_SHIFT) | lines[ok].astype(np.int64), pa.int64()),
        "_bucket": pa.array(bucket_of(users_ok, num_buckets), pa.int32()),
    }, schema=VALID_SCHEMA)
    bad = ~ok
    rejects = _reject_table(path, lines[bad], rej.field[bad], rej.reason[bad], pc.filter(raw, pa.array(bad)))
    return valid, rejects


def _reject_table(path, lines, fields, reasons, raw) -> pa.Table:
    n = len(lines)
    return pa.table({
        "file": pa.array([path] * n, pa.string()),
        "line": pa.array(np.asarray(lines, np.int64), pa.int64()),
        "field": pa.array(list(fields), pa.string()),
        "reason": pa.array(list(reasons), pa.string()),
        "raw": pc.cast(raw, pa.string()) if not isinstance(raw, list) else pa.array(raw, pa.string()),
    }, schema=REJECT_SCHEMA)


def empty_valid() -> pa.Table:
    return VALID_SCHEMA.empty_table()


def empty_rejects() -> pa.Table:
    return REJECT_SCHEMA.empty_table()


# --------------------------------------------------------------------------------------------
# Chunk parsers (run inside Ray tasks)


def _read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _lines_from_bytes(data: bytes, path: str, first_line: int, encoding: str):
    """-> (lines StringArray without EOL, line numbers, invalid-encoding rejects)."""
    if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        try:
            data = data.decode(encoding).encode("utf-8")
            bad_lines = None
        except UnicodeDecodeError:
            data, bad_lines = _repair_lines(data, encoding)
    else:
        bad_lines = None
    buf = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(buf == 10)
    ends = np.r_[nl + 1, len(data)] if (len(data) and data[-1:] != b"\n") else nl + 1
    offsets = np.r_[0, ends].astype(np.int32)
    n = len(offsets) - 1
    binary = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
    numbers = first_line + np.arange(n, dtype=np.int64)
    try:
        text = binary.cast(pa.string())
        invalid = np.zeros(n, bool)
    except pa.ArrowInvalid:
        # Slow path for the rare chunk with invalid UTF-8: find the offending lines one by one.
        py = binary.to_pylist()
        invalid = np.zeros(n, bool)
        fixed = []
        for i, b in enumerate(py):
            try:
                fixed.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                invalid[i] = True
                fixed.append(b.decode("utf-8", errors="backslashreplace"))
        text = pa.array(fixed, pa.string())
    if bad_lines is not None:
        invalid |= bad_lines[:n]
    text = pc.utf8_rtrim(text, characters="\r\n")
    return text, numbers, invalid


def _repair_lines(data: bytes, encoding: str):
    """Decode line by line in a non-UTF-8 encoding; undecodable lines are flagged, not dropped."""
    out, bad = [], []
    for line in data.split(b"\n"):
        try:
            out.append(line.decode(encoding))
            bad.append(False)
        except UnicodeDecodeError:
            out.append(line.decode(encoding, errors="backslashreplace"))
            bad.append(True)
    text = "\n".join(out).encode("utf-8")
    return text, np.array(bad, bool)


def parse_text_chunk(chunk: Chunk, cfg: PreprocessConfig, catalog_ids, num_buckets: int):
    lay = chunk.layout
    data = _read_range(lay.path, chunk.start, chunk.end)
    text, numbers, invalid = _lines_from_bytes(data, lay.path, chunk.first_line, cfg.encoding)
    blank = pc.equal(pc.utf8_trim_whitespace(text), "").to_numpy(zero_copy_only=False)
    stats = {"lines": int(len(text)), "blank_lines": int(blank.sum())}
    keep = ~blank
    text, numbers, invalid = pc.filter(text, pa.array(keep)), numbers[keep], invalid[keep]
    rej = _Rejects(len(text))
    rej.mark(invalid, f"invalid {cfg.encoding} bytes", "*")
    if cfg.format == "jsonl":
        fields = _jsonl_fields(text, lay, rej)
    else:
        parts = pc.split_pattern(text, pattern=cfg.delimiter)
        nf = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
        wrong = nf != lay.n_fields
        rej.mark(wrong, f"wrong field count (expected {lay.n_fields})", "*")
        # Rows with the wrong count get placeholder fields so list_element stays in bounds.
        safe = pc.if_else(pa.array(wrong), pa.scalar([""] * lay.n_fields, pa.list_(pa.string())), parts)
        fields = {role: _clean_field(pc.list_element(safe, pos)) for role, pos in lay.positions.items()}
    valid, rejects = validate_fields(lay.path, lay.file_idx, numbers, text, fields, cfg, catalog_ids, rej,
                                     num_buckets)
    stats["rows"] = int(len(text))
    return valid, rejects, stats


def _jsonl_fields(text: pa.Array, lay: FileLayout, rej: _Rejects) -> dict:
    n = len(text)
    vals = {role: [None] * n for role in lay.positions}
    for i, line in enumerate(text.to_pylist()):
        if rej.reason[i] is not None:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rej.reason[i], rej.field[i] = f"invalid JSON ({e.msg} at column {e.colno})", "*"
            continue
        if not isinstance(obj, dict):
            rej.reason[i], rej.field[i] = "JSON line is not an object", "*"
            continue
        for role, key in lay.positions.items():
            v = obj.get(key)
            if v is None:
                if role != "rating":
                    rej.reason[i], rej.field[i] = f"missing field {key!r}", key
                    break
                v = ""
            vals[role][i] = str(v) if not isinstance(v, str) else v
    return {role: pc.fill_null(pa.array(v, pa.string()), "") for role, v in vals.items()}


def parse_parquet_chunk(chunk: Chunk, cfg: PreprocessConfig, catalog_ids, num_buckets: int):
    lay = chunk.layout
    pf = pq.ParquetFile(lay.path)
    tbl = pf.read_row_group(chunk.start, columns=list(dict.fromkeys(lay.positions.values())))
    n = tbl.num_rows
    numbers = chunk.first_line + np.arange(n, dtype=np.int64)
    fields = {}
    for role, col in lay.positions.items():
        arr = tbl.column(col).combine_chunks()
        if pa.types.is_timestamp(arr.type):
            arr = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64())
        fields[role] = pc.fill_null(pc.cast(arr, pa.string()), "")
    raw = pc.binary_join_element_wise(*[fields[r] for r in lay.positions], "\t")
    rej = _Rejects(n)
    valid, rejects = validate_fields(lay.path, lay.file_idx, numbers, raw, fields, cfg, catalog_ids, rej, num_buckets)
    return valid, rejects, {"lines": n, "blank_lines": 0, "rows": n}


def parse_chunk(chunk: Chunk, cfg: PreprocessConfig, catalog_ids, num_buckets: int):
    if cfg.format == "parquet":
        return parse_parquet_chunk(chunk, cfg, catalog_ids, num_buckets)
    return parse_text_chunk(chunk, cfg, catalog_ids, num_buckets)


# --------------------------------------------------------------------------------------------
# Catalogs


@dataclasses.dataclass
class RawCatalog:
    """Item metadata: ``key`` is the id used in the log, ``item_id`` the original id shown to users."""

    table: pa.Table  # key, item_id, title, category, (index for 'preserve' mapping)
    rejects: pa.Table
    source: str


def read_catalog(cfg: PreprocessConfig, path: str) -> RawCatalog:
    _check_file(path)
    cc = cfg.catalog_columns
    if cfg.format == "movielens" or (path.endswith(".dat")):
        rows, numbers = _read_delimited_python(path, "::", cfg.encoding, header=False)
        names = [str(i) for i in range(max((len(r) for r in rows), default=0))]
    elif path.endswith(".parquet") or _is_parquet(path):
        t = pq.read_table(path)
        names = t.column_names
        rows = [list(map(lambda v: "" if v is None else str(v), r.values())) for r in t.to_pylist()]
        numbers = list(range(1, len(rows) + 1))
        return _catalog_from_rows(path, names, rows, numbers, cc, header_line=False)
    elif path.endswith(".jsonl") or path.endswith(".json"):
        rows_obj, numbers = [], []
        with open(path, encoding=cfg.encoding) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows_obj.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
                    numbers.append(i)
        names = sorted({k for o in rows_obj for k in o})
        rows = [["" if o.get(k) is None else str(o.get(k)) for k in names] for o in rows_obj]
        return _catalog_from_rows(path, names, rows, numbers, cc, header_line=False)
    else:
        delim = "\t" if path.endswith(".tsv") else ","
        all_rows, numbers = _read_delimited_python(path, delim, cfg.encoding, header=True)
        names, rows, numbers = [c.strip() for c in all_rows[0]], all_rows[1:], numbers[1:]
        return _catalog_from_rows(path, names, rows, numbers, cc, header_line=True)
    return _catalog_from_rows(path, names, rows, numbers, cc, header_line=False)


def _read_delimited_python(path: str, delim: str, encoding: str, header: bool):
    """Full CSV parsing (quotes, embedded newlines) for catalogs, which are small."""
    try:
        with open(path, encoding=encoding, newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        line = _line_of_offset(path, e.start)
        raise InputError(f"{path}: line {line}: bytes that are not valid {encoding} "
                         f"(offset {e.start}); pass --encoding if the file uses another encoding") from None
    if len(delim) == 1:
        reader = csv.reader(io.StringIO(text), delimiter=delim, quotechar='"')
        rows, numbers = [], []
        for r in reader:
            numbers.append(reader.line_num)
            rows.append(r)
        # reader.line_num is the line where a record ends; we want where it starts
        starts = [1] + [n + 1 for n in numbers[:-1]]
        keep = [i for i, r in enumerate(rows) if r]
        return [rows[i] for i in keep], [starts[i] for i in keep]
    rows, numbers = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            rows.append(line.split(delim))
            numbers.append(i)
    return rows, numbers


def _line_of_offset(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _catalog_from_rows(path, names, rows, numbers, cc, header_line: bool) -> RawCatalog:
    def pos(name, role, required):
        if name is None:
            if required:
                raise InputError(f"{path}: catalog column for {role} is not configured")
            return None
        if name in names:
            return names.index(name)
        if str(name).isdigit() and int(name) < max(len(names), 1):
            return int(name)
        if required or role == "category":
            hint = " (a catalog without titles cannot be used: the prompts need them)" if role == "title" else ""
            raise InputError(f"{path}: catalog has no {role} column {name!r}; columns are {names}{hint}")
        return None

    if not rows:
        raise InputError(f"{path}: catalog has no rows")
    pi, pt = pos(cc.item, "item id", True), pos(cc.title, "title", True)
    pcat = pos(cc.category, "category", False) if cc.category else None
    width = len(names) if header_line else None
    keys, titles, cats, rej = [], [], [], []
    seen = {}
    for r, line in zip(rows, numbers):
        if width is not None and len(r) != width:
            rej.append((line, "*", f"wrong field count (expected {width}, got {len(r)})", " ".join(r)))
            continue
        need = max(pi, pt, pcat if pcat is not None else 0)
        if len(r) <= need:
            rej.append((line, "*", f"wrong field count (expected > {need})", " ".join(r)))
            continue
        key, title = r[pi].strip(), r[pt]
        if not key:
            rej.append((line, cc.item, "catalog: missing item id", " ".join(r)))
            continue
        if not title.strip():
            rej.append((line, cc.title, "catalog: missing title", " ".join(r)))
            continue
        if key in seen:
            rej.append((line, cc.item, f"catalog: duplicate item id (first on line {seen[key]})", " ".join(r)))
            continue
        seen[key] = line
        keys.append(key)
        titles.append(title)
        # kept verbatim (even empty): the published datasets must round-trip exactly
        cats.append(r[pcat] if pcat is not None else "unknown")
    if not keys:
        raise InputError(f"{path}: catalog has no valid rows ({len(rej)} rejected, first: line {rej[0][0]}: {rej[0][2]})")
    table = pa.table({"key": keys, "item_id": keys, "title": titles, "category": cats})
    rejects = pa.table({
        "file": [path] * len(rej), "line": pa.array([x[0] for x in rej], pa.int64()),
        "field": [x[1] for x in rej], "reason": [x[2] for x in rej], "raw": [x[3] for x in rej],
    }, schema=REJECT_SCHEMA)
    return RawCatalog(table, rejects, path)


# --------------------------------------------------------------------------------------------
# The published sequence format (../shared/data/*)


def read_deftrec_folder(folder: str, num_buckets: int):
    """train.txt/test.txt/item_list.txt/user_list.txt -> (valid rows, rejects, catalog, user ids, stats).

    The log key of an item is its ``remap_id`` and of a user the line's first field; the catalog maps
    remap_id to the original id, title and category, and ``user_list.txt`` maps users likewise.
    """
    folder = str(folder)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: format 'deftrec' expects a folder with train.txt, test.txt, item_list.txt")
    paths = {n: os.path.join(folder, n) for n in ("train.txt", "test.txt", "item_list.txt", "user_list.txt")}
    for n in ("train.txt", "test.txt", "item_list.txt"):
        _check_file(paths[n])
    # item_list.txt: space separated, quoted fields, header names the columns (order varies).
    rows, numbers = _read_delimited_python(paths["item_list.txt"], " ", "utf-8", header=True)
    header, rows, numbers = rows[0], rows[1:], numbers[1:]
    for col in ("org_id", "remap_id", "title", "category"):
        if col not in header:
            raise InputError(f"{paths['item_list.txt']}: line 1 (header): no column {col!r}; header is {header}")
    from deftrec.config.data import CatalogColumnsConfig
    cat = _catalog_from_rows(paths["item_list.txt"], header, rows, numbers,
                             CatalogColumnsConfig(item="remap_id", title="title", category="category"), True)
    org = {r[header.index("remap_id")].strip(): r[header.index("org_id")] for r in rows
           if len(r) == len(header)}
    keys = cat.table.column("key").to_pylist()
    bad_keys = [k for k in keys if not k.isdigit()]
    if bad_keys:
        raise InputError(f"{paths['item_list.txt']}: remap_id must be a non-negative integer, got {bad_keys[0]!r}")
    cat.table = cat.table.set_column(1, "item_id", pa.array([org[k] for k in keys], pa.string()))
    user_ids = {}
    if os.path.exists(paths["user_list.txt"]):
        urows, unum = _read_delimited_python(paths["user_list.txt"], " ", "utf-8", header=True)
        uh = urows[0]
        if "org_id" not in uh or "remap_id" not in uh:
            raise InputError(f"{paths['user_list.txt']}: line 1 (header): expected org_id and remap_id, got {uh}")
        for r in urows[1:]:
            user_ids[r[uh.index("remap_id")]] = r[uh.index("org_id")]

    def read_lines(p):
        with open(p, encoding="utf-8") as f:
            return [(i, ln.split()) for i, ln in enumerate(f, 1) if ln.strip()]

    train = {}
    for i, parts in read_lines(paths["train.txt"]):
        train[parts[0]] = (i, parts[1:])
    users, items, positions, ords, rejects = [], [], [], [], []
    valid_items = set(keys)
    seen_users = set()
    test_path = paths["test.txt"]
    for i, parts in read_lines(test_path):
        u, seq = parts[0], parts[1:]
        if not u.isdigit():
            raise InputError(f"{test_path}: line {i}: field user: {u!r} is not a user index")
        if u in seen_users:
            raise InputError(f"{test_path}: line {i}: user {u} appears twice")
        seen_users.add(u)
        if u not in train:
            raise InputError(f"{test_path}: line {i}: user {u} has no line in train.txt")
        tl, tseq = train[u]
        if tseq != seq[:-1]:
            raise InputError(f"{test_path}: line {i}: user {u}: the sequence is not train.txt line {tl} plus one "
                             f"test item")
        unknown = [x for x in seq if x not in valid_items]
        if unknown:
            rejects.append((i, "item", f"item not in catalog ({unknown[0]})", " ".join(parts)))
            continue
        users.extend([u] * len(seq))
        items.extend(seq)
        positions.extend(range(len(seq)))
        ords.extend([(i << 20) | k for k in range(len(seq))])
    missing_test = sorted(set(train) - seen_users, key=int)
    if missing_test:
        raise InputError(f"{paths['train.txt']}: line {train[missing_test[0]][0]}: user {missing_test[0]} has no "
                         f"line in test.txt ({len(missing_test)} such users)")
    if not users:
        raise InputError(f"{test_path}: no valid sequences")
    uarr = pa.array(users, pa.string())
    valid = pa.table({
        "user_id": uarr, "item_id": pa.array(items, pa.string()),
        "timestamp": pa.array(positions, pa.int64()), "rating": pa.nulls(len(users), pa.float64()),
        "_ord": pa.array(ords, pa.int64()), "_bucket": pa.array(bucket_of(uarr, num_buckets), pa.int32()),
    }, schema=VALID_SCHEMA)
    rej = _reject_table(test_path, [r[0] for r in rejects], [r[1] for r in rejects], [r[2] for r in rejects],
                        [r[3] for r in rejects])
    rej = pa.concat_tables([cat.rejects, rej])
    stats = {"lines": len(seen_users) + len(rejects), "blank_lines": 0, "rows": len(users)}
    return valid, rej, cat, user_ids, stats
