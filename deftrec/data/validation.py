"""Typed field validation and rejects, shared by every row format.

This module owns the vectorised checks that turn string fields into typed interaction rows: the
timestamp and rating parsers, the per-row first-failing-reason bookkeeping (``Rejects``), the
deterministic user hash that assigns each row its ``_bucket``, and ``validate_fields``, which
builds the valid-row and reject tables of one chunk.
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
_TS_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d")


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


def clean_field(arr: pa.Array) -> pa.Array:
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
    rejects = reject_table(path, lines[bad], rej.field[bad], rej.reason[bad], pc.filter(raw, pa.array(bad)))
    return valid, rejects
