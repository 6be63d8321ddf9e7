"""Preprocessing on Ray: interaction logs -> leave-one-out Parquet splits.

Stages (each streams; the driver only ever holds per-item and per-user tables, never the log):

1. **read + validate** (Ray Data): input files are split into byte ranges on line boundaries; each
   range is parsed and validated with vectorised Arrow kernels; rejected rows go to ``rejects/``
   with file, line, field and reason; valid rows are hash-partitioned by user and written as Hive
   partitioned Parquet (``_bucket=k``), which is the shuffle.
2. **clean** (one Ray task per user bucket): exact-duplicate removal (first occurrence kept) and
   the optional rating threshold.
3. **k-core** (rounds of Ray tasks): users are local to a bucket; item counts are summed on the
   driver (one row per item) until the item set stops changing.
4. **emit** (Ray tasks): contiguous deterministic ids, stable chronological order (ties keep input
   order), full sequences and the train/valid/test leave-one-out rows.

Everything is written into a temporary sibling directory that is renamed into place after
``manifest.json``; a crash leaves no directory that looks complete.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deftrec.core.config import to_dict
from deftrec.data import readers
from deftrec.config.data import PreprocessConfig
from deftrec.data.readers import InputError
from deftrec.core.artifacts import atomic_directory, finish_manifest, sha256_file, write_json_atomic

SCHEMA_VERSION = 1
SPLIT_SCHEMA = pa.schema([("user", pa.int64()), ("history", pa.list_(pa.int32())), ("target", pa.int64())])
SEQ_SCHEMA = pa.schema([("user", pa.int64()), ("items", pa.list_(pa.int32())),
                        ("timestamps", pa.list_(pa.int64()))])
REMOVED_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()),
                            ("rating", pa.float64()), ("_ord", pa.int64()), ("reason", pa.string())])


class PreprocessError(InputError):
    pass


# --------------------------------------------------------------------------------------------
# Pure table functions (also used by tests and by the single-process reference)


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
    keys.append(np.nan_to_num(r.to_numpy(zero_copy_only=False), nan=-np.inf))  # nulls group together
    ordk = t.column("_ord").to_numpy()
    order = np.lexsort((ordk, keys[3], keys[2], keys[1], keys[0]))
    same = np.ones(len(order) - 1, bool)
    for k in keys:
        ks = k[order]
        same &= ks[1:] == ks[:-1]
    dup = np.zeros(len(order), bool)
    dup[order[1:][same]] = True
    return t.filter(pa.array(~dup)), t.filter(pa.array(dup))


def sort_key_ids(keys: list[str] | pa.Array) -> pa.Array:
    """Deterministic id order: numeric when every id is an integer, else lexicographic."""
    arr = pa.array(keys, pa.string()) if not isinstance(keys, (pa.Array, pa.ChunkedArray)) else keys
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if len(arr) and pc.all(pc.match_substring_regex(arr, r"^-?\d{1,18}$")).as_py():
        order = pc.sort_indices(pc.cast(arr, pa.int64()))
    else:
        order = pc.sort_indices(arr)
    return pc.take(arr, order)


def slice_lists(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, dtype) -> pa.ListArray:
    """ListArray whose row i is values[starts[i]:ends[i]] (vectorised gather)."""
    lengths = np.maximum(ends - starts, 0)
    offsets = np.r_[0, np.cumsum(lengths)]
    total = int(offsets[-1])
    idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(total)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values[idx], dtype))


def build_splits(user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray, max_history: int) -> dict:
    """Rows sorted by (user, time, input order) -> sequences and leave-one-out split tables."""
    n = len(user_idx)
    starts = np.flatnonzero(np.r_[True, user_idx[1:] != user_idx[:-1]]) if n else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], n].astype(np.int64) if n else np.zeros(0, np.int64)
    users = pa.array(user_idx[starts] if n else np.zeros(0, np.int64), pa.int64())
    out = {"sequences": pa.table({
        "user": users,
        "items": slice_lists(item_idx, starts, ends, pa.int32()),
        "timestamps": slice_lists(ts, starts, ends, pa.int64()),
    }, schema=SEQ_SCHEMA)}
    # test target = last item, valid = second to last, train = third to last; histories before them
    for name, back in (("test", 1), ("valid", 2), ("train", 3)):
        t_pos = ends - back
        h_start = np.maximum(starts, t_pos - max_history)
        out[name] = pa.table({
            "user": users,
            "history": slice_lists(item_idx, h_start, t_pos, pa.int32()),
            "target": pa.array(item_idx[t_pos] if n else np.zeros(0, np.int64), pa.int64()),
        }, schema=SPLIT_SCHEMA)
    return out


# --------------------------------------------------------------------------------------------
# Per-bucket work (Ray tasks)


def _read_bucket(path: str) -> pa.Table:
    # the Hive partition column is in the directory name, not in the files
    return pq.read_table(path, schema=readers.VALID_SCHEMA.remove(readers.VALID_SCHEMA.get_field_index("_bucket")))


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
    return _item_counts(t), stats


def _item_counts(t: pa.Table) -> pa.Table:
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
    return _item_counts(kept)


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


# --------------------------------------------------------------------------------------------
# Driver


def _inputs(cfg: PreprocessConfig) -> list[str]:
    paths = []
    for p in cfg.input:
        if cfg.format != "deftrec" and os.path.isdir(p):
            found = sorted(str(x) for x in Path(p).iterdir() if x.is_file() and not x.name.startswith("."))
            if not found:
                raise InputError(f"{p}: folder has no files")
            paths.extend(found)
        else:
            paths.append(p)
    return paths


def _parse_stage(cfg, paths, catalog_ids, num_buckets, work: Path, reject_dir: Path, log) -> list[dict]:
    """Ray Data: chunked read + validation -> user-bucketed Parquet; rejects and stats as side files."""
    import ray

    layouts = [readers.plan_layout(cfg, p, i) for i, p in enumerate(paths)]
    # At least ~2 read tasks per CPU so small clusters stay busy; never above chunk_mb.
    total = sum(os.path.getsize(p) for p in paths)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunk_bytes = max(1, int(min(cfg.chunk_mb * (1 << 20), max(4 << 20, total / (2 * cpus)))))
    chunks: list[readers.Chunk] = []
    for lay in layouts:
        chunks.extend(readers.plan_chunks(lay, chunk_bytes, cfg.format))
    if cfg.format != "parquet":
        # Absolute line numbers: count lines of every range in parallel.
        counter = ray.remote(num_cpus=1)(readers.count_lines)
        counts = ray.get([counter.remote(c.layout.path, c.start, c.end) for c in chunks])
        line = {}
        for c, n in zip(chunks, counts):
            c.first_line = line.get(c.layout.path, c.layout.first_line)
            line[c.layout.path] = c.first_line + n
    log(f"[preprocess] read: {len(paths)} file(s), {len(chunks)} chunk(s), {num_buckets} user bucket(s)")
    stats_dir = work / "stats"
    stats_dir.mkdir(parents=True)
    cat_ref = ray.put(catalog_ids) if catalog_ids is not None else None

    def parse(batch: pa.Table, catalog) -> pa.Table:
        if isinstance(catalog, ray.ObjectRef):  # Ray Data passes fn_kwargs refs through unresolved
            catalog = ray.get(catalog)
        out = []
        for i in batch.column("i").to_pylist():
            valid, rejects, stats = readers.parse_chunk(chunks[i], cfg, catalog, num_buckets)
            if rejects.num_rows:
                pq.write_table(rejects, reject_dir / f"part-{i:06d}.parquet")
            stats["rejected"] = dict(Counter(rejects.column("reason").to_pylist()))
            stats["valid"] = valid.num_rows
            write_json_atomic(stats_dir / f"chunk-{i:06d}.json", stats)
            out.append(valid)
        return pa.concat_tables(out) if out else readers.empty_valid()

    ds = ray.data.from_items([{"i": i} for i in range(len(chunks))], override_num_blocks=len(chunks))
    ds = ds.map_batches(parse, batch_size=1, batch_format="pyarrow", fn_kwargs={"catalog": cat_ref},
                        num_cpus=1, zero_copy_batch=True)
    ds.write_parquet(str(work / "buckets"), partition_cols=["_bucket"])
    import json
    return [json.loads(p.read_text()) for p in sorted(stats_dir.glob("chunk-*.json"))]


def run_preprocess(cfg: PreprocessConfig, log: Callable[[str], None] = print) -> dict:
    """Run the whole preprocessing job; returns the manifest. Raises InputError on bad input."""
    import ray

    from deftrec.core.cluster import ensure_ray

    ensure_ray()
    t_all = time.time()
    timings = {}
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise PreprocessError(f"{out} already exists (pass --overwrite to replace it)")
    paths = _inputs(cfg) if cfg.format != "deftrec" else [cfg.input[0]]
    for p in paths:
        if cfg.format == "deftrec":
            if not os.path.isdir(p):
                raise InputError(f"{p}: format 'deftrec' expects a folder with train.txt, test.txt, item_list.txt")
        else:
            readers._check_file(p)
    total_bytes = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    num_buckets = cfg.num_buckets or max(1, min(256, -(-total_bytes // (256 << 20))))
    with atomic_directory(out, overwrite=cfg.overwrite) as tmp:
        work = tmp / "_work"
        reject_dir = tmp / "rejects"
        removed_dir = tmp / "removed"
        for d in (work, reject_dir, removed_dir):
            d.mkdir()
        t0 = time.time()
        user_ids: dict = {}
        catalog = None
        if cfg.format == "deftrec":
            valid, rej, catalog, user_ids, st = readers.read_deftrec_folder(cfg.input[0], num_buckets)
            if rej.num_rows:
                pq.write_table(rej, reject_dir / "part-000000.parquet")
            line_rej = rej.slice(catalog.rejects.num_rows)  # catalog rejects are counted apart
            st.update(valid=valid.num_rows, rejected=dict(Counter(line_rej.column("reason").to_pylist())))
            chunk_stats = [st]
            import pyarrow.dataset as pads
            pads.write_dataset(valid, work / "buckets", format="parquet", partitioning=["_bucket"],
                               partitioning_flavor="hive")
            inputs = [os.path.join(cfg.input[0], n) for n in ("train.txt", "test.txt", "item_list.txt", "user_list.txt")
                      if os.path.exists(os.path.join(cfg.input[0], n))]
        else:
            if cfg.items:
                catalog = readers.read_catalog(cfg, cfg.items)
                if catalog.rejects.num_rows:
                    pq.write_table(catalog.rejects, reject_dir / "catalog.parquet")
            cat_ids = catalog.table.column("key").combine_chunks() if catalog else None
            chunk_stats = _parse_stage(cfg, paths, cat_ids, num_buckets, work, reject_dir, log)
            inputs = paths + ([cfg.items] if cfg.items else [])
        timings["read_validate"] = time.time() - t0
        rows_in = sum(s["rows"] for s in chunk_stats)
        blank = sum(s["blank_lines"] for s in chunk_stats)
        row_rejected = Counter()
        for s in chunk_stats:
            row_rejected.update(s["rejected"])
        n_rej = sum(row_rejected.values())
        catalog_rejected = Counter(catalog.rejects.column("reason").to_pylist()) if catalog else Counter()
        valid_rows = sum(s["valid"] for s in chunk_stats)
        log(f"[preprocess] read+validate: {rows_in:,} rows, {valid_rows:,} valid, {n_rej:,} rejected "
            f"({timings['read_validate']:.1f}s)")
        if valid_rows == 0:
            examples = _reject_examples(reject_dir)
            raise PreprocessError(f"no valid rows in {', '.join(paths)}: {n_rej:,} rejected ({dict(row_rejected)}); "
                                  f"first rejects: {examples}")
        if rows_in and n_rej / rows_in > cfg.max_reject_fraction:
            raise PreprocessError(f"{n_rej / rows_in:.1%} of rows rejected (max_reject_fraction "
                                  f"{cfg.max_reject_fraction}); first rejects: {_reject_examples(reject_dir)}")

        # ---- clean: duplicates + rating threshold
        t0 = time.time()
        bucket_dirs = sorted((work / "buckets").glob("_bucket=*"), key=lambda p: int(p.name.split("=")[1]))
        clean_dir, final_dir = work / "clean", work / "final"
        clean_dir.mkdir()
        final_dir.mkdir()
        clean_task = ray.remote(num_cpus=1)(clean_bucket)
        res = ray.get([clean_task.remote(str(b), str(clean_dir / f"{k}.parquet"),
                                         str(removed_dir / f"clean-{k:05d}.parquet"), cfg.rating_threshold)
                       for k, b in enumerate(bucket_dirs)])
        removed = Counter()
        for _, st in res:
            removed.update(st)
        item_counts = _sum_counts([r[0] for r in res])
        timings["clean"] = time.time() - t0
        log(f"[preprocess] clean: {removed['duplicate']:,} duplicates, {removed['rating_threshold']:,} below "
            f"rating threshold ({timings['clean']:.1f}s)")

        # ---- k-core
        t0 = time.time()
        user_min = max(cfg.user_core, cfg.min_sequence_length)
        items = None
        if cfg.item_core > 0:
            items = item_counts.filter(pc.greater_equal(item_counts.column("n"), cfg.item_core)).column("item_id").combine_chunks()
        round_task = ray.remote(num_cpus=1)(kcore_round)
        rounds = 0
        clean_files = [str(clean_dir / f"{k}.parquet") for k in range(len(bucket_dirs))]
        while True:
            rounds += 1
            items_ref = ray.put(items)
            counts = _sum_counts(ray.get([round_task.remote(f, items_ref, user_min) for f in clean_files]))
            if cfg.item_core <= 0:
                items = None
                break
            new_items = counts.filter(pc.greater_equal(counts.column("n"), cfg.item_core)).column("item_id").combine_chunks()
            if len(new_items) == len(items):  # new set is a subset of the old one: equal size = unchanged
                break
            items = new_items
            log(f"[preprocess] k-core round {rounds}: {len(items):,} items remain")
        items_ref = ray.put(items)
        fin_task = ray.remote(num_cpus=1)(finalize_bucket)
        fin = ray.get([fin_task.remote(f, str(final_dir / f"{k}.parquet"), str(removed_dir / f"kcore-{k:05d}.parquet"),
                                       items_ref, user_min, cfg.user_core) for k, f in enumerate(clean_files)])
        for _, st in fin:
            removed.update(st)
        kept_users = pa.concat_arrays([u for u, _ in fin]) if fin else pa.array([], pa.string())
        if len(kept_users) == 0:
            raise PreprocessError(f"no user is left after filtering ({dict(removed)}); lower user_core/item_core "
                                  f"(now {cfg.user_core}/{cfg.item_core}) or check the input")
        timings["kcore"] = time.time() - t0
        log(f"[preprocess] k-core ({cfg.user_core}/{cfg.item_core}, min length {cfg.min_sequence_length}): "
            f"{rounds} round(s), removed {removed['item_core'] + removed['user_core'] + removed['short_sequence']:,} "
            f"rows ({timings['kcore']:.1f}s)")

        # ---- id maps (driver holds one row per user / item, never the log)
        t0 = time.time()
        final_counts = _sum_counts(ray.get([ray.remote(num_cpus=1)(_count_file).remote(str(final_dir / f"{k}.parquet"))
                                            for k in range(len(clean_files))]))
        used_items = final_counts.column("item_id").combine_chunks()
        if cfg.id_mapping == "preserve":
            cat_t = catalog.table
            item_keys = cat_t.column("key").combine_chunks()
            item_index = pc.cast(item_keys, pa.int64())
            user_keys = kept_users
            user_index = pc.cast(user_keys, pa.int64())
            order = pc.sort_indices(item_index)
            items_table = pa.table({
                "item": pc.take(item_index, order), "item_id": pc.take(cat_t.column("item_id"), order),
                "title": pc.take(cat_t.column("title"), order), "category": pc.take(cat_t.column("category"), order)})
            uorder = pc.sort_indices(user_index)
            users_table = pa.table({
                "user": pc.take(user_index, uorder),
                "user_id": pa.array([user_ids.get(k, k) for k in pc.take(user_keys, uorder).to_pylist()], pa.string())})
        else:
            item_keys = sort_key_ids(used_items)
            item_index = None
            user_keys = sort_key_ids(kept_users)
            user_index = None
            if catalog is not None:
                pos = pc.index_in(item_keys, value_set=catalog.table.column("key"))
                titles = pc.take(catalog.table.column("title"), pos)
                cats = pc.take(catalog.table.column("category"), pos)
            else:
                titles, cats = item_keys, pa.array(["unknown"] * len(item_keys), pa.string())
            items_table = pa.table({"item": pa.array(np.arange(len(item_keys)), pa.int64()), "item_id": item_keys,
                                    "title": titles, "category": cats})
            users_table = pa.table({"user": pa.array(np.arange(len(user_keys)), pa.int64()), "user_id": user_keys})
        pq.write_table(items_table, tmp / "items.parquet")
        pq.write_table(users_table, tmp / "users.parquet")

        # ---- emit sequences + splits
        ik, uk = ray.put(item_keys), ray.put(user_keys)
        iidx, uidx = ray.put(item_index), ray.put(user_index)
        emit_task = ray.remote(num_cpus=1)(emit_bucket)
        emitted = ray.get([emit_task.remote(str(final_dir / f"{k}.parquet"), str(tmp), f"{k:05d}", ik, iidx, uk, uidx,
                                            cfg.max_history) for k in range(len(clean_files))])
        split_rows = Counter()
        for e in emitted:
            split_rows.update(e)
        timings["emit"] = time.time() - t0
        timings["total"] = time.time() - t_all
        shutil.rmtree(work)
        for d in (reject_dir, removed_dir):
            if not any(d.iterdir()):
                d.rmdir()
        removed_total = sum(removed.values())
        kept = split_rows["interactions"]
        log(f"[preprocess] emit: {split_rows['sequences']:,} users, {len(items_table):,} items, {kept:,} interactions "
            f"({timings['emit']:.1f}s)")
        manifest = {
            "kind": "preprocessed",
            "schema_version": SCHEMA_VERSION,
            "config": to_dict(cfg),
            "inputs": {p: {"sha256": sha256_file(p), "bytes": os.path.getsize(p)} for p in inputs},
            "counts": {
                "rows_in": rows_in,
                "blank_lines": blank,
                "rejected": dict(sorted(row_rejected.items())),
                "rejected_total": n_rej,
                "catalog_rejected": dict(catalog_rejected),
                "removed": {k: removed.get(k, 0) for k in
                            ("duplicate", "rating_threshold", "item_core", "user_core", "short_sequence")},
                "removed_total": removed_total,
                "kept": kept,
                "users": split_rows["sequences"],
                "items": len(items_table),
                "items_used": len(used_items),
                "kcore_rounds": rounds,
                "splits": {k: split_rows[k] for k in ("train", "valid", "test")},
            },
            "files": {"train": "train.parquet", "valid": "valid.parquet", "test": "test.parquet",
                      "sequences": "sequences.parquet", "items": "items.parquet", "users": "users.parquet",
                      "rejects": "rejects", "removed": "removed"},
            "num_buckets": num_buckets,
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "versions": _versions(),
        }
        if rows_in != n_rej + removed_total + kept:
            raise RuntimeError(f"row accounting does not add up: in {rows_in} != rejected {n_rej} + removed "
                               f"{removed_total} + kept {kept} (internal error)")
        manifest = finish_manifest(tmp, manifest)
    log(f"[preprocess] wrote {out} in {timings['total']:.1f}s")
    return manifest


def _count_file(path: str) -> pa.Table:
    return _item_counts(pq.read_table(path, columns=["item_id"]))


def _sum_counts(tables: list[pa.Table]) -> pa.Table:
    t = pa.concat_tables(tables)
    if t.num_rows == 0:
        return t
    return t.group_by("item_id").aggregate([("n", "sum")]).rename_columns(["item_id", "n"])


def _reject_examples(reject_dir: Path, n: int = 3) -> str:
    files = sorted(reject_dir.glob("*.parquet"))
    ex = []
    for f in files:
        for r in pq.read_table(f).slice(0, n - len(ex)).to_pylist():
            ex.append(f"{r['file']}: line {r['line']}: field {r['field']}: {r['reason']}")
        if len(ex) >= n:
            break
    return "; ".join(ex) if ex else "none"


def _versions() -> dict:
    import ray

    return {"pyarrow": pa.__version__, "ray": ray.__version__, "numpy": np.__version__}
