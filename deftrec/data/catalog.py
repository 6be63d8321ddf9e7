"""Item catalogs: reading item metadata files into a ``RawCatalog``.

This module owns the catalog side of the input: detecting the catalog's format (MovieLens
``.dat``, Parquet, JSONL, CSV/TSV), full CSV parsing with quotes and embedded newlines (catalogs
are small, so they are parsed in Python), resolving the configured id/title/category columns,
and rejecting catalog rows with a wrong field count, a missing id or title, or a duplicate id.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from deftrec.config.data import PreprocessConfig
from deftrec.data.layout import check_file
from deftrec.data.readers import REJECT_SCHEMA, InputError


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
        rows, numbers = read_delimited(path, "::", cfg.encoding, header=False)
        names = [str(i) for i in range(max((len(r) for r in rows), default=0))]
    elif path.endswith(".parquet") or _is_parquet(path):
        t = pq.read_table(path)
        names = t.column_names
        rows = [list(map(lambda v: "" if v is None else str(v), r.values())) for r in t.to_pylist()]
        numbers = list(range(1, len(rows) + 1))
        return catalog_from_rows(path, names, rows, numbers, cc, header_line=False)
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
        return catalog_from_rows(path, names, rows, numbers, cc, header_line=False)
    else:
        delim = "\t" if path.endswith(".tsv") else ","
        all_rows, numbers = read_delimited(path, delim, cfg.encoding, header=True)
        names, rows, numbers = [c.strip() for c in all_rows[0]], all_rows[1:], numbers[1:]
        return catalog_from_rows(path, names, rows, numbers, cc, header_line=True)
    return catalog_from_rows(path, names, rows, numbers, cc, header_line=False)


def read_delimited(path: str, delim: str, encoding: str, header: bool):
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


def catalog_from_rows(path, names, rows, numbers, cc, header_line: bool) -> RawCatalog:
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


def _is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"

