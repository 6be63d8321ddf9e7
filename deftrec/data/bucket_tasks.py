"""Per-bucket work of the preprocessing job (the bodies of its Ray tasks).

This module owns what happens to one user bucket's rows: exact-duplicate removal and the rating
threshold (``clean_bucket``), one k-core counting round (``kcore_round``), the final k-core
filter with the attribution of every removed row to a reason (``finalize_bucket``), and the
emission of id-mapped sequences and split tables (``emit_bucket``). Removed rows are written with
their reason; per-item counts travel back to the driver as small tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deftrec.data.readers import VALID_SCHEMA
from deftrec.data.splits import build_splits

REMOVED_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()),
                            ("rating", pa.float64()), ("_ord", pa.int64()), ("reason", pa.string())])


def dedup_sorted(t: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Exact duplicates on (user_id, item_id, timestamp, rating): keep the first in input order."""
    if t.num_rows == 0:
        return t, t
    # Sort on integer codes (dictionary indices) rather than strings: same groups, much faster.
    keys = []
    for col in ("user_id", "item_id"):
        enc = pc.dictionary_encode(t.column(col).combine_chunks())
        keys.append(enc.indices.to_numpy(zero_copy_only=False))
    keys.append(t.column("timestamp").to_numpy())
    r = t.column("rating").combine_chunks()
    # null is its own key, never a sentinel value that a real rating could equal (ratings are finite)
    null = r.is_null().to_numpy(zero_copy_only=False)
    keys.append(null)
    keys.append(np.where(null, 0.0, pc.fill_null(r, 0.0).to_numpy(zero_copy_only=False)))
    ordk = t.column("_ord").to_numpy()
    order = np.lexsort((ordk, *reversed(keys)))
    same = np.ones(len(order) - 1, bool)
    for k in keys:
        ks = k[order]
        same &= ks[1:] == ks[:-1]
    dup = np.zeros(len(order), bool)
    dup[order[1:][same]] = True
    return t.filter(pa.array(~dup)), t.filter(pa.array(dup))


def _read_bucket(path: str) -> pa.Table:
    # the Hive partition column is in the directory name, not in the files
    return pq.read_table(path, schema=VALID_SCHEMA.remove(VALID_SCHEMA.get_field_index("_bucket")))


def _removed(t: pa.Table, reason: str) -> pa.Table:
    t = t.select(["user_id", "item_id", "timestamp", "rating", "_ord"])
    return t.append_column("reason", pa.array([reason] * t.num_rows, pa.string()))


def clean_bucket(src: str, dst: str, removed_path: str, rating_threshold: Optional[float]):
    t = _read_bucket(src)
    t, dups = dedup_sorted(t)
    removed = [_removed(dups, "duplicate")]
    stats = {"duplicate": dups.num_rows, "rating_threshold": 0}
    if rating_threshold is not None:
        keep = pc.fill_null(pc.greater_equal(t.column("rating"), rating_threshold), False)
        removed.append(_removed(t.filter(pc.invert(keep)), "rating_threshold"))
        stats["rating_threshold"] = t.num_rows - int(pc.sum(keep).as_py() or 0)
        t = t.filter(keep)
    pq.write_table(t, dst)
    rem = pa.concat_tables(removed)
    if rem.num_rows:
        pq.write_table(rem, removed_path)
    return item_counts(t), stats


def item_counts(t: pa.Table) -> pa.Table:
    if t.num_rows == 0:
        return pa.table({"item_id": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
    return t.group_by("item_id").aggregate([("item_id", "count")]).rename_columns(["item_id", "n"])


def _apply_cores(t: pa.Table, items: Optional[pa.Array], user_min: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """-> (kept rows, item-removed mask, user-removed mask) over the input rows."""
    n = t.num_rows
    item_ok = np.ones(n, bool) if items is None else \
        pc.fill_null(pc.is_in(t.column("item_id"), value_set=items), False).to_numpy(zero_copy_only=False)
    sub = t.filter(pa.array(item_ok))
    if user_min > 1 and sub.num_rows:
        counts = sub.group_by("user_id").aggregate([("user_id", "count")])
        good = counts.filter(pc.greater_equal(counts.column("user_id_count"), user_min)).column("user_id")
        user_ok_all = pc.fill_null(pc.is_in(t.column("user_id"), value_set=good), False).to_numpy(zero_copy_only=False)
    else:
        user_ok_all = np.ones(n, bool)
    keep = item_ok & user_ok_all
    return t.filter(pa.array(keep)), ~item_ok, item_ok & ~user_ok_all


def kcore_round(src: str, items: Optional[pa.Array], user_min: int) -> pa.Table:
    kept, _, _ = _apply_cores(pq.read_table(src), items, user_min)
    return item_counts(kept)


def finalize_bucket(src: str, dst: str, removed_path: str, items: Optional[pa.Array], user_min: int,
                    user_core: int):
    t = pq.read_table(src)
    kept, item_removed, user_removed = _apply_cores(t, items, user_min)
    # attribute removals: item k-core first; users below user_core vs. only too short for leave-one-out
    counts = {"item_core": int(item_removed.sum()), "user_core": 0, "short_sequence": 0}
    removed = [_removed(t.filter(pa.array(item_removed)), "item_core")]
    if user_removed.any():
        ur = t.filter(pa.array(user_removed))
        # a user's count after the item filter decides the reason
        sub = t.filter(pa.array(~item_removed))
        cnt = sub.group_by("user_id").aggregate([("user_id", "count")])
        short = cnt.filter(pc.less(cnt.column("user_id_count"), user_core)).column("user_id") if user_core else pa.array([], pa.string())
        is_core = pc.fill_null(pc.is_in(ur.column("user_id"), value_set=short), False)
        removed.append(_removed(ur.filter(is_core), "user_core"))
        removed.append(_removed(ur.filter(pc.invert(is_core)), "short_sequence"))
        counts["user_core"] = int(pc.sum(is_core).as_py() or 0)
        counts["short_sequence"] = ur.num_rows - counts["user_core"]
    rem = pa.concat_tables(removed)
    if rem.num_rows:
        pq.write_table(rem, removed_path)
    pq.write_table(kept, dst)
    return pc.unique(kept.column("user_id").combine_chunks()) if kept.num_rows else pa.array([], pa.string()), counts


def emit_bucket(src: str, out_dir: str, part: str, item_keys: pa.Array, item_index: Optional[pa.Array],
                user_keys: pa.Array, user_index: Optional[pa.Array], max_history: int) -> dict:
    t = pq.read_table(src)
    ii = pc.index_in(t.column("item_id"), value_set=item_keys)
    ui = pc.index_in(t.column("user_id"), value_set=user_keys)
    if pc.any(pc.is_null(ii)).as_py() or pc.any(pc.is_null(ui)).as_py():
        raise RuntimeError(f"{src}: ids missing from the id map (internal error)")
    ii = ii.to_numpy() if item_index is None else pc.take(item_index, ii).to_numpy()
    ui = ui.to_numpy() if user_index is None else pc.take(user_index, ui).to_numpy()
    ts = t.column("timestamp").to_numpy()
    order = np.lexsort((t.column("_ord").to_numpy(), ts, ui))
    splits = build_splits(ui[order].astype(np.int64), ii[order].astype(np.int32), ts[order], max_history)
    rows = {}
    for name, tbl in splits.items():
        d = Path(out_dir) / f"{name}.parquet"
        d.mkdir(exist_ok=True)
        pq.write_table(tbl, d / f"part-{part}.parquet")
        rows[name] = tbl.num_rows
    rows["interactions"] = t.num_rows
    return rows


def count_file(path: str) -> pa.Table:
    return item_counts(pq.read_table(path, columns=["item_id"]))


def sum_counts(tables: list[pa.Table]) -> pa.Table:
    t = pa.concat_tables(tables)
    if t.num_rows == 0:
        return t
    return t.group_by("item_id").aggregate([("n", "sum")]).rename_columns(["item_id", "n"])

