"""Typed field validation and rejects, shared by every row format.

This module owns the vectorised checks that turn string fields into typed interaction rows: the
timestamp and rating parsers, the per-row first-failing-reason bookkeeping (``Rejects``), the
deterministic user hash that assigns each row its ``_bucket``, and ``validate_fields``, which
builds the valid-row and reject tables of one chunk.

Value rules (the same for every input format, text or typed Parquet columns):

- Timestamps are stored as whole seconds since 1970-01-01 UTC (int64). ``unix`` and ``auto``
  read numbers as seconds, ``unix_ms`` as milliseconds (floored to seconds, like decimal
  seconds; ties keep input order); ISO dates and Parquet timestamp/date columns are converted.
  A number that does not fit int64 in its unit (``99999999999999999999``, ``1e30``) is a
  rejected row, reason ``timestamp out of range (does not fit int64)``; a negative timestamp
  (before 1970) is a rejected row too, reason ``negative timestamp (before 1970-01-01)``.
  Nothing wraps or is clamped.
- Ratings are finite float64 or empty (null). ``nan``, ``inf`` and numbers that overflow to
  infinity (``1e999``) are rejected rows, reason ``rating is not a finite number``, whatever
  else is in the chunk.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deftrec.config.data import PreprocessConfig
from deftrec.data.readers import ORD_SHIFT, VALID_SCHEMA, reject_table

_INT_RE = r"^[+-]?\d+$"
_FLOAT_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_NONFINITE_RE = r"(?i)^[+-]?(nan|inf|infinity)$"
_TS_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d")
_INT64_MAX = "9223372036854775807"
_TWO_63 = 2.0 ** 63


def hash_strings(arr: pa.Array) -> np.ndarray:
    """Deterministic 64-bit polynomial hash of each string (platform- and process-independent)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    # large_string (64-bit offsets) too, so an array past 2 GiB of text hashes instead of overflowing
    width = 8 if pa.types.is_large_string(arr.type) else 4
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if width == 8 else np.int32, count=n + 1,
                            offset=arr.offset * width).astype(np.int64)
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


def clean_field(arr: pa.Array) -> pa.Array:
    """Trim whitespace and surrounding double quotes (ids never legitimately start or end with them)."""
    return pc.utf8_trim(arr, characters=' \t\r"')


def _parse_int_strings(s: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Strings matched by ``_INT_RE`` -> (int64 values, fits-int64 mask). Never raises on overflow."""
    negative = pc.starts_with(s, "-").to_numpy(zero_copy_only=False)
    digits = pc.utf8_ltrim(pc.utf8_ltrim(s, characters="+-"), characters="0")  # the pattern allows one sign
    n = pc.utf8_length(digits).to_numpy(zero_copy_only=False)
    # equal-length digit strings compare like the numbers they spell
    fits = (n < 19) | ((n == 19) & pc.fill_null(pc.less_equal(digits, _INT64_MAX), False).to_numpy(
        zero_copy_only=False))
    values = np.zeros(len(s), np.int64)
    if fits.any():
        body = pc.if_else(pc.equal(digits, ""), "0", digits).filter(pa.array(fits))
        v = pc.cast(body, pa.int64()).to_numpy(zero_copy_only=False)
        values[fits] = np.where(negative[fits], -v, v)
    return values, fits


def parse_timestamps(arr: pa.Array, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (int64 seconds, unparseable mask, out-of-range mask); see the module docstring for the rules.

    'auto' accepts integers, decimals (floored) and ISO dates; 'unix' numbers only (seconds);
    'unix_ms' numbers only (milliseconds); anything else is a strptime format."""
    arr = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
    n = len(arr)
    values = np.zeros(n, np.int64)
    parsed = np.zeros(n, bool)
    out_of_range = np.zeros(n, bool)
    if fmt in ("auto", "unix", "unix_ms"):
        per_second = 1000 if fmt == "unix_ms" else 1
        try:  # fast path: every value is an integer that fits int64
            v = pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False)
            return v // per_second, np.zeros(n, bool), np.zeros(n, bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        is_int = pc.fill_null(pc.match_substring_regex(arr, _INT_RE), False).to_numpy(zero_copy_only=False)
        if is_int.any():
            idx = np.flatnonzero(is_int)
            v, fits = _parse_int_strings(pc.filter(arr, pa.array(is_int)))
            values[idx[fits]] = v[fits] // per_second
            out_of_range[idx[~fits]] = True
            parsed[idx] = True
        is_float = ~parsed & pc.fill_null(pc.match_substring_regex(arr, _FLOAT_RE), False).to_numpy(
            zero_copy_only=False)
        if is_float.any():
            idx = np.flatnonzero(is_float)
            f = pc.cast(pc.filter(arr, pa.array(is_float)), pa.float64()).to_numpy(zero_copy_only=False)
            # range is checked in the input's unit, before flooring: 1e30 or 1e400 never wraps
            fits = np.isfinite(f) & (f > -_TWO_63) & (f < _TWO_63)
            values[idx[fits]] = np.floor(f[fits] / per_second).astype(np.int64)
            out_of_range[idx[~fits]] = True
            parsed[idx] = True
        formats = _TS_FORMATS if fmt == "auto" else ()
    else:
        formats = (fmt,)
    for f in formats:
        todo = ~parsed
        if not todo.any():
            break
        sub = pc.filter(arr, pa.array(todo))
        res = pc.strptime(sub, format=f, unit="s", error_is_null=True)
        good = pc.is_valid(res).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(todo)
        values[idx[good]] = pc.cast(pc.filter(res, good), pa.int64()).to_numpy()
        parsed[idx[good]] = True
    return values, ~parsed, out_of_range


def parse_ratings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (float64 values, null mask for empty fields, parseable mask). Parseable values may be
    non-finite (``nan``, ``inf``, ``1e999``): the caller rejects those, whichever path parsed them."""
    arr = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
    empty = pc.fill_null(pc.equal(arr, ""), True).to_numpy(zero_copy_only=False)
    if not empty.any():
        try:  # fast path: every value is a number (Arrow also reads nan/inf words here)
            return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), empty, np.ones(len(arr), bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    # the slow path admits the same nan/inf words as the fast one, so the reason does not depend on the chunk
    is_num = pc.or_(pc.match_substring_regex(arr, _FLOAT_RE), pc.match_substring_regex(arr, _NONFINITE_RE))
    is_num = pc.fill_null(is_num, False).to_numpy(zero_copy_only=False)
    values = np.full(len(arr), np.nan)
    if is_num.any():
        values[is_num] = pc.cast(pc.filter(arr, pa.array(is_num)), pa.float64()).to_numpy()
    return values, empty, is_num | empty


_SECONDS_PER = {"s": 1, "ms": 10 ** 3, "us": 10 ** 6, "ns": 10 ** 9}


def column_strings(arr) -> tuple[pa.Array, np.ndarray, bool]:
    """A typed column (Parquet) -> (string fields with nulls as "", invalid-UTF-8 mask, was temporal).

    Timestamp and date columns become whole seconds (floored, so sub-second values never fail a
    cast); binary columns are decoded as UTF-8, undecodable values flagged rather than raised."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    invalid = np.zeros(len(arr), bool)
    if pa.types.is_date(arr.type):
        arr = pc.cast(arr, pa.timestamp("ms"))
    if pa.types.is_timestamp(arr.type):
        ints = pc.cast(arr, pa.int64())
        nulls = ints.is_null().to_numpy(zero_copy_only=False)
        secs = pc.fill_null(ints, 0).to_numpy(zero_copy_only=False) // _SECONDS_PER[arr.type.unit]
        return pc.fill_null(pc.cast(pa.array(secs, pa.int64(), mask=nulls), pa.string()), ""), invalid, True
    if pa.types.is_fixed_size_binary(arr.type):
        arr = pc.cast(arr, pa.binary())
    try:
        out = pc.cast(arr, pa.string())
    except pa.ArrowInvalid:  # binary values that are not UTF-8: decode one by one
        vals = []
        for i, b in enumerate(arr.to_pylist()):
            try:
                vals.append(None if b is None else b.decode("utf-8"))
            except UnicodeDecodeError:
                invalid[i] = True
                vals.append(b.decode("utf-8", errors="backslashreplace"))
        out = pa.array(vals, pa.string())
    return pc.fill_null(out, ""), invalid, False


class Rejects:
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
                    cfg: PreprocessConfig, catalog_ids: Optional[pa.Array], rej: Rejects,
                    num_buckets: int, timestamp_format: Optional[str] = None) -> tuple[pa.Table, pa.Table]:
    """Typed validation shared by all row formats. ``fields`` maps role -> string array (nullable).
    ``timestamp_format`` overrides the configured one (Parquet timestamp columns arrive as seconds)."""
    cols = cfg.columns
    user = fields["user"]
    item = fields["item"]
    rej.mark(pc.fill_null(pc.equal(user, ""), True).to_numpy(zero_copy_only=False), "missing user id", cols.user)
    rej.mark(pc.fill_null(pc.equal(item, ""), True).to_numpy(zero_copy_only=False), "missing item id", cols.item)
    ts, ts_bad, ts_out_of_range = parse_timestamps(fields["timestamp"], timestamp_format or cfg.timestamp_format)
    ts_missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(pc.cast(fields["timestamp"], pa.string())), ""),
                              True).to_numpy(zero_copy_only=False)
    rej.mark(ts_missing, "missing timestamp", cols.timestamp)
    rej.mark(ts_bad, "unparseable timestamp", cols.timestamp)
    rej.mark(ts_out_of_range, "timestamp out of range (does not fit int64)", cols.timestamp)
    rej.mark(~ts_bad & ~ts_out_of_range & (ts < 0), "negative timestamp (before 1970-01-01)", cols.timestamp)
    if "rating" in fields:
        rating, rating_null, rating_ok = parse_ratings(fields["rating"])
        rej.mark(~rating_ok, "unparseable rating", cols.rating)
        rej.mark(rating_ok & ~rating_null & ~np.isfinite(rating), "rating is not a finite number", cols.rating)
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
    rejects = reject_table(path, lines[bad], rej.field[bad], rej.reason[bad], pc.filter(raw, pa.array(bad)))
    return valid, rejects
