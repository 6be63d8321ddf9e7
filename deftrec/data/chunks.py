"""Chunk parsers for the text, JSONL and Parquet formats (they run inside Ray tasks).

This module owns the per-chunk work of the read stage: reading one byte range (or Parquet row
group), turning it into records (``deftrec.data.records``: lines, and CSV records that may span
lines inside quoted fields), flagging blank and undecodable records, splitting delimited fields
or decoding JSON objects, and handing the string fields to
``deftrec.data.validation.validate_fields``. Each parser returns the valid rows, the rejects and
the chunk's line statistics; none of them raises on any content of a row: every bad row becomes
a reject with its file, line, field and reason.

Row rules beyond the value rules of ``deftrec.data.validation``: a JSONL line is one object; a
field that is a list or an object, holds a lone surrogate escape, or a line nested too deeply to
decode, is a rejected row naming the field. A Parquet row group that cannot be decoded rejects
its rows (reason ``unreadable Parquet row group``) instead of failing the job.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deftrec.config.data import PreprocessConfig
from deftrec.data.layout import Chunk, FileLayout
from deftrec.data.readers import empty_rejects, empty_valid, reject_table
from deftrec.data.records import (
    lines_from_bytes,
    parse_records,
    quote_flags,
    read_continuation,
    read_range,
    record_starts,
)
from deftrec.data.validation import Rejects, clean_field, column_strings, validate_fields

_PARQUET_BATCH_ROWS = 1 << 16  # small batches keep every string column far below 2 GiB (32-bit offsets)


def _csv_records(chunk: Chunk, cfg: PreprocessConfig, text, numbers, invalid):
    """Physical lines -> records (a record spans lines inside a quoted field).
    -> (record text, first line numbers, invalid mask, needs-csv mask, lines owned)."""
    delim = cfg.delimiter
    has_quote, simple = quote_flags(text, delim)
    starts, end_in_quote = record_starts(text, delim, chunk.start_in_quote, (has_quote, simple))
    if end_in_quote:  # the last record closes in a later range: read on to its close
        lay = chunk.layout
        more, more_invalid, closed = read_continuation(lay.data_path, chunk.end, lay.data_encoding, delim,
                                                       lay.transcoded)
        text = pa.concat_arrays([text, pa.array(more, pa.string())])
        numbers = np.r_[numbers, numbers[-1] + 1 + np.arange(len(more), dtype=np.int64)] if len(numbers) else \
            chunk.first_line + np.arange(len(more), dtype=np.int64)
        invalid = np.r_[invalid, more_invalid]
        starts = np.r_[starts, np.zeros(len(more), bool)]
        simple = np.r_[simple, np.zeros(len(more), bool)]
    first = int(np.argmax(starts)) if starts.any() else len(starts)  # lines before: the previous chunk's record
    sidx = np.flatnonzero(starts)
    lines_owned = len(starts) - first
    if not len(sidx):
        return pa.array([], pa.string()), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool), 0
    span = np.diff(np.r_[sidx, len(starts)])
    rec_text = pc.take(text, pa.array(sidx))
    multi = span > 1
    if multi.any():
        joined = ["\n".join(text.slice(int(s), int(k)).to_pylist()) for s, k in zip(sidx[multi], span[multi])]
        rec_text = pc.replace_with_mask(rec_text, pa.array(multi), pa.array(joined, pa.string()))
    rec_invalid = np.logical_or.reduceat(invalid, sidx) if len(invalid) else np.zeros(0, bool)
    return rec_text, numbers[sidx], rec_invalid, multi | ~simple[sidx], lines_owned


def _delimited_fields(text: pa.Array, needs_csv: np.ndarray, lay: FileLayout, delim: str, rej: Rejects) -> dict:
    """Fields by position: a vectorised split, and Python's csv for the records with real quoting."""
    parts = pc.split_pattern(text, pattern=delim)
    nf = pc.list_value_length(parts).to_numpy(zero_copy_only=False).copy()
    parsed = {}
    idx = np.flatnonzero(needs_csv)
    rows = parse_records(pc.take(text, pa.array(idx)).to_pylist(), delim) if len(idx) else []
    for j, row in zip(idx, rows):
        if row is None:
            if rej.reason[j] is None:
                rej.reason[j], rej.field[j] = "malformed CSV record", "*"
            nf[j] = lay.n_fields  # already rejected: not a field-count problem too
        else:
            parsed[int(j)] = row
            nf[j] = len(row)
    wrong = nf != lay.n_fields
    rej.mark(wrong, f"wrong field count (expected {lay.n_fields})", "*")
    # Rows with the wrong count (or parsed by csv) get placeholder fields so list_element stays in bounds.
    safe = pc.if_else(pa.array(wrong | needs_csv), pa.scalar([""] * lay.n_fields, pa.list_(pa.string())), parts)
    good_csv = [j for j in sorted(parsed) if not wrong[j]]
    mask = np.zeros(len(nf), bool)
    mask[good_csv] = True
    fields = {}
    for role, pos in lay.positions.items():
        arr = pc.list_element(safe, pos)
        if good_csv:
            arr = pc.replace_with_mask(arr, pa.array(mask), pa.array([parsed[j][pos] for j in good_csv], pa.string()))
        fields[role] = clean_field(arr)
    return fields


def parse_text_chunk(chunk: Chunk, cfg: PreprocessConfig, catalog_ids, num_buckets: int):
    lay = chunk.layout
    data = read_range(lay.data_path, chunk.start, chunk.end)
    text, numbers, invalid = lines_from_bytes(data, chunk.first_line, lay.data_encoding, lay.transcoded)
    quoting = cfg.format != "jsonl" and len(cfg.delimiter) == 1
    if quoting:
        text, numbers, invalid, needs_csv, n_lines = _csv_records(chunk, cfg, text, numbers, invalid)
    else:  # JSONL and multi-character delimiters (MovieLens ``::``): one line, one record
        needs_csv, n_lines = np.zeros(len(text), bool), len(text)
    blank = ~needs_csv & pc.equal(pc.utf8_trim_whitespace(text), "").to_numpy(zero_copy_only=False)
    stats = {"lines": int(n_lines), "blank_lines": int(blank.sum())}
    keep = ~blank
    text, numbers, invalid, needs_csv = pc.filter(text, pa.array(keep)), numbers[keep], invalid[keep], needs_csv[keep]
    rej = Rejects(len(text))
    rej.mark(invalid, f"invalid {cfg.encoding} bytes", "*")
    if cfg.format == "jsonl":
        fields = _jsonl_fields(text, lay, rej)
    else:
        fields = _delimited_fields(text, needs_csv, lay, cfg.delimiter, rej)
    valid, rejects = validate_fields(lay.path, lay.file_idx, numbers, text, fields, cfg, catalog_ids, rej,
                                     num_buckets)
    stats["rows"] = int(len(text))
    return valid, rejects, stats


def _json_value(v, key: str) -> tuple[str | None, str | None]:
    """A decoded JSON value -> (field string, reject reason)."""
    if isinstance(v, (list, dict)):
        return None, f"field {key!r} is not a scalar (JSON {'array' if isinstance(v, list) else 'object'})"
    if not isinstance(v, str):
        return str(v), None
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800": valid JSON, not valid text
        return None, f"field {key!r} holds a lone surrogate escape"
    return v, None


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
        except RecursionError:
            rej.reason[i], rej.field[i] = "JSON nested too deeply", "*"
            continue
        except ValueError:  # e.g. an integer past Python's digit limit
            rej.reason[i], rej.field[i] = "invalid JSON (number too long)", "*"
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
            s, reason = _json_value(v, key)
            if reason:
                rej.reason[i], rej.field[i] = reason, key
                break
            vals[role][i] = s
    return {role: pc.fill_null(pa.array(v, pa.string()), "") for role, v in vals.items()}


def _parquet_batch(batch: pa.RecordBatch, lay: FileLayout, cfg, catalog_ids, num_buckets: int, first_line: int):
    n = batch.num_rows
    numbers = first_line + np.arange(n, dtype=np.int64)
    rej = Rejects(n)
    fields, ts_format = {}, None
    for role, col in lay.positions.items():
        s, invalid, temporal = column_strings(batch.column(col))
        rej.mark(invalid, "invalid utf-8 bytes", col)
        if role == "timestamp" and temporal:
            ts_format = "unix"  # already converted to seconds: no unix_ms scaling, no ISO parsing
        fields[role] = s
    raw = pc.binary_join_element_wise(*[fields[r] for r in lay.positions], "\t")
    return validate_fields(lay.path, lay.file_idx, numbers, raw, fields, cfg, catalog_ids, rej, num_buckets,
                           timestamp_format=ts_format)


def parse_parquet_chunk(chunk: Chunk, cfg: PreprocessConfig, catalog_ids, num_buckets: int):
    lay = chunk.layout
    valid, rejects, line = [empty_valid()], [empty_rejects()], chunk.first_line
    try:
        pf = pq.ParquetFile(lay.path)
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[chunk.start],
                                     columns=list(dict.fromkeys(lay.positions.values()))):
            v, r = _parquet_batch(batch, lay, cfg, catalog_ids, num_buckets, line)
            valid.append(v)
            rejects.append(r)
            line += batch.num_rows
    except (OSError, pa.ArrowException) as e:  # corrupt data pages: the rows not read are rejected, not lost
        left = chunk.first_line + chunk.rows - line
        rejects.append(reject_table(lay.path, line + np.arange(left, dtype=np.int64), ["*"] * left,
                                    ["unreadable Parquet row group"] * left, [f"{type(e).__name__}: {e}"] * left))
        line += left
    n = line - chunk.first_line
    return pa.concat_tables(valid), pa.concat_tables(rejects), {"lines": n, "blank_lines": 0, "rows": n}


def parse_chunk(chunk: Chunk, cfg: PreprocessConfig, catalog_ids, num_buckets: int):
    if cfg.format == "parquet":
        return parse_parquet_chunk(chunk, cfg, catalog_ids, num_buckets)
    return parse_text_chunk(chunk, cfg, catalog_ids, num_buckets)
