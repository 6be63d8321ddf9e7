"""Lines and CSV records of a text byte range (shared by the driver's scan and the chunk parsers).

This module owns how a byte range becomes lines (decoding, invalid-byte flags) and how lines
become CSV records for single-character delimiters. Quoting follows Python's ``csv`` module (the
RFC 4180 dialect, lenient like ``csv`` is): a quote opens a quoted field only at the start of a
field, ``""`` inside it is a literal quote, and a quoted field may hold the delimiter and
newlines. So one record can span several lines, and a chunk boundary can fall inside one.

That is resolved without reading a file twice in one place: the driver scans every range in
parallel (:func:`scan_range`), learning for both possible start states (at a record start, or
inside a quoted field) where the range ends and where an unclosed record began; it then chains
the ranges in order, so each chunk knows whether it starts inside a quoted field. A chunk that
does skips the lines up to the close of that field; the chunk before reads past its end to the
same close. Both use :func:`ends_in_quote` on the same bytes, so every line belongs to exactly
one record of exactly one chunk. A file that ends inside quotes is a file-level error.

Lines without a quote, or whose quotes only wrap whole fields (``"u1","i1",5``), take the
vectorised path; only the rest are walked character by character.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deftrec.data.transcode import show_bad_bytes

_SIMPLE_FIELD_RE = r'^[^"]*$|^\s*"[^"]*"\s*$'

_FIELD_START, _UNQUOTED, _QUOTED, _QUOTE_IN_QUOTED = range(4)


def read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def lines_from_bytes(data: bytes, first_line: int, encoding: str, marked: bool = False):
    """-> (lines StringArray without EOL, line numbers, invalid-encoding mask). ``marked``: UTF-8 from
    ``deftrec.data.transcode``, whose invalid sequences stand for the original file's bad bytes."""
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
    # 32-bit offsets: the read stage caps a range at 1 GiB (see ingest.MAX_CHUNK_BYTES)
    offsets = np.r_[0, ends].astype(np.int32)
    n = len(offsets) - 1
    binary = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
    numbers = first_line + np.arange(n, dtype=np.int64)
    try:
        text = binary.cast(pa.string())
        invalid = np.zeros(n, bool)
    except pa.ArrowInvalid:
        # Slow path for the rare chunk with invalid UTF-8: find the offending lines one by one.
        invalid = np.zeros(n, bool)
        fixed = []
        for i, b in enumerate(binary.to_pylist()):
            try:
                fixed.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                invalid[i] = True
                fixed.append(show_bad_bytes(b.decode("utf-8", "surrogatepass")) if marked else
                             b.decode("utf-8", errors="backslashreplace"))
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
    return "\n".join(out).encode("utf-8"), np.array(bad, bool)


def ends_in_quote(line: str, delim: str, in_quote: bool) -> bool:
    """Whether ``line`` ends inside a quoted field, given whether it starts inside one (csv's state machine)."""
    try:  # fast path in C: a line strict csv accepts ends outside quotes ('"' + line: continue a quoted field)
        next(csv.reader(['"' + line if in_quote else line], delimiter=delim, quotechar='"', strict=True), None)
        return False
    except csv.Error:  # not strict RFC 4180 (or really unclosed): walk it the way lenient csv reads it
        pass
    state = _QUOTED if in_quote else _FIELD_START
    for c in line:
        if state == _QUOTED:
            if c == '"':
                state = _QUOTE_IN_QUOTED
        elif state == _QUOTE_IN_QUOTED:  # "" is a literal quote; anything else closes the field
            state = _QUOTED if c == '"' else (_FIELD_START if c == delim else _UNQUOTED)
        elif c == delim:
            state = _FIELD_START
        elif state == _FIELD_START and c == '"':
            state = _QUOTED
        else:
            state = _UNQUOTED
    return state == _QUOTED


def quote_flags(lines: pa.Array, delim: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (line has a quote, line is simple: each field is quote-free or one whole quoted value)."""
    has_quote = pc.fill_null(pc.match_substring(lines, '"'), False).to_numpy(zero_copy_only=False)
    simple = ~has_quote
    if has_quote.any():
        idx = np.flatnonzero(has_quote)
        parts = pc.split_pattern(pc.take(lines, pa.array(idx)), pattern=delim)
        ok = pc.match_substring_regex(pc.list_flatten(parts), _SIMPLE_FIELD_RE).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(parts).to_numpy(zero_copy_only=False)
        simple[idx] = np.bincount(parents[~ok], minlength=len(idx)) == 0
    return has_quote, simple


def record_starts(lines: pa.Array, delim: str, start_in_quote: bool, flags=None,
                  reference: tuple | None = None) -> tuple[np.ndarray, bool]:
    """-> (line i starts a record, the range ends inside a quoted field).

    ``reference``: the result of this range from the other start state; once both runs stand at a
    record start on the same line they agree to the end, so the walk stops there."""
    n = len(lines)
    has_quote, simple = flags if flags is not None else quote_flags(lines, delim)
    quoted = np.flatnonzero(has_quote)
    walk_simple = ~simple[quoted]
    if not start_in_quote and not walk_simple.any():  # every quote wraps a whole field: one record per line
        return np.ones(n, bool), False
    # Only two kinds of line can change the state: outside quotes, a line that is not simple; inside,
    # any line with a quote. Walk just those.
    text = pc.take(lines, pa.array(quoted)).to_pylist()
    state, at, after, synced = start_in_quote, [], [], None
    for pos, j in enumerate(quoted.tolist()):
        if not state and not walk_simple[pos]:
            continue
        state = ends_in_quote(text[pos], delim, state)
        at.append(j)
        after.append(state)
        if reference is not None and not state and j + 1 < n and reference[0][j + 1]:
            synced = j + 1
            break
    # the state at the start of line j is the one after the last walked line before j
    prev = np.searchsorted(np.asarray(at, np.int64), np.arange(n), side="left") - 1
    in_quote_at = np.where(prev >= 0, np.asarray(after + [False], bool)[prev], start_in_quote)
    starts = ~in_quote_at
    if synced is not None:
        starts[synced:] = reference[0][synced:]
        return starts, reference[1]
    return starts, bool(state)


def scan_range(path: str, start: int, end: int, first_line: int, encoding: str, delim: str | None) -> dict:
    """The driver's parallel pass over one range: its line count and, for CSV quoting (``delim``
    set), the outcome for both start states: ``{"lines", "out": [ends_in_quote, open_line],
    "in": [...]}``; ``open_line`` is the line where the unclosed record began (None: before the range)."""
    data = read_range(path, start, end)
    n = data.count(b"\n") + (1 if data and data[-1:] != b"\n" else 0)
    res = {"lines": n, "out": [False, None], "in": [True, None]}
    if delim is None or b'"' not in data:
        return res
    lines, numbers, _ = lines_from_bytes(data, first_line, encoding)
    flags = quote_flags(lines, delim)
    out = record_starts(lines, delim, False, flags)
    for key, (starts, end_in) in (("out", out), ("in", record_starts(lines, delim, True, flags, reference=out))):
        opened = np.flatnonzero(starts)
        res[key] = [end_in, int(opened[-1]) if end_in and len(opened) else None]
    return res


def read_continuation(path: str, offset: int, encoding: str, delim: str,
                      marked: bool = False) -> tuple[list[str], np.ndarray, bool]:
    """Lines after ``offset`` up to the one that closes an open quoted field -> (lines, invalid, closed)."""
    out, bad = [], []
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            text, _, invalid = lines_from_bytes(raw, 0, encoding, marked)
            line = text[0].as_py() if len(text) else ""
            out.append(line)
            bad.append(bool(invalid[:1].any()))
            if not ends_in_quote(line, delim, True):
                return out, np.array(bad, bool), True
    return out, np.array(bad, bool), False


def parse_records(texts: list[str], delim: str) -> list[list[str] | None]:
    """Complete CSV records -> their fields (None for a record csv cannot read); one csv pass when possible."""
    try:
        rows = list(csv.reader(texts, delimiter=delim, quotechar='"'))
        if len(rows) == len(texts):
            return rows
    except csv.Error:
        pass
    return [parse_record(t, delim) for t in texts]  # find the unreadable ones


def parse_record(text: str, delim: str) -> list[str] | None:
    """One CSV record (possibly multi-line) -> its fields; None when csv does not read one record."""
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delim, quotechar='"'))
    except csv.Error:  # a field over csv's size limit, a bare carriage return, ...
        return None
    return rows[0] if len(rows) == 1 else None
