"""Preprocessing on Ray: faithfulness, equality with the pandas reference, bad input, atomicity."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deftrec.config.data import PreprocessConfig
from deftrec.core.artifacts import read_manifest, verify_outputs
from deftrec.core.config import from_dict
from deftrec.data.preprocess import run_preprocess
from deftrec.data.reference import reference_preprocess
from deftrec.data.splits import build_splits, sort_key_ids
from deftrec.data.validation import hash_strings

pytestmark = pytest.mark.usefixtures("ray_session")


def run(inp, out, **kw) -> dict:
    data = {"input": [str(x) for x in (inp if isinstance(inp, list) else [inp])], "output": str(out), **kw}
    return run_preprocess(from_dict(PreprocessConfig, data), log=lambda s: None)


def table(out, name) -> list[dict]:
    return sorted(pq.read_table(Path(out) / f"{name}.parquet").to_pylist(), key=lambda r: r.get("user", r.get("item")))


def write_csv(path, header, rows, delim=","):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(delim.join(header) + "\n")
        for r in rows:
            f.write(delim.join(str(x) for x in r) + "\n")
    return path


# ------------------------------------------------------------------ pure helpers


def test_build_splits_hand_example():
    # user 0: items 5 6 7 8 9 (chronological), user 1: 1 2 3
    u = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    i = np.array([5, 6, 7, 8, 9, 1, 2, 3], np.int32)
    s = build_splits(u, i, np.arange(8), max_history=2)
    assert s["sequences"].column("items").to_pylist() == [[5, 6, 7, 8, 9], [1, 2, 3]]
    assert s["test"].to_pylist() == [{"user": 0, "history": [7, 8], "target": 9},
                                     {"user": 1, "history": [1, 2], "target": 3}]
    assert s["valid"].to_pylist() == [{"user": 0, "history": [6, 7], "target": 8},
                                      {"user": 1, "history": [1], "target": 2}]
    assert s["train"].to_pylist() == [{"user": 0, "history": [5, 6], "target": 7},
                                      {"user": 1, "history": [], "target": 1}]


def test_id_order_numeric_then_lexicographic():
    assert sort_key_ids(["10", "9", "100"]).to_pylist() == ["9", "10", "100"]
    assert sort_key_ids(["b", "a10", "a9"]).to_pylist() == ["a10", "a9", "b"]


def test_hash_is_deterministic_and_spreads():
    a = pa.array([f"user{i}" for i in range(10000)])
    h1, h2 = hash_strings(a), hash_strings(pa.array(a.to_pylist()))
    assert (h1 == h2).all()
    counts = np.bincount((h1 % np.uint64(8)).astype(int), minlength=8)
    assert counts.min() > 1000  # roughly uniform over 8 buckets
    assert hash_strings(pa.array(["", "x"]))[0] != hash_strings(pa.array(["", "x"]))[1]


# ------------------------------------------------------------------ synthetic data: structure + reference


def test_synth_is_deterministic_and_streams(tmp_path):
    from deftrec.config.data import SynthConfig
    from deftrec.data.synth import generate

    a = generate(SynthConfig(users=50, items=60, seed=3, chunk_users=20), tmp_path / "a", log=lambda s: None)
    b = generate(SynthConfig(users=50, items=60, seed=3, chunk_users=20), tmp_path / "b", log=lambda s: None)
    c = generate(SynthConfig(users=50, items=60, seed=4, chunk_users=20), tmp_path / "c", log=lambda s: None)
    assert a["outputs"] == b["outputs"]
    assert a["outputs"]["interactions.csv"] != c["outputs"]["interactions.csv"]
    cat = list(csv.DictReader(open(tmp_path / "a" / "items.csv")))
    assert len(cat) == 60 and all(r["title"] and r["category"] for r in cat)
    assert len({r["category"] for r in cat}) == 12
    assert a["exact_duplicates_planted"] > 0 or a["rows"] < 2000


def test_ray_equals_pandas_reference(synth_small, tmp_path):
    inp = str(synth_small / "interactions.csv")
    m = run(inp, tmp_path / "out", items=str(synth_small / "items.csv"), num_buckets=3, chunk_mb=0.05)
    assert m["num_buckets"] == 3
    cfg = from_dict(PreprocessConfig, {"input": [inp], "output": "unused"})
    ref = reference_preprocess(cfg, str(synth_small / "items.csv"))
    for name in ("sequences", "train", "valid", "test"):
        got = pq.read_table(tmp_path / "out" / f"{name}.parquet").sort_by("user")
        assert got.select(ref[name].column_names).equals(ref[name].sort_by("user")), name
    items = pq.read_table(tmp_path / "out" / "items.parquet")
    assert items.column("item_id").to_pylist() == ref["item_keys"].to_pylist()
    users = pq.read_table(tmp_path / "out" / "users.parquet")
    assert users.column("user_id").to_pylist() == ref["user_keys"].to_pylist()
    c = m["counts"]
    assert c["rows_in"] == ref["rows_in"] and c["removed"]["duplicate"] > 0
    assert c["rows_in"] == c["rejected_total"] + c["removed_total"] + c["kept"]
    verify_outputs(tmp_path / "out")


def test_bucket_and_chunk_count_do_not_change_results(synth_small, tmp_path):
    inp = str(synth_small / "interactions.csv")
    run(inp, tmp_path / "one", num_buckets=1)
    run(inp, tmp_path / "many", num_buckets=4, chunk_mb=0.02)
    for name in ("sequences", "train", "valid", "test", "items", "users"):
        assert table(tmp_path / "one", name) == table(tmp_path / "many", name), name


def test_planted_structure_favours_sequential_model(synth_small, tmp_path):
    """On the synthetic default, a last-item transition model beats popularity by a wide margin."""
    run(str(synth_small / "interactions.csv"), tmp_path / "o", items=str(synth_small / "items.csv"))
    seqs = {r["user"]: r["items"] for r in table(tmp_path / "o", "sequences")}
    test = table(tmp_path / "o", "test")
    n_items = len(table(tmp_path / "o", "items"))
    pop = np.zeros(n_items)
    trans = np.zeros((n_items, n_items))
    for s in seqs.values():
        tr = s[:-2]
        np.add.at(pop, tr, 1)
        np.add.at(trans, (tr[:-1], tr[1:]), 1)
    hit_pop = hit_mk = 0
    top_pop = set(np.argsort(-pop, kind="stable")[:10])
    for r in test:
        hit_pop += r["target"] in top_pop
        sc = trans[r["history"][-1]] + 1e-6 * pop
        hit_mk += r["target"] in set(np.argsort(-sc, kind="stable")[:10])
    assert hit_mk >= 2 * hit_pop, (hit_mk, hit_pop)


# ------------------------------------------------------------------ the published datasets, reproduced exactly


@pytest.mark.parametrize("name", ["lastfm", "software"])
def test_deftrec_format_reproduces_source(shared_data, tmp_path, name):
    src = shared_data / name
    m = run(str(src), tmp_path / name, format="deftrec")
    lines = [ln.split() for ln in open(src / "test.txt") if ln.strip()]
    full = {int(p[0]): [int(x) for x in p[1:]] for p in lines}
    train = {int(p[0]): [int(x) for x in p[1:]] for p in (ln.split() for ln in open(src / "train.txt") if ln.strip())}
    assert {r["user"]: r["items"] for r in table(tmp_path / name, "sequences")} == full
    for r in table(tmp_path / name, "test"):
        assert r["target"] == full[r["user"]][-1] and r["history"] == full[r["user"]][:-1][-20:]
    for r in table(tmp_path / name, "valid"):
        assert r["target"] == train[r["user"]][-1] and r["history"] == train[r["user"]][:-1][-20:]
    rows = list(csv.reader(open(src / "item_list.txt", encoding="utf-8"), delimiter=" ", quotechar='"'))
    h = rows[0]
    ref = {int(r[h.index("remap_id")]): (r[h.index("org_id")], r[h.index("title")], r[h.index("category")])
           for r in rows[1:]}
    got = {r["item"]: (r["item_id"], r["title"], r["category"]) for r in table(tmp_path / name, "items")}
    assert got == ref
    users = {int(p[1]): p[0] for p in (ln.split() for ln in list(open(src / "user_list.txt"))[1:])}
    assert {r["user"]: r["user_id"] for r in table(tmp_path / name, "users")} == users
    assert m["counts"]["kept"] == sum(len(s) for s in full.values())
    assert set(m["inputs"]) >= {str(src / "train.txt"), str(src / "test.txt"), str(src / "item_list.txt")}


# ------------------------------------------------------------------ steps


def test_duplicates_threshold_kcore_and_stable_ties(tmp_path):
    rows = []
    # u1: 4 events, two tied at t=5 (input order b then a must be kept), plus an exact duplicate
    rows += [("u1", "x", 1, 5), ("u1", "b", 5, 4), ("u1", "a", 5, 4), ("u1", "y", 9, 5), ("u1", "y", 9, 5)]
    # u2: one event rated 1 (threshold removes it), three kept
    rows += [("u2", "x", 1, 1), ("u2", "a", 2, 5), ("u2", "b", 3, 5), ("u2", "y", 4, 5)]
    # u3: only 2 events that survive -> too short for leave-one-out
    rows += [("u3", "x", 1, 5), ("u3", "a", 2, 5)]
    # rare item "z" (1 user) -> removed by item 2-core
    rows += [("u1", "z", 20, 5)]
    p = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "rating"], rows)
    m = run(p, tmp_path / "o", rating_threshold=3, user_core=3, item_core=2)
    c = m["counts"]
    assert c["removed"]["duplicate"] == 1 and c["removed"]["rating_threshold"] == 1
    # z goes first; then u3 (2 rows < 3) leaves, which drops x below 2 users' worth: x goes too.
    # Rows are attributed to the item rule when their item is gone, else to the user rule.
    assert c["removed"]["item_core"] == 3  # z, x (u1), x (u3)
    assert c["removed"]["user_core"] == 1  # u3's "a"
    assert c["rows_in"] == len(rows) == c["rejected_total"] + c["removed_total"] + c["kept"]
    items = {r["item"]: r["item_id"] for r in table(tmp_path / "o", "items")}
    users = {r["user"]: r["user_id"] for r in table(tmp_path / "o", "users")}
    seqs = {users[r["user"]]: [items[i] for i in r["items"]] for r in table(tmp_path / "o", "sequences")}
    assert seqs == {"u1": ["b", "a", "y"], "u2": ["a", "b", "y"]}  # tie at t=5 keeps input order b, a
    removed = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "o" / "removed").glob("*.parquet"))])
    assert sorted(removed.column("reason").to_pylist()) == sorted(
        ["duplicate", "rating_threshold", "item_core", "item_core", "item_core", "user_core"])


def test_other_formats_agree_with_csv(tmp_path):
    rows = [(f"u{u}", f"i{(u * 3 + k) % 7}", 100 + k, 4) for u in range(6) for k in range(6)]
    base = run(write_csv(tmp_path / "a.csv", ["user_id", "item_id", "timestamp", "rating"], rows),
               tmp_path / "csv", user_core=0, item_core=0)
    run(write_csv(tmp_path / "a.tsv", ["user_id", "item_id", "timestamp", "rating"], rows, "\t"),
        tmp_path / "tsv", format="tsv", user_core=0, item_core=0)
    with open(tmp_path / "a.jsonl", "w") as f:
        for u, i, t, r in rows:
            f.write(json.dumps({"user_id": u, "item_id": i, "timestamp": t, "rating": r}) + "\n")
    run(tmp_path / "a.jsonl", tmp_path / "jsonl", format="jsonl", user_core=0, item_core=0)
    pq.write_table(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                             "timestamp": [r[2] for r in rows], "rating": [float(r[3]) for r in rows]}),
                   tmp_path / "a.parquet", row_group_size=10)
    run(tmp_path / "a.parquet", tmp_path / "parquet", format="parquet", user_core=0, item_core=0)
    with open(tmp_path / "ratings.dat", "w") as f:
        for u, i, t, r in rows:
            f.write(f"{u}::{i}::{r}::{t}\n")
    run(tmp_path / "ratings.dat", tmp_path / "ml", format="movielens", user_core=0, item_core=0)
    for fmt in ("tsv", "jsonl", "parquet", "ml"):
        for name in ("sequences", "test", "items", "users"):
            assert table(tmp_path / fmt, name) == table(tmp_path / "csv", name), (fmt, name)
    assert base["counts"]["kept"] == len(rows)


def test_movielens_with_latin1_catalog_and_iso_timestamps(tmp_path):
    with open(tmp_path / "ratings.dat", "w") as f:
        for u in range(1, 4):
            for k, m in enumerate([1, 2, 3, 2 + u]):
                f.write(f"{u}::{m}::{4}::{978300000 + k}\n")
    with open(tmp_path / "movies.dat", "wb") as f:
        for m in range(1, 7):
            f.write(f"{m}::Caf\xe9 Movie {m} (1999)::Drama|Comedy\n".encode("latin-1"))
    run(tmp_path / "ratings.dat", tmp_path / "o", format="movielens", items=str(tmp_path / "movies.dat"),
        user_core=0, item_core=0)
    items = table(tmp_path / "o", "items")
    assert items[0] == {"item": 0, "item_id": "1", "title": "Café Movie 1 (1999)", "category": "Drama|Comedy"}
    write_csv(tmp_path / "iso.csv", ["user_id", "item_id", "timestamp"],
              [("u", "b", "2020-01-02 00:00:00"), ("u", "a", "2020-01-01T00:00:00"), ("u", "c", "2020-01-03")])
    run(tmp_path / "iso.csv", tmp_path / "iso", user_core=0, item_core=0, columns={"rating": None})
    seq = table(tmp_path / "iso", "sequences")[0]
    items = {r["item"]: r["item_id"] for r in table(tmp_path / "iso", "items")}
    assert [items[i] for i in seq["items"]] == ["a", "b", "c"]


# ------------------------------------------------------------------ bad input


def _rejects(out) -> list[dict]:
    files = sorted((Path(out) / "rejects").glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def test_bad_rows_are_rejected_with_file_line_field(tmp_path):
    p = tmp_path / "log.csv"
    good = [f"u{u},i{k},{k},5" for u in range(3) for k in range(4)]
    lines = ["user_id,item_id,timestamp,rating"] + good[:6] + [
        ",i1,3,5",  # line 8: missing user
        "u1,,3,5",  # line 9: missing item
        "u1,i1,yesterday,5",  # line 10: bad timestamp
        "u1,i1,4,five",  # line 11: bad rating
        "u1,i1,4",  # line 12: wrong field count
        "",  # line 13: blank (counted, not a row)
    ] + good[6:]
    data = "\n".join(lines).encode() + b"\n" + b"u2,caf\xe9,9,5\n"  # last line: invalid UTF-8
    p.write_bytes(data)
    m = run(p, tmp_path / "o", user_core=0, item_core=0, chunk_mb=0.0001)
    rej = {r["line"]: r for r in _rejects(tmp_path / "o")}
    assert rej[8]["field"] == "user_id" and rej[8]["reason"] == "missing user id"
    assert rej[9]["field"] == "item_id" and rej[9]["reason"] == "missing item id"
    assert rej[10]["field"] == "timestamp" and rej[10]["reason"] == "unparseable timestamp"
    assert rej[11]["field"] == "rating" and rej[11]["reason"] == "unparseable rating"
    assert rej[12]["reason"].startswith("wrong field count") and rej[12]["raw"] == "u1,i1,4"
    last = len(lines) + 1
    assert rej[last]["reason"] == "invalid utf-8 bytes" and "\\xe9" in rej[last]["raw"]
    assert set(rej) == {8, 9, 10, 11, 12, last} and all(r["file"] == str(p) for r in rej.values())
    c = m["counts"]
    assert c["rejected_total"] == 6 and c["blank_lines"] == 1
    assert c["rows_in"] == c["rejected_total"] + c["removed_total"] + c["kept"] == 18


def test_items_absent_from_catalog_are_rejected(tmp_path):
    rows = [(f"u{u}", f"i{k}", k, 5) for u in range(3) for k in range(5)]
    p = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "rating"], rows)
    cat = write_csv(tmp_path / "items.csv", ["item_id", "title", "category"],
                    [(f"i{k}", f"Title {k}", "C") for k in range(4)])  # i4 is missing
    m = run(p, tmp_path / "o", items=str(cat), user_core=0, item_core=0)
    rej = _rejects(tmp_path / "o")
    assert len(rej) == 3 and {r["reason"] for r in rej} == {"item not in catalog"}
    assert {r["field"] for r in rej} == {"item_id"} and m["counts"]["rejected"] == {"item not in catalog": 3}


@pytest.mark.parametrize("case", ["missing", "empty", "no_valid_rows", "missing_column", "catalog_without_titles",
                                  "bad_header_encoding", "unknown_field"])
def test_bad_input_errors_name_the_problem(tmp_path, case):
    p = tmp_path / "log.csv"
    kw = {}
    if case == "missing":
        expect = "does not exist"
    elif case == "empty":
        p.write_text("")
        expect = "file is empty"
    elif case == "no_valid_rows":
        write_csv(p, ["user_id", "item_id", "timestamp"], [("u", "i", "notatime")] * 3)
        kw["columns"] = {"rating": None}
        expect = "no valid rows"
    elif case == "missing_column":
        write_csv(p, ["user", "item_id", "timestamp"], [("u", "i", 1)])
        expect = "missing column(s) user='user_id'"
    elif case == "catalog_without_titles":
        write_csv(p, ["user_id", "item_id", "timestamp", "rating"], [("u", "i", 1, 1)])
        kw["items"] = str(write_csv(tmp_path / "items.csv", ["item_id", "name"], [("i", "x")]))
        expect = "catalog has no title column"
    elif case == "bad_header_encoding":
        p.write_bytes(b"user_id,item_\xff,timestamp\nu,i,1\n")
        expect = "line 1: header is not valid utf-8"
    else:
        kw["not_a_field"] = 1
        expect = "unknown field(s) ['not_a_field']"
    with pytest.raises(ValueError) as e:
        run(p, tmp_path / "o", **kw)
    assert expect in str(e.value)
    if case != "unknown_field" and case != "missing":
        assert str(p) in str(e.value) or kw.get("items", "") in str(e.value)
    assert not (tmp_path / "o").exists()


def test_cli_exits_nonzero_with_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--input", str(tmp_path / "nope.csv"),
                        "--format", "csv", "--output", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "nope.csv: file does not exist" in r.stderr


# ------------------------------------------------------------------ atomicity


def test_crash_leaves_nothing_that_looks_complete(synth_small, tmp_path, monkeypatch):
    import deftrec.data.preprocess as pp

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(pp, "finish_manifest", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(str(synth_small / "interactions.csv"), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert not any(p.name == "manifest.json" for p in tmp_path.rglob("*"))
    monkeypatch.undo()
    run(str(synth_small / "interactions.csv"), tmp_path / "o")
    with pytest.raises(ValueError, match="already exists"):
        run(str(synth_small / "interactions.csv"), tmp_path / "o")
    m = read_manifest(tmp_path / "o")
    assert m["status"] == "complete" and m["config"]["max_history"] == 20
    assert "train.parquet/part-00000.parquet" in m["outputs"]
