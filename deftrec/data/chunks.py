"""Chunk parsers for the text, JSONL and Parquet formats (they run inside Ray tasks).

This module owns the per-chunk work of the read stage: reading one byte range (or Parquet row
group), splitting it into lines with vectorised Arrow kernels, decoding non-UTF-8 input, flagging
blank and undecodable lines, splitting delimited fields or decoding JSON objects, and handing the
string fields to ``deftrec.data.validation.validate_fields``. Each parser returns the valid rows,
the rejects and the chunk's line statistics.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deftrec.config.data import PreprocessConfig
from deftrec.data.layout import Chunk, FileLayout
from deftrec.data.validation import Rejects, clean_field, validate_fields


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
    rej = Rejects(len(text))
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
        fields = {role: clean_field(pc.list_element(safe, pos)) for role, pos in lay.positions.items()}
    valid, rejects = validate_fields(lay.path, lay.file_idx, numbers, text, fields, cfg, catalog_ids, rej,
                                     num_buckets)
    stats["rows"] = int(len(text))
    return valid, rejects, stats


def _jsonl_fields(text: pa.Array, lay: FileLayout, rej: Rejects) -> dict:
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
    rej = Rejects(n)
    valid, rejects = validate_fields(lay.path, lay.file_idx, numbers, raw, fields, cfg, catalog_ids, rej, num_buckets)
    return valid, rejects, {"lines": n, "blank_lines": 0, "rows": n}


def parse_chunk(chunk: Chunk, cfg: PreprocessConfig, catalog_ids, num_buckets: int):
    if cfg.format == "parquet":
        return parse_parquet_chunk(chunk, cfg, catalog_ids, num_buckets)
    return parse_text_chunk(chunk, cfg, catalog_ids, num_buckets)
