"""Property test of the readers: random logs that mix valid rows with every class of bad value,
in every input format, through ``run_preprocess`` (the function the ``preprocess`` stage runs).

For each generated input the test knows which records are bad and asserts that
- no exception escapes except the documented file-level ``InputError`` (and that one only for an
  input generated with a file-level defect, with the file named in the message);
- ``rows_in == rejected + removed + kept`` in the manifest, and ``rows_in`` counts every record
  written (nothing disappears);
- the rejects are exactly the bad records: each with its file, line, field and a reason.

Formats: csv, tsv, csv with another delimiter, csv without a header (positional columns), jsonl,
parquet (typed columns), movielens ``::`` and the deftrec folders; single files and Hive-style
partitioned folders with marker files; optional item catalogs (csv or jsonl) with bad rows; tiny
chunk sizes so records (quoted newlines included) straddle chunk boundaries. Bounded and
derandomized (``FUZZ_EXAMPLES`` examples per format, 8 by default: 64 inputs, the same every run)
to stay fast and reproducible; ``DEFTREC_FUZZ_EXAMPLES=200`` explores further, and
``DEFTREC_FUZZ_SHRINK=0`` reports a failure without minimising it first.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from deftrec.config.data import PreprocessConfig
from deftrec.core.config import from_dict
from deftrec.data.preprocess import run_preprocess
from deftrec.data.readers import InputError

FUZZ_EXAMPLES = int(os.environ.get("DEFTREC_FUZZ_EXAMPLES", "8"))  # per format
# Shrinking a failure reruns the pipeline hundreds of times; DEFTREC_FUZZ_SHRINK=0 reports it as found.
FUZZ_PHASES = tuple(Phase) if os.environ.get("DEFTREC_FUZZ_SHRINK", "1") != "0" else (Phase.explicit, Phase.generate)
ROLES = ("user", "item", "timestamp", "rating")
NAMES = {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "rating": "rating"}

# bad values shared by the text formats: class -> (role, value); the role's column is the reject field
VALUE_BAD = {
    "ts int overflow": ("timestamp", "99999999999999999999"), "ts float overflow": ("timestamp", "1e30"),
    "ts overflows to inf": ("timestamp", "1e400"), "ts negative": ("timestamp", "-5"),
    "ts negative decimal": ("timestamp", "-0.5"), "ts garbage": ("timestamp", "yesterday"),
    "ts missing": ("timestamp", ""), "rating nan": ("rating", "nan"), "rating NaN": ("rating", "NaN"),
    "rating inf": ("rating", "inf"), "rating -inf": ("rating", "-Infinity"), "rating overflow": ("rating", "1e999"),
    "rating garbage": ("rating", "five"), "user missing": ("user", ""), "item missing": ("item", ""),
}
LINE_BAD = ("extra field", "missing field", "invalid bytes")  # whole-record problems: field "*"
JSON_BAD = {  # class -> (field role or "*", line builder)
    "deep": ("*", lambda o: '{"user_id": ' + "[" * 3000 + "]" * 3000 + "}"),
    "list id": ("user", lambda o: json.dumps({**o, "user_id": [o["user_id"]]})),
    "object id": ("item", lambda o: json.dumps({**o, "item_id": {"id": o["item_id"]}})),
    "surrogate": ("user", lambda o: json.dumps(o).replace('"user_id": "', '"user_id": "\\ud800', 1)),
    "not an object": ("*", lambda o: json.dumps(list(o.values()))),
    "invalid json": ("*", lambda o: json.dumps(o)[:-1]),
    "key absent": ("user", lambda o: json.dumps({k: v for k, v in o.items() if k != "user_id"})),
    "ts number overflow": ("timestamp", lambda o: json.dumps({**o, "timestamp": 99999999999999999999})),
    "ts float number": ("timestamp", lambda o: json.dumps({**o, "timestamp": 1e30})),
    "ts bool": ("timestamp", lambda o: json.dumps({**o, "timestamp": True})),
    "rating NaN number": ("rating", lambda o: json.dumps({**o, "rating": float("nan")})),
    "rating Infinity number": ("rating", lambda o: json.dumps({**o, "rating": float("inf")})),
}
PARQUET_TS_TYPES = ("int64", "uint64", "float64", "string", "timestamp[ms]")
# parquet bad values per column type: class -> (role, column type it needs or None, value)
PARQUET_BAD = {
    "ts negative int": ("timestamp", "int64", -5), "ts uint64 overflow": ("timestamp", "uint64", 2 ** 64 - 1),
    "ts float overflow": ("timestamp", "float64", 1e30), "ts float nan": ("timestamp", "float64", float("nan")),
    "ts negative float": ("timestamp", "float64", -0.5), "ts string overflow": ("timestamp", "string", "1e400"),
    "ts string garbage": ("timestamp", "string", "soon"), "ts before 1970": ("timestamp", "timestamp[ms]", -1500),
    "ts null": ("timestamp", None, None), "rating nan": ("rating", None, float("nan")),
    "rating inf": ("rating", None, float("inf")), "rating -inf": ("rating", None, float("-inf")),
    "user null": ("user", None, None), "user empty": ("user", None, ""), "item bad bytes": ("item", None, b"\xff"),
}
# awkward but valid id characters: delimiters, quotes, newlines, spaces, unicode
ID_CHARS = list('ab,;|"\n \t\'é☃:x')


@dataclasses.dataclass
class Case:
    """One generated input: what to run and what must come out."""

    kwargs: dict  # PreprocessConfig fields
    bad: dict  # (file, line) -> expected field ("*" or a column name); None = only its presence is checked
    rows: int  # records written (deftrec: items on the test lines)
    defect: str | None = None  # a file-level defect: InputError expected, naming ``defect_file``
    defect_file: str = ""
    skipped: tuple = ()  # names that a folder input must skip


def _id(draw, prefix: str, k: int, plain: bool) -> str:
    mid = "" if plain else draw(st.text(st.sampled_from(ID_CHARS), max_size=3))
    return f"{prefix}{k}{mid}z"  # starts and ends with a letter: trimming never changes it


def _good_events(draw, plain: bool, ms: bool, iso: bool):
    """Users with distinct timestamps (user 0 has at least 3 events, so one sequence survives)."""
    items = [_id(draw, "i", k, plain) for k in range(draw(st.integers(2, 5)))]
    events = []
    for u in range(draw(st.integers(1, 3))):
        user = _id(draw, "u", u, plain)
        for j in range(draw(st.integers(3 if u == 0 else 1, 5))):
            t = 1_600_000_000 + 7 * j
            ts = f"2020-01-0{1 + j} 00:00:00" if iso and draw(st.booleans()) else str(t * 1000 if ms else t)
            rating = draw(st.sampled_from(["", "1", "4.5", "-2", "0"]))
            events.append({"user": user, "item": draw(st.sampled_from(items)), "timestamp": ts, "rating": rating})
    return events, items


def _mix(draw, good: list, bad_classes: list) -> list:
    """Good events and ("bad", class, base event) entries in a random order; a good event leads."""
    bad = [("bad", c, dict(draw(st.sampled_from(good)))) for c in bad_classes]
    dups = [("good", None, dict(e)) for e in draw(st.lists(st.sampled_from(good), max_size=2))]  # exact duplicates
    rest = draw(st.permutations([("good", None, e) for e in good[1:]] + bad + dups))
    return [("good", None, good[0])] + list(rest)


# ------------------------------------------------------------------ text formats (csv family, movielens)


def _text_case(draw, root: Path, fmt: str) -> Case:
    movielens = fmt == "movielens"
    ms = not movielens and draw(st.booleans())
    events, items = _good_events(draw, plain=movielens, ms=ms, iso=not ms and not movielens)
    classes = list(VALUE_BAD) + [c for c in LINE_BAD if not (movielens and c == "invalid bytes")]
    records = _mix(draw, events, draw(st.lists(st.sampled_from(classes), max_size=6)))
    kw = {"user_core": 0, "item_core": 0, "timestamp_format": "unix_ms" if ms else "auto",
          "chunk_mb": draw(st.sampled_from([64, 0.0001, 0.0004]))}
    if movielens:
        order, delim, header, kw["format"] = ["user", "item", "rating", "timestamp"], "::", False, "movielens"
        cols = {r: str(order.index(r)) for r in ROLES}
    else:
        order = draw(st.permutations(list(ROLES)))
        delim = {"csv": ",", "tsv": "\t", "delimited": draw(st.sampled_from([";", "|"])), "noheader": ","}[fmt]
        header = fmt != "noheader"
        kw["format"] = "tsv" if fmt == "tsv" else "csv"
        if fmt == "delimited":
            kw["delimiter"] = delim
        if not header:
            kw["header"] = False
            kw["columns"] = {r: str(order.index(r)) for r in ROLES}
        cols = {r: (NAMES[r] if header else str(order.index(r))) for r in ROLES}
    folder = not movielens and draw(st.booleans())
    split = next((k for k in range(len(records) // 2 + 1, len(records)) if records[k][0] == "good"), None)
    # each file starts with a good record: without a header, its line 1 sets the field count
    parts = [records[:split], records[split:]] if folder and split else [records]
    bad, case_rows, paths = {}, 0, []
    for k, part in enumerate(parts):
        path = root / "log" / f"day=2026-01-0{k + 1}" / "part-0.csv" if folder else root / f"log.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        out = io.BytesIO()
        line = 1
        if header:
            out.write(_csv_line([NAMES[r] for r in order], delim))
            line = 2
        for j, (kind, cls, e) in enumerate(part):
            if j and draw(st.integers(0, 5)) == 0:  # blank lines: counted apart, never rows
                out.write(draw(st.sampled_from([b"\n", b"  \n"])))
                line += 1
            raw, field = _text_record(kind, cls, e, order, delim, movielens, cols)
            if kind == "bad":
                bad[(str(path), line)] = field
            out.write(raw)
            line += raw.count(b"\n")
            case_rows += 1
        path.write_bytes(out.getvalue())
        paths.append(path)
    kw["input"] = [str(root / "log")] if folder else [str(paths[0])]
    skipped = ()
    if folder:
        (root / "log" / "_SUCCESS").touch()
        (root / "log" / ".part-0.csv.crc").write_bytes(b"\x00crc")
        skipped = ("_SUCCESS", ".part-0.csv.crc")
    case = Case(kw, bad, case_rows, skipped=skipped)
    if not movielens and draw(st.integers(0, 2)) == 0:
        _add_catalog(draw, root, case, items)
    if not movielens and draw(st.integers(0, 7)) == 0:
        _add_text_defect(draw, case, paths[0], header, delim)
    return case


def _csv_line(fields: list, delim: str) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delim, lineterminator="\n").writerow(fields)
    return buf.getvalue().encode("utf-8")


def _text_record(kind, cls, e, order, delim, movielens, cols) -> tuple[bytes, str | None]:
    e = dict(e)
    field = None
    if kind == "bad" and cls in VALUE_BAD:
        role, value = VALUE_BAD[cls]
        e[role], field = value, cols[role]
    values = [e[r] for r in order]
    if cls == "extra field":
        values.append("extra")
    elif cls == "missing field":
        values = values[:-1]
    raw = ("::".join(values) + "\n").encode("latin-1") if movielens else _csv_line(values, delim)
    if cls in LINE_BAD:
        field = "*"
        if cls == "invalid bytes":
            raw = raw[:-1] + b"\xff\n"
    return raw, field


def _add_text_defect(draw, case: Case, path: Path, header: bool, delim: str) -> None:
    kind = draw(st.sampled_from(["unclosed quote"] + (["duplicate column"] if header else [])))
    data = path.read_bytes()
    if kind == "unclosed quote":  # a quote opened at the start of the last field and never closed
        path.write_bytes(data + delim.encode() + b'"never closed\n')
    else:
        first, rest = data.split(b"\n", 1)
        path.write_bytes(first + delim.encode() + b"user_id\n" + rest)
    case.defect, case.defect_file = kind, str(path)


# ------------------------------------------------------------------ JSONL and Parquet


def _jsonl_case(draw, root: Path) -> Case:
    ms = draw(st.booleans())
    events, items = _good_events(draw, plain=False, ms=ms, iso=not ms)
    classes = list(JSON_BAD) + list(VALUE_BAD) + ["invalid bytes"]
    records = _mix(draw, events, draw(st.lists(st.sampled_from(classes), max_size=6)))
    path = root / "log.jsonl"
    out, bad, line = io.BytesIO(), {}, 1
    for kind, cls, e in records:
        obj = {NAMES[r]: e[r] for r in ROLES}
        if cls in JSON_BAD:
            role, build = JSON_BAD[cls]
            text, field = build(obj), role if role == "*" else NAMES[role]
        elif cls in VALUE_BAD:
            role, value = VALUE_BAD[cls]
            text, field = json.dumps({**obj, NAMES[role]: value}), NAMES[role]
        else:
            text, field = json.dumps(obj), ("*" if cls == "invalid bytes" else None)
        raw = text.encode("utf-8") + (b"\xff" if cls == "invalid bytes" else b"") + b"\n"
        if kind == "bad":
            bad[(str(path), line)] = field
        out.write(raw)
        line += 1
    path.write_bytes(out.getvalue())
    kw = {"input": [str(path)], "format": "jsonl", "user_core": 0, "item_core": 0,
          "timestamp_format": "unix_ms" if ms else "auto", "chunk_mb": draw(st.sampled_from([64, 0.0002]))}
    case = Case(kw, bad, len(records))
    if draw(st.integers(0, 2)) == 0:
        _add_catalog(draw, root, case, items)
    return case


def _parquet_value(role: str, e: dict, ts_type: str):
    v = e[role]
    if role == "timestamp":
        return int(v) * (1000 if ts_type == "timestamp[ms]" else 1) if ts_type != "string" else v
    if role == "rating":
        return float(v) if v != "" else None
    return v


def _parquet_case(draw, root: Path) -> Case:
    events, items = _good_events(draw, plain=False, ms=False, iso=False)
    ts_type = draw(st.sampled_from(PARQUET_TS_TYPES))
    item_type = draw(st.sampled_from(["string", "large_string", "dictionary", "binary"]))
    classes = [c for c, (_, t, _) in PARQUET_BAD.items() if t in (None, ts_type)
               and (c != "item bad bytes" or item_type == "binary")]
    records = _mix(draw, events, draw(st.lists(st.sampled_from(classes), max_size=6)))
    cols = {r: [] for r in ROLES}
    folder = draw(st.booleans())
    path = root / "log" / "day=1" / "part-0.parquet" if folder else root / "log.parquet"
    bad = {}
    for n, (kind, cls, e) in enumerate(records, 1):
        for r in ROLES:
            cols[r].append(_parquet_value(r, e, ts_type))
        if kind == "bad":
            role, _, value = PARQUET_BAD[cls]
            cols[role][-1] = value
            bad[(str(path), n)] = NAMES[role]
    ts_arrow = {"int64": pa.int64(), "uint64": pa.uint64(), "float64": pa.float64(), "string": pa.string(),
                "timestamp[ms]": pa.timestamp("ms")}[ts_type]
    items_arr = pa.array([v.encode() if isinstance(v, str) else v for v in cols["item"]], pa.binary()) \
        if item_type == "binary" else pa.array(cols["item"], pa.large_string() if item_type == "large_string"
                                               else pa.string())
    if item_type == "dictionary":
        items_arr = items_arr.dictionary_encode()
    table = pa.table({"user_id": pa.array(cols["user"], pa.string()), "item_id": items_arr,
                      "timestamp": pa.array(cols["timestamp"], ts_arrow), "rating": pa.array(cols["rating"],
                                                                                            pa.float64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=draw(st.integers(1, 8)))
    kw = {"input": [str(root / "log") if folder else str(path)], "format": "parquet", "user_core": 0,
          "item_core": 0}
    skipped = ()
    if folder:
        (root / "log" / "_SUCCESS").touch()
        (root / "log" / "_common_metadata").write_bytes(b"PAR1")
        skipped = ("_SUCCESS", "_common_metadata")
    case = Case(kw, bad, len(records), skipped=skipped)
    if draw(st.integers(0, 7)) == 0:  # a list-typed id column is a file-level schema problem
        pq.write_table(table.set_column(0, "user_id", pa.array([[u] for u in cols["user"]])), path)
        case.defect, case.defect_file = "list column", str(path)
    return case


# ------------------------------------------------------------------ catalogs and deftrec folders


def _add_catalog(draw, root: Path, case: Case, items: list) -> None:
    """An item catalog listing every item, with bad catalog rows mixed in."""
    kind = draw(st.sampled_from(["csv", "jsonl"]))
    path = root / f"items.{kind}"
    with_category = draw(st.booleans())
    rows = [("good", it) for it in items]
    rows += [("bad", c) for c in draw(st.lists(st.sampled_from(["no title", "duplicate", "bad bytes", "short"]
                                                               + (["deep", "not object", "list id", "invalid json"]
                                                                  if kind == "jsonl" else [])), max_size=4))]
    rows = draw(st.permutations(rows))
    out, line = io.BytesIO(), 1
    if kind == "csv":
        out.write(_csv_line(["item_id", "title"] + (["category"] if with_category else []), ","))
        line = 2
    first_good = None
    for k, (state, what) in enumerate(rows):
        if state == "good":
            rec = {"item_id": what, "title": f"Title {what}", "category": "C"}
            first_good = first_good or what
        else:
            if what == "duplicate" and first_good is None:  # a duplicate needs an earlier row to repeat
                what = "no title"
            rec = {"item_id": first_good if what == "duplicate" else f"extra{k}",
                   "title": "" if what == "no title" else "T", "category": "C"}
        if not with_category:
            rec.pop("category")
        raw = _catalog_line(kind, what if state == "bad" else None, rec)
        if state == "bad":
            case.bad[(str(path), line)] = None  # catalog rejects: presence is checked
        out.write(raw)
        line += raw.count(b"\n")
    path.write_bytes(out.getvalue())
    case.kwargs["items"] = str(path)


def _catalog_line(kind: str, bad: str | None, rec: dict) -> bytes:
    if kind == "csv":
        values = list(rec.values())
        raw = _csv_line(values[:1] if bad == "short" else values, ",")
        return raw[:-1] + b"\xff\n" if bad == "bad bytes" else raw
    text = {"deep": '{"item_id": ' + "[" * 3000 + "]" * 3000 + "}", "not object": json.dumps(list(rec.values())),
            "list id": json.dumps({**rec, "item_id": [rec["item_id"]]}), "invalid json": json.dumps(rec)[:-1],
            "short": json.dumps({"item_id": rec["item_id"]})}.get(bad, json.dumps(rec))
    return text.encode() + (b"\xff" if bad == "bad bytes" else b"") + b"\n"


def _deftrec_case(draw, root: Path) -> Case:
    d = root / "ds"
    d.mkdir()
    n_items = draw(st.integers(3, 6))
    with_category = draw(st.booleans())
    item_rows = [[f"A{i}", str(i), f"Title {i} with \"quotes\" and spaces"] + (["Cat|Sub"] if with_category else [])
                 for i in range(n_items)]
    bad = {}
    extra = draw(st.lists(st.sampled_from(["bad index", "no title", "duplicate", "short"]), max_size=3))
    lines = [_csv_line(["org_id", "remap_id", "title"] + (["category"] if with_category else []), " ")]
    seen_index = None
    for r in draw(st.permutations(item_rows + [["bad", x] for x in extra])):
        if r[0] != "bad":
            seen_index = seen_index or r[1]
        else:
            what = r[1] if r[1] != "duplicate" or seen_index else "bad index"  # a duplicate repeats an earlier row
            base = [f"B{len(lines)}", "x" if what == "bad index" else str(n_items + len(lines)), "T"] + \
                (["C"] if with_category else [])
            if what == "no title":
                base[2] = ""
            elif what == "duplicate":
                base[1] = seen_index
            elif what == "short":
                base = base[:2]
            bad[(str(d / "item_list.txt"), len(lines) + 1)] = None
            r = base
        lines.append(_csv_line(r, " "))
    (d / "item_list.txt").write_bytes(b"".join(lines))
    n_users = draw(st.integers(1, 4))
    train, test, users = [], [], [b"org_id remap_id\n"]
    rows, user_zero_listed = 0, False
    for u in range(n_users):
        seq = [str(draw(st.integers(0, n_items - 1))) for _ in range(draw(st.integers(3, 6)))]
        kind = "good" if u == 0 else draw(st.sampled_from(["good", "good", "unknown item", "bad bytes"]))
        if kind == "unknown item":
            seq[draw(st.integers(0, len(seq) - 1))] = str(n_items + 100)
        train.append(" ".join([str(u)] + seq[:-1]).encode() + b"\n")
        line = " ".join([str(u)] + seq).encode() + (b"\xff" if kind == "bad bytes" else b"") + b"\n"
        test.append(line)
        rows += len(seq)
        if kind != "good":
            bad[(str(d / "test.txt"), u + 1)] = "item" if kind == "unknown item" else "*"
        user_kind = draw(st.sampled_from(["good", "good", "good", "short", "duplicate"]))
        users.append(f"U{u} {u}\n".encode() if user_kind == "good" else f"U{u}\n".encode() if user_kind == "short"
                     else b"Udup 0\n")
        # "Udup 0" is only a duplicate once some row has mapped remap_id 0
        if user_kind == "short" or (user_kind == "duplicate" and user_zero_listed):
            bad[(str(d / "user_list.txt"), u + 2)] = None
        user_zero_listed |= u == 0 and user_kind == "good" or user_kind == "duplicate"
    (d / "train.txt").write_bytes(b"".join(train))
    (d / "test.txt").write_bytes(b"".join(test))
    (d / "user_list.txt").write_bytes(b"".join(users))
    return Case({"input": [str(d)], "format": "deftrec"}, bad, rows)


# ------------------------------------------------------------------ the property


FORMATS = ("csv", "tsv", "delimited", "noheader", "jsonl", "parquet", "movielens", "deftrec")


@st.composite
def cases(draw, root: Path, fmt: str) -> Case:
    if fmt == "jsonl":
        return _jsonl_case(draw, root)
    if fmt == "parquet":
        return _parquet_case(draw, root)
    if fmt == "deftrec":
        return _deftrec_case(draw, root)
    return _text_case(draw, root, fmt)


def _rejects(out: Path) -> list[dict]:
    return [r for f in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def check_case(case: Case, out: Path) -> None:
    cfg = from_dict(PreprocessConfig, {**case.kwargs, "output": str(out)})
    event(f"format {case.kwargs.get('format', 'csv')}{' (folder)' if case.skipped else ''}"
          f"{' + catalog' if case.kwargs.get('items') else ''}")
    event(f"defect: {case.defect}" if case.defect else f"{min(len(case.bad), 5)}{'+' if len(case.bad) >= 5 else ''} "
          f"bad records")
    try:
        m = run_preprocess(cfg, log=lambda s: None)
    except InputError as e:
        assert case.defect, f"InputError for an input without a file-level defect: {e}"
        assert case.defect_file in str(e), (case.defect, str(e))
        return
    assert not case.defect, f"{case.defect} in {case.defect_file} was not reported"
    c = m["counts"]
    assert c["rows_in"] == c["rejected_total"] + c["removed_total"] + c["kept"], c
    assert c["rows_in"] == case.rows, (c["rows_in"], case.rows)  # every record written is counted
    rej = _rejects(out)
    got = {(r["file"], r["line"]) for r in rej}
    assert got == set(case.bad), {"missing": set(case.bad) - got, "unexpected": got - set(case.bad)}
    for r in rej:
        want = case.bad[(r["file"], r["line"])]
        assert r["reason"] and r["field"] and r["raw"] is not None, r
        assert want is None or r["field"] == want, (r, want)
    meta = {case.kwargs.get("items")} | {str(Path(case.kwargs["input"][0]) / n) for n in ("item_list.txt",
                                                                                     "user_list.txt")}
    assert sum(1 for r in rej if r["file"] not in meta) == c["rejected_total"]  # catalog rows are counted apart
    assert {Path(p.rstrip("/")).name for p in m["inputs_skipped"]} == set(case.skipped)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True, phases=FUZZ_PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_bad_input_never_crashes_or_disappears(fmt, data):
    with tempfile.TemporaryDirectory(prefix="deftrec-fuzz-") as tmp:
        root = Path(tmp)
        case = data.draw(cases(root, fmt), label="case")
        check_case(case, root / "out")


# ------------------------------------------------------------------ byte soup, reader level (no Ray)

# tokens that stress the record splitter, the quote state machine and the decoders
SOUP = [b",", b'"', b'""', b"\n", b"\r\n", b"\r", b"\xff", b"\xc3", b"u1", b"i2", b"12", b"-3", b"1e30", b"nan",
        b" ", b"\t", b"::", b"{", b"}", b"[", b"]", b'"user_id": ', b"\\u", b"\x00", b"\xe2\x98\x83", b"\n\n"]


def _soup_config(path: Path, fmt: str) -> PreprocessConfig:
    kw = {"csv": {}, "tsv": {"format": "tsv"}, "jsonl": {"format": "jsonl"}, "movielens": {"format": "movielens"},
          "noheader": {"header": False, "columns": {"user": "0", "item": "1", "timestamp": "2", "rating": None}}}[fmt]
    return from_dict(PreprocessConfig, {"input": [str(path)], "output": "unused", **kw})


def _soup_read(cfg: PreprocessConfig, chunk_bytes: int):
    from tests.test_reader_inputs import read_local

    try:
        return read_local(cfg, chunk_bytes)
    except InputError as e:
        assert cfg.input[0] in str(e), str(e)  # a file-level error names the file
        return None


@settings(max_examples=150, deadline=None, database=None, derandomize=True, phases=FUZZ_PHASES)
@given(fmt=st.sampled_from(["csv", "tsv", "jsonl", "movielens", "noheader"]),
       body=st.lists(st.sampled_from(SOUP), max_size=40), chunk_bytes=st.integers(1, 48))
def test_byte_soup_is_rejected_not_raised_and_chunking_does_not_matter(tmp_path_factory, fmt, body, chunk_bytes):
    path = tmp_path_factory.mktemp("soup") / "log.txt"
    header = {"csv": b"user_id,item_id,timestamp,rating\n", "tsv": b"user_id\titem_id\ttimestamp\trating\n"}
    # without a header, line 1 sets the field count: start with a good record
    header.update(noheader=b"u1,i2,3\n", movielens=b"u1::i2::3::4\n")
    path.write_bytes(header.get(fmt, b"") + b"".join(body) + b"\n")
    cfg = _soup_config(path, fmt)
    whole = _soup_read(cfg, 1 << 20)
    split = _soup_read(cfg, chunk_bytes)
    assert (whole is None) == (split is None)
    event(f"{fmt}: " + ("InputError" if whole is None else f"{min(whole[1].num_rows, 3)}+ rejects"))
    if whole is None:
        return
    for valid, rej, rows in (whole, split):
        assert valid.num_rows + rej.num_rows == rows  # every record is valid or rejected
        lines = [o & ((1 << 40) - 1) for o in valid.column("_ord").to_pylist()] + rej.column("line").to_pylist()
        assert len(lines) == len(set(lines))  # and counted once
        assert all(r["field"] and r["reason"] for r in rej.to_pylist())
    assert split[0].drop_columns(["_bucket"]).sort_by("_ord").equals(whole[0].drop_columns(["_bucket"]).sort_by("_ord"))
    assert split[1].sort_by("line").equals(whole[1].sort_by("line"))


@settings(max_examples=100, deadline=None, database=None, derandomize=True, phases=FUZZ_PHASES)
@given(kind=st.sampled_from(["csv", "tsv", "jsonl", "dat"]), body=st.lists(st.sampled_from(SOUP), max_size=40))
def test_catalog_byte_soup_is_rejected_or_an_input_error(tmp_path_factory, kind, body):
    from deftrec.data.catalog import read_catalog

    path = tmp_path_factory.mktemp("cat") / f"items.{kind}"
    header, good = {"csv": (b"item_id,title,category\n", b"g1,T,C\n"), "tsv": (b"item_id\ttitle\n", b"g1\tT\n"),
                    "jsonl": (b"", b'{"item_id": "g1", "title": "T"}\n'), "dat": (b"", b"g1::T::C\n")}[kind]
    path.write_bytes(header + good + b"".join(body) + b"\n" + good.replace(b"g1", b"g2"))
    cfg = from_dict(PreprocessConfig, {"input": ["x"], "output": "unused", **(
        {"catalog_columns": {"item": "0", "title": "1", "category": "2"}} if kind == "dat" else {})})
    try:
        cat = read_catalog(cfg, str(path))
    except InputError as e:
        assert str(path) in str(e), str(e)
        event(f"{kind}: InputError")
        return
    event(f"{kind}: catalog of {min(cat.table.num_rows, 2)}+ rows, {min(cat.rejects.num_rows, 2)}+ rejects")
    keys = cat.table.column("key").to_pylist()
    assert all(k and k == k.strip() for k in keys) and len(keys) == len(set(keys))
    assert all(r["line"] >= 1 and r["reason"] for r in cat.rejects.to_pylist())
