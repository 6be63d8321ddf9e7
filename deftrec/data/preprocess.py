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

This module owns the job as a whole: ``run_preprocess`` runs the stages in order, times them,
enforces the reject and filtering limits (``PreprocessError``) and writes the manifest last. The
stages live in ``deftrec.data.ingest`` (1), ``deftrec.data.stages`` with the per-bucket task
bodies in ``deftrec.data.bucket_tasks`` (2-4), ``deftrec.data.splits`` (the output tables) and
``deftrec.data.accounting`` (counts and manifest).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from deftrec.config.data import PreprocessConfig
from deftrec.core.artifacts import (
    atomic_directory,
    finish_manifest,
    input_id,
    stage_fingerprint,
)
from deftrec.core.config import to_dict
from deftrec.data import stages
from deftrec.data.accounting import (
    Outcome,
    ReadCounts,
    build_manifest,
    check_accounting,
    count_read,
    reject_examples,
)
from deftrec.data.ingest import bucket_count, read_inputs, resolve_inputs
from deftrec.data.readers import InputError


class PreprocessError(InputError):
    pass


def _check_read(cfg: PreprocessConfig, paths: list[str], read: ReadCounts, reject_dir: Path) -> None:
    """Fail when nothing is valid or more than ``max_reject_fraction`` of the rows is rejected."""
    if read.valid_rows == 0:
        examples = reject_examples(reject_dir)
        raise PreprocessError(f"no valid rows in {', '.join(paths)}: {read.n_rej:,} rejected "
                              f"({dict(read.row_rejected)}); first rejects: {examples}")
    if read.rows_in and read.n_rej / read.rows_in > cfg.max_reject_fraction:
        raise PreprocessError(f"{read.n_rej / read.rows_in:.1%} of rows rejected (max_reject_fraction "
                              f"{cfg.max_reject_fraction}); first rejects: {reject_examples(reject_dir)}")


def preprocess_fingerprint(cfg: PreprocessConfig) -> str:
    """The preprocessing stage's identity: its settings (where the output goes excluded) and the
    content of every input file or folder (:func:`deftrec.core.artifacts.input_id`)."""
    settings = to_dict(cfg)
    for name in ("output", "overwrite"):
        settings.pop(name, None)
    inputs = [*cfg.input, *([cfg.items] if cfg.items else [])]
    return stage_fingerprint(settings, {str(p): input_id(p) for p in inputs if Path(p).exists()})


def run_preprocess(cfg: PreprocessConfig, log: Callable[[str], None] = print) -> dict:
    """Run the whole preprocessing job; returns the manifest (with the stage's fingerprint).
    Raises InputError on bad input."""
    from deftrec.core.cluster import ensure_ray

    ensure_ray()
    t_all = time.time()
    timings = {}
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise PreprocessError(f"{out} already exists (pass --overwrite to replace it)")
    paths = resolve_inputs(cfg)
    fingerprint = preprocess_fingerprint(cfg)
    num_buckets = bucket_count(cfg, paths)
    with atomic_directory(out, overwrite=cfg.overwrite) as tmp:
        dirs = stages.WorkDirs(tmp)
        dirs.create()
        t0 = time.time()
        result = read_inputs(cfg, paths, num_buckets, dirs.work, dirs.rejects, log)
        timings["read_validate"] = time.time() - t0
        read = count_read(result.chunk_stats, result.catalog)
        log(f"[preprocess] read+validate: {read.rows_in:,} rows, {read.valid_rows:,} valid, {read.n_rej:,} rejected "
            f"({timings['read_validate']:.1f}s)")
        _check_read(cfg, paths, read, dirs.rejects)

        t0 = time.time()
        cleaned = stages.clean(cfg, dirs)
        removed = cleaned.removed
        timings["clean"] = time.time() - t0
        log(f"[preprocess] clean: {removed['duplicate']:,} duplicates, {removed['rating_threshold']:,} below "
            f"rating threshold ({timings['clean']:.1f}s)")

        t0 = time.time()
        cored = stages.kcore(cfg, cleaned, dirs, log)
        removed.update(cored.removed)
        if len(cored.kept_users) == 0:
            raise PreprocessError(f"no user is left after filtering ({dict(removed)}); lower user_core/item_core "
                                  f"(now {cfg.user_core}/{cfg.item_core}) or check the input")
        timings["kcore"] = time.time() - t0
        log(f"[preprocess] k-core ({cfg.user_core}/{cfg.item_core}, min length {cfg.min_sequence_length}): "
            f"{cored.rounds} round(s), removed "
            f"{removed['item_core'] + removed['user_core'] + removed['short_sequence']:,} rows ({timings['kcore']:.1f}s)")

        t0 = time.time()  # the emit timing includes the id maps
        n_buckets = len(cleaned.files)
        ids = stages.id_maps(cfg, result.catalog, result.user_ids, cored.kept_users, n_buckets, dirs)
        split_rows = stages.emit(cfg, ids, n_buckets, dirs)
        timings["emit"] = time.time() - t0
        timings["total"] = time.time() - t_all
        dirs.remove_work()
        log(f"[preprocess] emit: {split_rows['sequences']:,} users, {len(ids.items_table):,} items, "
            f"{split_rows['interactions']:,} interactions ({timings['emit']:.1f}s)")
        outcome = Outcome(removed, split_rows, len(ids.items_table), len(ids.used_items), cored.rounds)
        manifest = build_manifest(cfg, result.inputs, read, outcome, num_buckets, timings, result.skipped)
        manifest["fingerprint"] = fingerprint
        check_accounting(read, outcome)
        manifest = finish_manifest(tmp, manifest)
    log(f"[preprocess] wrote {out} in {timings['total']:.1f}s")
    return manifest
