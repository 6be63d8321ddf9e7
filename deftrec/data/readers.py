"""Readers: the row contract every input reader produces, chunk by chunk.

This module owns what the readers share: ``InputError``, the two Arrow schemas and the input-order
encoding. Per chunk a reader yields two tables:
- valid rows: ``user_id`` str, ``item_id`` str, ``timestamp`` int64, ``rating`` float64 (nullable),
  ``_ord`` int64 (file index << 40 | line number: the global input order, used for stable ties),
  ``_bucket`` int32 (user hash partition);
- rejected rows: ``file``, ``line``, ``field``, ``reason``, ``raw`` (the original line).

The readers themselves live beside it: file layout and chunk planning in ``deftrec.data.layout``,
lines and (quoted, possibly multi-line) CSV records in ``deftrec.data.records``, typed field
validation and the value rules in ``deftrec.data.validation``, the text/JSONL/Parquet chunk
parsers in ``deftrec.data.chunks``, item catalogs in ``deftrec.data.catalog`` and the published
sequence folders in ``deftrec.data.deftrec_folder``. Folder inputs are expanded in
``deftrec.data.ingest``.

The contract they all keep: no content of a row makes a reader raise. A bad row is a reject
with file, line, field and reason; a problem that no row can carry (missing or empty file, a
column that is absent, named twice or not a scalar, a file ending inside quotes, a catalog
without titles) is an ``InputError`` naming the file (exit code 2 in the CLI).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deftrec.core.errors import UserError

ORD_SHIFT = 40  # _ord = file_idx << 40 | line: 1e12 lines per file, 8M files

VALID_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()),
    ("rating", pa.float64()), ("_ord", pa.int64()), ("_bucket", pa.int32()),
])
REJECT_SCHEMA = pa.schema([
    ("file", pa.string()), ("line", pa.int64()), ("field", pa.string()),
    ("reason", pa.string()), ("raw", pa.string()),
])


class InputError(UserError, ValueError):
    """Bad input that cannot be handled row by row (missing file, unknown column, ...)."""


def reject_table(path, lines, fields, reasons, raw) -> pa.Table:
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
