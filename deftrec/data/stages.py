"""The driver side of the bucket stages: clean, k-core, id maps and emit.

This module owns fanning the per-bucket tasks of ``deftrec.data.bucket_tasks`` out as Ray tasks
and combining their small results on the driver (one row per item or per user, never the log):
the duplicate/rating clean, the k-core rounds until the item set stops changing, the id maps
(``preserve``: the published indices; ``sorted``: contiguous ids in ``sort_key_ids`` order) with
the ``items``/``users`` tables, and the emission of sequences and splits. It also owns the
job's working directory layout (``WorkDirs``).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deftrec.config.data import PreprocessConfig
from deftrec.data.bucket_tasks import (
    clean_bucket,
    count_file,
    emit_bucket,
    finalize_bucket,
    kcore_round,
    sum_counts,
)
from deftrec.data.catalog import RawCatalog
from deftrec.data.splits import sort_key_ids


@dataclasses.dataclass(frozen=True)
class WorkDirs:
    """Directories inside the job's temporary output directory ``tmp``."""

    tmp: Path

    @property
    def work(self) -> Path:  # scratch: bucketed, cleaned and final rows; removed at the end
        return self.tmp / "_work"

    @property
    def rejects(self) -> Path:
        return self.tmp / "rejects"

    @property
    def removed(self) -> Path:
        return self.tmp / "removed"

    @property
    def clean(self) -> Path:
        return self.work / "clean"

    @property
    def final(self) -> Path:
        return self.work / "final"

    def create(self) -> None:
        for d in (self.work, self.rejects, self.removed):
            d.mkdir()

    def remove_work(self) -> None:
        """Drop the scratch directory, and the rejects/removed directories when they stayed empty."""
        shutil.rmtree(self.work)
        for d in (self.rejects, self.removed):
            if not any(d.iterdir()):
                d.rmdir()


@dataclasses.dataclass
class Cleaned:
    files: list[str]  # one cleaned Parquet file per user bucket, in bucket order
    removed: Counter  # reason -> rows (duplicate, rating_threshold)
    item_counts: pa.Table  # item_id, n over the cleaned rows


@dataclasses.dataclass
class Cored:
    rounds: int
    kept_users: pa.Array  # user keys left after the k-core (unique per bucket)
    removed: Counter  # reason -> rows (item_core, user_core, short_sequence)


@dataclasses.dataclass
class IdMaps:
    item_keys: pa.Array  # log keys, in id order (preserve: the catalog keys)
    item_index: Optional[pa.Array]  # id per item key; None = the position in item_keys
    user_keys: pa.Array
    user_index: Optional[pa.Array]
    items_table: pa.Table  # items.parquet: item, item_id, title, category
    users_table: pa.Table  # users.parquet: user, user_id
    used_items: pa.Array  # item keys that occur in the final rows


def clean(cfg: PreprocessConfig, dirs: WorkDirs) -> Cleaned:
    """Duplicates + rating threshold, one task per user bucket."""
    import ray

    bucket_dirs = sorted((dirs.work / "buckets").glob("_bucket=*"), key=lambda p: int(p.name.split("=")[1]))
    dirs.clean.mkdir()
    dirs.final.mkdir()
    clean_task = ray.remote(num_cpus=1)(clean_bucket)
    res = ray.get([clean_task.remote(str(b), str(dirs.clean / f"{k}.parquet"),
                                     str(dirs.removed / f"clean-{k:05d}.parquet"), cfg.rating_threshold)
                   for k, b in enumerate(bucket_dirs)])
    removed = Counter()
    for _, st in res:
        removed.update(st)
    files = [str(dirs.clean / f"{k}.parquet") for k in range(len(bucket_dirs))]
    return Cleaned(files, removed, sum_counts([r[0] for r in res]))


def _core_items(counts: pa.Table, item_core: int) -> pa.Array:
    return counts.filter(pc.greater_equal(counts.column("n"), item_core)).column("item_id").combine_chunks()


def kcore(cfg: PreprocessConfig, cleaned: Cleaned, dirs: WorkDirs, log: Callable[[str], None]) -> Cored:
    """Rounds of item counting until the item set stops changing, then the final filter per bucket."""
    import ray

    user_min = max(cfg.user_core, cfg.min_sequence_length)
    items = None
    if cfg.item_core > 0:
        items = _core_items(cleaned.item_counts, cfg.item_core)
    round_task = ray.remote(num_cpus=1)(kcore_round)
    rounds = 0
    while True:
        rounds += 1
        items_ref = ray.put(items)
        counts = sum_counts(ray.get([round_task.remote(f, items_ref, user_min) for f in cleaned.files]))
        if cfg.item_core <= 0:
            items = None
            break
        new_items = _core_items(counts, cfg.item_core)
        if len(new_items) == len(items):  # new set is a subset of the old one: equal size = unchanged
            break
        items = new_items
        log(f"[preprocess] k-core round {rounds}: {len(items):,} items remain")
    items_ref = ray.put(items)
    fin_task = ray.remote(num_cpus=1)(finalize_bucket)
    fin = ray.get([fin_task.remote(f, str(dirs.final / f"{k}.parquet"), str(dirs.removed / f"kcore-{k:05d}.parquet"),
                                   items_ref, user_min, cfg.user_core) for k, f in enumerate(cleaned.files)])
    removed = Counter()
    for _, st in fin:
        removed.update(st)
    kept_users = pa.concat_arrays([u for u, _ in fin]) if fin else pa.array([], pa.string())
    return Cored(rounds, kept_users, removed)


def _preserved_ids(catalog: RawCatalog, user_ids: dict, kept_users: pa.Array, used_items: pa.Array) -> IdMaps:
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
    return IdMaps(item_keys, item_index, user_keys, user_index, items_table, users_table, used_items)


def _sorted_ids(catalog: Optional[RawCatalog], kept_users: pa.Array, used_items: pa.Array) -> IdMaps:
    item_keys = sort_key_ids(used_items)
    user_keys = sort_key_ids(kept_users)
    if catalog is not None:
        pos = pc.index_in(item_keys, value_set=catalog.table.column("key"))
        titles = pc.take(catalog.table.column("title"), pos)
        cats = pc.take(catalog.table.column("category"), pos)
    else:
        titles, cats = item_keys, pa.array(["unknown"] * len(item_keys), pa.string())
    items_table = pa.table({"item": pa.array(np.arange(len(item_keys)), pa.int64()), "item_id": item_keys,
                            "title": titles, "category": cats})
    users_table = pa.table({"user": pa.array(np.arange(len(user_keys)), pa.int64()), "user_id": user_keys})
    return IdMaps(item_keys, None, user_keys, None, items_table, users_table, used_items)


def id_maps(cfg: PreprocessConfig, catalog: Optional[RawCatalog], user_ids: dict, kept_users: pa.Array,
            n_buckets: int, dirs: WorkDirs) -> IdMaps:
    """Id maps and the items/users tables, written to ``items.parquet`` and ``users.parquet``."""
    import ray

    final_counts = sum_counts(ray.get([ray.remote(num_cpus=1)(count_file).remote(str(dirs.final / f"{k}.parquet"))
                                       for k in range(n_buckets)]))
    used_items = final_counts.column("item_id").combine_chunks()
    if cfg.id_mapping == "preserve":
        ids = _preserved_ids(catalog, user_ids, kept_users, used_items)
    else:
        ids = _sorted_ids(catalog, kept_users, used_items)
    pq.write_table(ids.items_table, dirs.tmp / "items.parquet")
    pq.write_table(ids.users_table, dirs.tmp / "users.parquet")
    return ids


def emit(cfg: PreprocessConfig, ids: IdMaps, n_buckets: int, dirs: WorkDirs) -> Counter:
    """Sequences + splits, one task per bucket -> rows per output table (and ``interactions``)."""
    import ray

    ik, uk = ray.put(ids.item_keys), ray.put(ids.user_keys)
    iidx, uidx = ray.put(ids.item_index), ray.put(ids.user_index)
    emit_task = ray.remote(num_cpus=1)(emit_bucket)
    emitted = ray.get([emit_task.remote(str(dirs.final / f"{k}.parquet"), str(dirs.tmp), f"{k:05d}", ik, iidx, uk,
                                        uidx, cfg.max_history) for k in range(n_buckets)])
    split_rows = Counter()
    for e in emitted:
        split_rows.update(e)
    return split_rows
