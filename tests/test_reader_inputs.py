"""Readers on bad input, one class at a time: a bad row is a reject with file, line, field and
reason; a bad file is an InputError naming it; ``rows_in == rejected + removed + kept`` always.

``read_local`` runs the read stage's own pieces (layout, chunk plan, parallel scan, chunk parser)
in-process, so chunk-boundary cases can be tried at every chunk size without Ray; the rest go
through ``run_preprocess`` like the pipeline does.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deftrec.config.data import PreprocessConfig
from deftrec.core.config import ConfigError, from_dict
from deftrec.data.bucket_tasks import dedup_sorted
from deftrec.data.catalog import read_catalog, read_delimited
from deftrec.data.chunks import parse_chunk
from deftrec.data.ingest import number_chunks, resolve_inputs, scan_args
from deftrec.data.layout import plan_chunks, plan_layout
from deftrec.data.preprocess import run_preprocess
from deftrec.data.readers import InputError
from deftrec.data.records import scan_range
from deftrec.data.transcode import splits_on_newline_bytes
from deftrec.data.validation import hash_strings

HEADER = ["user_id", "item_id", "timestamp", "rating"]


def config(inp, out="unused", **kw) -> PreprocessConfig:
    return from_dict(PreprocessConfig, {"input": [str(x) for x in (inp if isinstance(inp, list) else [inp])],
                                        "output": str(out), **kw})


def run(inp, out, **kw) -> dict:
    return run_preprocess(config(inp, out, **kw), log=lambda s: None)


def rejects(out) -> list[dict]:
    return [r for f in sorted((Path(out) / "rejects").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def balanced(m: dict) -> bool:
    c = m["counts"]
    return c["rows_in"] == c["rejected_total"] + c["removed_total"] + c["kept"]


def read_local(cfg: PreprocessConfig, chunk_bytes: int):
    """The read stage without Ray: the same planning, scan, chaining and chunk parser."""
    chunks = []
    for i, p in enumerate(resolve_inputs(cfg)):
        chunks += plan_chunks(plan_layout(cfg, p, i), chunk_bytes, cfg.format)
    if cfg.format != "parquet":
        number_chunks(chunks, [scan_range(*scan_args(cfg, c)) for c in chunks])
    parts = [parse_chunk(c, cfg, None, 2) for c in chunks]
    return (pa.concat_tables([p[0] for p in parts]), pa.concat_tables([p[1] for p in parts]),
            sum(p[2]["rows"] for p in parts))


def write_rows(path, rows, header=HEADER, delim=","):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delim, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def good_rows(users=2, n=4):
    return [(f"u{u}", f"i{k}", 100 + k, 4) for u in range(users) for k in range(n)]


# ------------------------------------------------------------------ timestamps


def test_timestamps_out_of_range_and_negative_are_rejected(tmp_path, ray_session):
    bad = [("u0", "i9", "99999999999999999999", 1), ("u0", "i9", "1e30", 1), ("u0", "i9", "1e400", 1),
           ("u0", "i9", "-5", 1), ("u0", "i9", "-0.5", 1), ("u0", "i9", "+7", 1)]
    p = write_rows(tmp_path / "log.csv", good_rows() + bad)
    m = run(p, tmp_path / "o", user_core=0, item_core=0)
    rej = {r["line"]: r for r in rejects(tmp_path / "o")}
    first = len(good_rows()) + 2
    assert {k: rej[k]["reason"] for k in rej} == {
        first: "timestamp out of range (does not fit int64)", first + 1: "timestamp out of range (does not fit int64)",
        first + 2: "timestamp out of range (does not fit int64)", first + 3: "negative timestamp (before 1970-01-01)",
        first + 4: "negative timestamp (before 1970-01-01)"}  # "+7" is a valid timestamp
    assert all(r["field"] == "timestamp" for r in rej.values()) and balanced(m)


def test_unix_ms_timestamps_are_stored_as_seconds(tmp_path, ray_session):
    rows = [("u", "b", 1_700_000_002_500, 1), ("u", "a", 1_700_000_001_999, 1), ("u", "c", 1_700_000_003_000, 1)]
    p = write_rows(tmp_path / "ms.csv", rows)
    run(p, tmp_path / "o", user_core=0, item_core=0, timestamp_format="unix_ms")
    seq = pq.read_table(tmp_path / "o" / "sequences.parquet").to_pylist()[0]
    assert seq["timestamps"] == [1_700_000_001, 1_700_000_002, 1_700_000_003]
    items = {r["item"]: r["item_id"] for r in pq.read_table(tmp_path / "o" / "items.parquet").to_pylist()}
    assert [items[i] for i in seq["items"]] == ["a", "b", "c"]


# ------------------------------------------------------------------ ratings


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_non_finite_ratings_are_rejected_in_every_format(tmp_path, ray_session, fmt):
    values = ["nan", "inf", "-inf", "1e999", "NaN", "Infinity"]
    rows = good_rows() + [("u0", "i0", 200 + k, v) for k, v in enumerate(values)]
    if fmt == "csv":
        # one chunk that is all numbers (Arrow's fast path) and one with an empty rating (the slow path)
        p = write_rows(tmp_path / "log.csv", rows + [("u1", "i0", 300, "")])
    elif fmt == "jsonl":
        p = tmp_path / "log.jsonl"
        p.write_text("".join(json.dumps(dict(zip(HEADER, (u, i, t, float(v) if isinstance(v, str) else v)))) + "\n"
                             for u, i, t, v in rows))
    else:
        p = tmp_path / "log.parquet"
        pq.write_table(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                                 "timestamp": [r[2] for r in rows], "rating": [float(r[3]) for r in rows]}), p)
    m = run(p, tmp_path / "o", format=fmt, user_core=0, item_core=0, chunk_mb=0.0002)
    rej = rejects(tmp_path / "o")
    assert len(rej) == len(values) and {r["reason"] for r in rej} == {"rating is not a finite number"}
    assert {r["field"] for r in rej} == {"rating"} and balanced(m)


def test_dedup_keeps_null_and_value_ratings_apart():
    t = pa.table({"user_id": ["u"] * 4, "item_id": ["i"] * 4, "timestamp": pa.array([1] * 4, pa.int64()),
                  "rating": pa.array([None, 0.0, None, 0.0], pa.float64()), "_ord": pa.array([1, 2, 3, 4], pa.int64())})
    kept, dups = dedup_sorted(t)
    assert kept.column("_ord").to_pylist() == [1, 2] and sorted(dups.column("_ord").to_pylist()) == [3, 4]


# ------------------------------------------------------------------ JSONL


def test_jsonl_bad_values_are_rejected_naming_the_field(tmp_path):
    good = [json.dumps(dict(zip(HEADER, r))) for r in good_rows(1, 3)]
    bad = {
        "deep": ('{"user_id": ' + "[" * 5000 + "]" * 5000 + "}", "*", "JSON nested too deeply"),
        "list": ('{"user_id": ["u"], "item_id": "i", "timestamp": 1}', "user_id", "not a scalar"),
        "object": ('{"user_id": "u", "item_id": {"a": 1}, "timestamp": 1}', "item_id", "not a scalar"),
        "surrogate": ('{"user_id": "\\ud800", "item_id": "i", "timestamp": 1}', "user_id", "lone surrogate"),
        "array": ("[1, 2]", "*", "not an object"),
        "long int": ('{"user_id": "u", "item_id": "i", "timestamp": ' + "9" * 5000 + "}", "*", "invalid JSON"),
    }
    p = tmp_path / "log.jsonl"
    p.write_text("\n".join(good + [b[0] for b in bad.values()]) + "\n")
    valid, rej, rows = read_local(config(p, format="jsonl"), 1 << 20)
    got = {r["line"]: (r["field"], r["reason"]) for r in rej.to_pylist()}
    for k, (_, field, reason) in enumerate(bad.values(), len(good) + 1):
        assert got[k][0] == field and reason in got[k][1], (k, got[k])
    assert valid.num_rows == len(good) and rows == len(good) + len(bad)


# ------------------------------------------------------------------ Parquet


@pytest.mark.parametrize("kind", ["list", "struct"])
def test_parquet_non_scalar_id_column_is_an_input_error(tmp_path, kind):
    ids = pa.array([["u"]]) if kind == "list" else pa.array([{"a": 1}])
    p = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ids, "item_id": ["i"], "timestamp": [1], "rating": [1.0]}), p)
    with pytest.raises(InputError, match=r"log\.parquet: column 'user_id' \(user\) has type"):
        read_local(config(p, format="parquet"), 1 << 20)


def test_parquet_typed_columns_sub_second_binary_and_null(tmp_path):
    p = tmp_path / "log.parquet"
    pq.write_table(pa.table({
        "user_id": ["a", "b", None, "d"], "item_id": pa.array([b"x", b"\xff", b"y", b"z"]),
        "timestamp": pa.array([1500, 2999, 3000, -1], pa.timestamp("ms")), "rating": [1.0, 2.0, 3.0, 4.0]}), p)
    valid, rej, rows = read_local(config(p, format="parquet", timestamp_format="unix_ms"), 1 << 20)
    assert valid.column("timestamp").to_pylist() == [1]  # floored to seconds, not scaled again by unix_ms
    assert [(r["line"], r["field"], r["reason"]) for r in rej.to_pylist()] == [
        (2, "item_id", "invalid utf-8 bytes"), (3, "user_id", "missing user id"),
        (4, "timestamp", "negative timestamp (before 1970-01-01)")]


# ------------------------------------------------------------------ CSV quoting and headers


def test_quoted_delimiters_and_newlines_at_every_chunk_boundary(tmp_path):
    rows = [("u1", "i,1", 1, 5), ("u1", "multi\nline\nitem", 2, 4), ("u1", 'a"b', 3, ""), ("u2", "i,1", 4, 1),
            ("u2", "x\n\ny", 5, 2), ("u2", "plain", 6, 3)]
    p = write_rows(tmp_path / "q.csv", rows)
    want = [(r[0], r[1]) for r in rows]
    size = p.stat().st_size
    for chunk_bytes in range(1, size + 1):
        valid, rej, n = read_local(config(p), chunk_bytes)
        got = sorted(zip(valid.column("user_id").to_pylist(), valid.column("item_id").to_pylist()))
        assert got == sorted(want) and rej.num_rows == 0 and n == len(rows), chunk_bytes
    lines = valid.column("_ord").to_pylist()
    assert sorted(lines) == [2, 3, 6, 7, 8, 11]  # each record's first physical line


def test_unclosed_quote_is_an_input_error_naming_the_line(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text('user_id,item_id,timestamp\nu1,i1,1\nu1,"never closed,2\nu1,i3,3\n')
    for chunk_bytes in (1, 10, 1 << 20):
        with pytest.raises(InputError, match=r"q\.csv: line 3: a quoted field opened on this line is never closed"):
            read_local(config(p, columns={"rating": None}), chunk_bytes)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "catalog"])
def test_duplicate_column_names_are_an_input_error(tmp_path, fmt):
    if fmt == "parquet":
        p = tmp_path / "log.parquet"
        pq.write_table(pa.Table.from_arrays([pa.array(["u"]), pa.array(["i"]), pa.array([1]), pa.array(["j"])],
                                            names=["user_id", "item_id", "timestamp", "item_id"]), p)
        with pytest.raises(InputError, match="column 'item_id' appears 2 times"):
            read_local(config(p, format="parquet", columns={"rating": None}), 1 << 20)
        return
    p = write_rows(tmp_path / "log.csv", [("u", "i", 1, "x")], ["user_id", "item_id", "timestamp", "item_id"])
    if fmt == "csv":
        with pytest.raises(InputError, match=r"log\.csv: line 1 \(header\): column 'item_id' appears 2 times"):
            read_local(config(p, columns={"rating": None}), 1 << 20)
    else:
        with pytest.raises(InputError, match=r"log\.csv: line 1 \(header\): column 'item_id' appears 2 times"):
            read_catalog(config("x"), str(p))


# ------------------------------------------------------------------ catalogs


def test_catalog_bad_lines_are_rejected_rows(tmp_path):
    p = tmp_path / "items.jsonl"
    lines = [b'{"item_id": "a", "title": "A"}', b"[1]", b"5", b'{"item_id": ' + b"[" * 5000 + b"]" * 5000 + b"}",
             b'{"item_id": ["b"], "title": "B"}', b'{"item_id": "c", "title": "\xff"}', b"{bad", b"",
             b'{"item_id": "d", "title": "D"}']
    p.write_bytes(b"\n".join(lines) + b"\n")
    cat = read_catalog(config("x"), str(p))
    assert cat.table.column("key").to_pylist() == ["a", "d"]
    assert cat.table.column("category").to_pylist() == ["", ""]  # no category column: empty, not refused
    assert cat.rejects.column("line").to_pylist() == [2, 3, 4, 5, 6, 7]
    c = tmp_path / "items.csv"
    c.write_bytes(b'item_id,title\na,A\nb,\xffB\nc,"multi\nline"\nd\n')
    cat = read_catalog(config("x"), str(c))
    assert cat.table.column("title").to_pylist() == ["A", "multi\nline"]
    assert [(r["line"], r["reason"]) for r in cat.rejects.to_pylist()] == [
        (3, "catalog: invalid utf-8 bytes"), (6, "catalog: wrong field count (expected 2, got 1)")]


def test_blank_catalog_and_header_only_are_input_errors(tmp_path):
    blank = tmp_path / "blank.csv"
    blank.write_text("\n \n\n")
    with pytest.raises(InputError, match=r"blank\.csv: line 1: no readable header"):
        read_catalog(config("x"), str(blank))
    header, rows, numbers = read_delimited(str(write_rows(tmp_path / "h.csv", [("a", "b")], ["x", "y"])), ",",
                                           "utf-8", header=True)
    assert header == ["x", "y"] and rows == [["a", "b"]] and numbers == [2]
    assert read_delimited(str(tmp_path / "h.csv"), ",", "utf-8", header=False)[0] is None


# ------------------------------------------------------------------ encodings


def csv_text(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


#: (declared encoding, the codec of the body, byte order mark, bytes that are not valid in it)
WIDE_ENCODINGS = [("utf-16", "utf-16-le", codecs.BOM_UTF16_LE, b"\x00\xd8"),  # a lone high surrogate
                  ("utf-16-le", "utf-16-le", codecs.BOM_UTF16_LE, b"\x00\xd8"),
                  ("utf-16-be", "utf-16-be", b"", b"\xd8\x00"),
                  ("utf-32", "utf-32-be", codecs.BOM_UTF32_BE, b"\x00\x11\x00\x00")]  # past U+10FFFF


@pytest.mark.parametrize("encoding,body,bom,bad", WIDE_ENCODINGS, ids=[e[0] for e in WIDE_ENCODINGS])
def test_wide_encodings_read_logs_and_catalogs_with_their_line_numbers(tmp_path, ray_session, encoding, body,
                                                                       bom, bad):
    """UTF-16/32 newlines are not the byte 0x0A: the log is read from a UTF-8 copy, the catalog decoded
    whole; ids, line numbers and rejects (bad bytes included) are the original file's."""
    items = ["é0", "multi\nline☃", "i2", "i3"]
    rows = [(f"ü{u}", it, 100 + k, 4) for u in range(2) for k, it in enumerate(items)]
    log = tmp_path / "log.csv"  # line 1 header, lines 2-11 rows (one spans 2 lines), line 12 bad, 13-14 rows
    log.write_bytes(bom + csv_text([HEADER, *rows]).encode(body) + "ü0,".encode(body) + bad
                    + ",300,4\n".encode(body) + csv_text([("ü1", "i2", 301, 5), ("ü1", "i3", 302, 5)]).encode(body))
    cat = tmp_path / "items.csv"  # lines 3-5 one record, line 6 bad, line 7 an id the log does not use (not emitted)
    cat.write_bytes(bom + csv_text([("item_id", "title"), *[(it, f"T{it}") for it in items[:2]]]).encode(body)
                    + "x".encode(body) + bad + ",T\n".encode(body)
                    + csv_text([("unused", "U"), *[(it, f"T{it}") for it in items[2:]]]).encode(body))
    m = run(log, tmp_path / "o", encoding=encoding, items=str(cat), user_core=0, item_core=0, chunk_mb=0.0001,
            columns={"rating": "rating"})
    c = m["counts"]
    assert c["rows_in"] == 11 and c["rejected_total"] == 1 and c["kept"] == 10 and balanced(m)
    rej = rejects(tmp_path / "o")
    line_rej = [r for r in rej if r["file"] == str(log)]
    assert [(r["line"], r["reason"], r["field"]) for r in line_rej] == [(12, f"invalid {encoding} bytes", "*")]
    assert line_rej[0]["raw"] == "ü0," + "".join(f"\\x{b:02x}" for b in bad) + ",300,4"  # the original bytes
    cat_rej = [r for r in rej if r["file"] == str(cat)]
    assert [(r["line"], r["reason"]) for r in cat_rej] == [(6, f"catalog: invalid {encoding} bytes")]
    out_items = pq.read_table(tmp_path / "o" / "items.parquet").to_pylist()
    assert sorted(r["item_id"] for r in out_items) == sorted(items)
    assert {r["item_id"]: r["title"] for r in out_items}["multi\nline☃"] == "Tmulti\nline☃"
    seqs = pq.read_table(tmp_path / "o" / "sequences.parquet").to_pylist()
    assert sorted(len(s["items"]) for s in seqs) == [4, 6]
    users = pq.read_table(tmp_path / "o" / "users.parquet").column("user_id").to_pylist()
    assert sorted(users) == ["ü0", "ü1"]


def test_wide_encoding_jsonl_catalog_keeps_line_numbers(tmp_path):
    p = tmp_path / "items.jsonl"
    lines = [json.dumps({"item_id": "a", "title": "Ä"}, ensure_ascii=False), "", "[1]",
             json.dumps({"item_id": "b", "title": "B"})]
    p.write_bytes(codecs.BOM_UTF16_BE + "\n".join([*lines, ""]).encode("utf-16-be") + b"\xdc\x00"  # a lone surrogate
                  + "\n".encode("utf-16-be") + json.dumps({"item_id": "c", "title": "C"}).encode("utf-16-be"))
    cat = read_catalog(config("x", encoding="utf-16"), str(p))
    assert cat.table.column("key").to_pylist() == ["a", "b", "c"] and cat.table.column("title")[0].as_py() == "Ä"
    assert [(r["line"], r["reason"]) for r in cat.rejects.to_pylist()] == [
        (3, "catalog: JSON line is not an object"), (5, "catalog: invalid utf-16 bytes")]


def test_byte_chunking_only_for_encodings_whose_newline_is_the_byte_0x0a():
    for name in ("utf-8", "latin-1", "cp1252", "ascii", "shift_jis", "gb18030", "euc-kr"):
        assert splits_on_newline_bytes(name), name
    for name in ("utf-16", "utf-16-le", "utf-32-be", "utf-8-sig", "utf-7", "cp037", "iso2022_jp", "hz",
                 "raw_unicode_escape"):
        assert not splits_on_newline_bytes(name), name


@pytest.mark.parametrize("name", ["no-such-codec", "rot13", "base64", "undefined", "punycode"])
def test_unknown_or_unusable_encoding_is_refused_naming_the_field(name):
    with pytest.raises(ConfigError, match=r"^PreprocessConfig: encoding: .*" + re.escape(repr(name))):
        config("log.csv", encoding=name)


# ------------------------------------------------------------------ the published deftrec folders


def test_deftrec_rejected_sequence_keeps_accounting(tmp_path, ray_session):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "item_list.txt").write_text('org_id remap_id title\nA0 0 "T 0"\nA1 1 "T 1"\nA2 2 "Two words"\n'
                                     'A3 3 "T 3"\nAx x "bad index"\n')
    (d / "user_list.txt").write_text("org_id remap_id\nU0 0\nU1\nU2 2\n")  # line 3 is short
    (d / "train.txt").write_text("0 0 1 2\n1 0 1 99\n2 1 2 3\n")
    (d / "test.txt").write_text("0 0 1 2 3\n1 0 1 99 2\n2 1 2 3 0\n")
    m = run(d, tmp_path / "o", format="deftrec")
    c = m["counts"]
    assert c["rows_in"] == 12 and c["rejected_total"] == 4 and c["kept"] == 8 and balanced(m)
    rej = rejects(tmp_path / "o")
    assert {(Path(r["file"]).name, r["line"]) for r in rej} == {("test.txt", 2), ("user_list.txt", 3),
                                                                 ("item_list.txt", 6)}
    items = pq.read_table(tmp_path / "o" / "items.parquet").to_pylist()
    assert items[2] == {"item": 2, "item_id": "A2", "title": "Two words", "category": ""}
    users = pq.read_table(tmp_path / "o" / "users.parquet").to_pylist()
    assert users == [{"user": 0, "user_id": "U0"}, {"user": 2, "user_id": "U2"}]


# ------------------------------------------------------------------ folders, offsets


def test_folder_input_reads_partitions_and_skips_markers(tmp_path, ray_session):
    root = tmp_path / "logs"
    for day in ("day=2026-01-01", "day=2026-01-02"):
        (root / day).mkdir(parents=True)
        write_rows(root / day / "part-0.csv", [(f"u{u}", f"i{k}", int(day[-1]) * 10 + k, 5)
                                               for u in range(2) for k in range(3)])
    (root / "_SUCCESS").touch()
    (root / ".part-0.csv.crc").write_bytes(b"\x00\x01")
    (root / "_temporary").mkdir()
    (root / "_temporary" / "junk.csv").write_text("junk")
    (root / "day=2026-01-01" / "empty.csv").touch()
    m = run(root, tmp_path / "o", user_core=0, item_core=0)
    assert m["counts"]["rows_in"] == 12 and m["counts"]["kept"] == 12
    assert sorted(Path(p).name for p in m["inputs"]) == ["part-0.csv", "part-0.csv"]
    assert {Path(p.rstrip("/")).name: why for p, why in m["inputs_skipped"].items()} == {
        "_SUCCESS": "name starts with '_' (marker or metadata)", ".part-0.csv.crc": "hidden (name starts with '.')",
        "_temporary": "name starts with '_' (marker or metadata)", "empty.csv": "empty file"}


def test_hash_accepts_large_string_offsets():
    ids = [f"user{i}" for i in range(100)]
    assert (hash_strings(pa.array(ids, pa.large_string())) == hash_strings(pa.array(ids))).all()
    assert (hash_strings(pa.array(ids).slice(10)) == hash_strings(pa.array(ids[10:]))).all()


def test_csv_writer_output_round_trips_through_the_reader(tmp_path):
    """Python's csv quoting of awkward ids (delimiters, quotes, newlines, unicode) is read back exactly."""
    ids = ["a,b", 'q"uote', "new\nline", "é☃", "tab\tx", "x  y"]
    rows = [(f"u{k}{s}u", f"i{s}i", k + 1, k) for k, s in enumerate(ids)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    p = tmp_path / "w.csv"
    p.write_text(",".join(HEADER) + "\n" + buf.getvalue())
    valid, rej, n = read_local(config(p), 16)
    assert rej.num_rows == 0 and n == len(rows)
    assert sorted(valid.column("item_id").to_pylist()) == sorted(r[1] for r in rows)
    assert np.array_equal(np.sort(valid.column("timestamp").to_numpy()), np.arange(1, len(rows) + 1))
