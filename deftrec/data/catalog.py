"""Item catalogs: reading item metadata files into a ``RawCatalog``.

This module owns the catalog side of the input: detecting the catalog's format (MovieLens
``.dat``, Parquet, JSONL, CSV/TSV), full CSV parsing with quotes and embedded newlines (catalogs
are small, so they are parsed in Python), resolving the configured id/title/category columns,
and rejecting catalog rows.

Rules: only the id and the title columns are required; a missing category column leaves the
category empty. A catalog row is rejected (``rejects/catalog.parquet``, counted under
``catalog_rejected``) for a wrong field count, a missing id or title, a duplicate id, bytes that
are not valid in the file's encoding, a CSV record ``csv`` cannot read, or, in JSONL, a line that
is not a JSON object, is nested too deeply, or holds a list/object where a column's value should
be. File-level problems (no header, a column named twice, a non-scalar Parquet column, no valid
row) are ``InputError`` naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from deftrec.config.data import PreprocessConfig
from deftrec.data.layout import check_file, check_scalar_columns, check_unique_names
from deftrec.data.readers import REJECT_SCHEMA, InputError
from deftrec.data.transcode import decode_text, decoded_lines, has_bad_bytes, show_bad_bytes
from deftrec.data.validation import column_strings


@dataclasses.dataclass
class RawCatalog:
    """Item metadata: ``key`` is the id used in the log, ``item_id`` the original id shown to users."""

    table: pa.Table  # key, item_id, title, category, (index for 'preserve' mapping)
    rejects: pa.Table
    source: str


def read_catalog(cfg: PreprocessConfig, path: str) -> RawCatalog:
    check_file(path)
    cc = cfg.catalog_columns
    if cfg.format == "movielens" or (path.endswith(".dat")):
        _, rows, numbers = read_delimited(path, "::", cfg.encoding, header=False)
        names = [str(i) for i in range(max((len(r) for r in rows), default=0))]
        return catalog_from_rows(path, names, rows, numbers, cc, header_line=False, encoding=cfg.encoding)
    if path.endswith(".parquet") or _is_parquet(path):
        return _parquet_catalog(path, cc)
    if path.endswith(".jsonl") or path.endswith(".json"):
        names, rows, numbers, pre = _jsonl_rows(path, cfg.encoding, cc)
        return catalog_from_rows(path, names, rows, numbers, cc, header_line=False, pre_rejects=pre)
    delim = "\t" if path.endswith(".tsv") else ","
    header, rows, numbers = read_delimited(path, delim, cfg.encoding, header=True)
    return catalog_from_rows(path, header, rows, numbers, cc, header_line=True, encoding=cfg.encoding)


def _parquet_catalog(path: str, cc) -> RawCatalog:
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises several types for non-parquet files
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    check_unique_names(path, names, "schema")
    wanted = {r: c for r, c in (("item id", cc.item), ("title", cc.title), ("category", cc.category))
              if c and c in names}
    check_scalar_columns(path, pf.schema_arrow, wanted)
    cols = list(dict.fromkeys(wanted.values()))
    try:
        t = pf.read(columns=cols)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: Parquet data cannot be read ({e})") from None
    strings = {c: column_strings(t.column(c)) for c in cols}
    pre = []
    bad = [i for c in cols for i in map(int, strings[c][1].nonzero()[0])]
    for i in sorted(set(bad)):
        pre.append((i + 1, "*", "catalog: invalid utf-8 bytes", "\t".join(strings[c][0][i].as_py() for c in cols)))
    values = [strings[c][0].to_pylist() for c in cols]
    rows = [list(r) for r in zip(*values)]
    numbers = list(range(1, len(rows) + 1))
    keep = set(range(len(rows))) - set(bad)
    rows = [r for i, r in enumerate(rows) if i in keep]
    numbers = [n for i, n in enumerate(numbers) if i in keep]
    return catalog_from_rows(path, cols, rows, numbers, cc, header_line=False, pre_rejects=pre)


def _jsonl_rows(path: str, encoding: str, cc):
    """JSONL catalog -> (column names, rows, line numbers, rejected lines)."""
    keys = [k for k in (cc.item, cc.title, cc.category) if k]
    rows, numbers, pre, seen_keys = [], [], [], set()
    for i, line in enumerate(decoded_lines(path, encoding), 1):
        if has_bad_bytes(line):
            pre.append((i, "*", f"catalog: invalid {encoding} bytes", show_bad_bytes(line.rstrip("\r\n"))))
            continue
        if not line.strip():
            continue
        reason, field, row = _json_catalog_row(line, keys)
        if reason:
            pre.append((i, field, reason, line.rstrip("\r\n")))
            continue
        seen_keys.update(k for k, v in zip(keys, row) if v is not None)
        rows.append(["" if v is None else v for v in row])
        numbers.append(i)
    # a key no line has is a missing column (reported by catalog_from_rows), not an empty value
    names = [k if k in seen_keys or not rows else None for k in keys]
    return names, rows, numbers, pre


def _json_catalog_row(line: str, keys: list[str]):
    try:
        obj = json.loads(line)
    except RecursionError:
        return "catalog: JSON nested too deeply", "*", None
    except ValueError as e:  # JSONDecodeError, or an integer past Python's digit limit
        return f"catalog: invalid JSON ({getattr(e, 'msg', 'number too long')})", "*", None
    if not isinstance(obj, dict):
        return "catalog: JSON line is not an object", "*", None
    row = []
    for k in keys:
        v = obj.get(k)
        if isinstance(v, (list, dict)):
            return f"catalog: field {k!r} is not a scalar", k, None
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return f"catalog: field {k!r} holds a lone surrogate escape", k, None
        row.append(None if v is None else str(v))
    return None, None, row


def read_delimited(path: str, delim: str, encoding: str, header: bool):
    """Full CSV parsing (quotes, embedded newlines) for catalogs, which are small.

    -> (header fields or None, data rows, line numbers where each row starts). Undecodable bytes
    stay in the fields as ``transcode.BAD_BYTES`` surrogates (the rows are rejected by
    ``catalog_from_rows``); a byte order mark is dropped; a record ``csv`` cannot read is returned
    as ``None``. With ``header``, a file without a non-blank first record, or a header with
    undecodable bytes, is an InputError."""
    with open(path, "rb") as f:
        text = decode_text(f.read(), encoding)
    rows, numbers = [], []
    if len(delim) == 1:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, quotechar='"')
        start = 1
        while True:
            try:
                r = next(reader)
            except StopIteration:
                break
            except csv.Error:  # e.g. a field over csv's size limit: this record only
                r = None
            if r is None or any(c.strip() for c in r):  # a record of blank fields is a blank line
                rows.append(r)
                numbers.append(start)
            start = reader.line_num + 1  # line_num is where a record ends; the next starts after it
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(line.split(delim))
                numbers.append(i)
    if not header:
        return None, rows, numbers
    if not rows or rows[0] is None:
        raise InputError(f"{path}: line {numbers[0] if rows else 1}: no readable header "
                         f"({'the file holds only blank lines' if not rows else 'csv cannot read it'})")
    names = [c.strip() for c in rows[0]]
    if any(has_bad_bytes(c) for c in names):
        raise InputError(f"{path}: line {numbers[0]}: header has bytes that are not valid {encoding}; "
                         f"pass --encoding if the file uses another encoding")
    check_unique_names(path, names, f"line {numbers[0]} (header)")
    return names, rows[1:], numbers[1:]


def _raw(r: Optional[list]) -> str:
    return show_bad_bytes(" ".join(r)) if r is not None else ""


def catalog_from_rows(path, names, rows, numbers, cc, header_line: bool, encoding: str = "utf-8",
                      pre_rejects: Optional[list] = None, key_check: Optional[Callable[[str], Optional[str]]] = None
                      ) -> RawCatalog:
    """Rows of strings -> catalog; ``pre_rejects`` are rows the reader already rejected
    (line, field, reason, raw); ``key_check`` returns a reason to reject an id, or None."""
    def pos(name, role, required):
        if name in names:
            return names.index(name)
        if str(name).isdigit() and str(name).isascii() and int(name) < max(len(names), 1):
            return int(name)
        if required:
            hint = " (a catalog without titles cannot be used: the prompts need them)" if role == "title" else ""
            shown = [n for n in names if n is not None]
            raise InputError(f"{path}: catalog has no {role} column {name!r}; columns are {shown}{hint}")
        return None

    rej = list(pre_rejects or [])
    if not rows and not rej:
        raise InputError(f"{path}: catalog has no rows")
    if cc.item is None or cc.title is None:
        raise InputError(f"{path}: catalog columns for the item id and the title must be configured")
    pi, pt = pos(cc.item, "item id", True), pos(cc.title, "title", True)
    pcat = pos(cc.category, "category", False) if cc.category else None
    width = len(names) if header_line else None
    need = max(pi, pt, pcat if pcat is not None else 0)
    keys, titles, cats = [], [], []
    seen = {}
    for r, line in zip(rows, numbers):
        reason, field = _row_problem(r, width, need, encoding)
        if reason is None:
            key, title = r[pi].strip(), r[pt]
            if not key:
                reason, field = "catalog: missing item id", cc.item
            elif not title.strip():
                reason, field = "catalog: missing title", cc.title
            elif key in seen:
                reason, field = f"catalog: duplicate item id (first on line {seen[key]})", cc.item
            elif key_check is not None and key_check(key) is not None:
                reason, field = key_check(key), cc.item
        if reason is not None:
            rej.append((line, field, reason, _raw(r)))
            continue
        seen[key] = line
        keys.append(key)
        titles.append(title)
        # kept verbatim (even empty): the published datasets must round-trip exactly; no column: empty
        cats.append(r[pcat] if pcat is not None else ("" if cc.category else "unknown"))
    rej.sort(key=lambda x: x[0])
    if not keys:
        raise InputError(f"{path}: catalog has no valid rows ({len(rej)} rejected, first: line {rej[0][0]}: {rej[0][2]})")
    table = pa.table({"key": keys, "item_id": keys, "title": titles, "category": cats})
    rejects = pa.table({
        "file": [path] * len(rej), "line": pa.array([x[0] for x in rej], pa.int64()),
        "field": [x[1] for x in rej], "reason": [x[2] for x in rej], "raw": [x[3] for x in rej],
    }, schema=REJECT_SCHEMA)
    return RawCatalog(table, rejects, path)


def _row_problem(r: Optional[list], width: Optional[int], need: int, encoding: str):
    """-> (reason, field) for a row that cannot be read at all, else (None, None)."""
    if r is None:
        return "catalog: malformed CSV record", "*"
    if any(has_bad_bytes(v) for v in r):
        return f"catalog: invalid {encoding} bytes", "*"
    if width is not None and len(r) != width:
        return f"catalog: wrong field count (expected {width}, got {len(r)})", "*"
    if len(r) <= need:
        return f"catalog: wrong field count (expected > {need})", "*"
    return None, None


def _is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"
