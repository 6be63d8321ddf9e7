"""Row accounting and the manifest of a preprocessed directory.

This module owns the numbers a preprocessing run reports: the read stage's totals (rows, blank
lines, rejects by reason, catalog rejects), the first reject examples quoted in error messages,
the ``manifest.json`` content (config, input checksums, counts, files, timings, versions) and the
check that every input row is accounted for as rejected, removed or kept.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deftrec.config.data import PreprocessConfig
from deftrec.core.artifacts import sha256_file
from deftrec.core.config import to_dict
from deftrec.data.catalog import RawCatalog

SCHEMA_VERSION = 1
REMOVED_REASONS = ("duplicate", "rating_threshold", "item_core", "user_core", "short_sequence")


@dataclasses.dataclass
class ReadCounts:
    """Totals of the read + validate stage."""

    rows_in: int
    blank: int
    row_rejected: Counter  # reason -> rows
    n_rej: int
    catalog_rejected: Counter  # reason -> catalog rows (deftrec: item_list.txt and user_list.txt rows)
    valid_rows: int


def count_read(chunk_stats: list[dict], catalog: Optional[RawCatalog]) -> ReadCounts:
    rows_in = sum(s["rows"] for s in chunk_stats)
    blank = sum(s["blank_lines"] for s in chunk_stats)
    row_rejected = Counter()
    for s in chunk_stats:
        row_rejected.update(s["rejected"])
    n_rej = sum(row_rejected.values())
    catalog_rejected = Counter(catalog.rejects.column("reason").to_pylist()) if catalog else Counter()
    valid_rows = sum(s["valid"] for s in chunk_stats)
    return ReadCounts(rows_in, blank, row_rejected, n_rej, catalog_rejected, valid_rows)


@dataclasses.dataclass
class Outcome:
    """What the later stages report for the manifest."""

    removed: Counter  # reason -> rows removed by clean and k-core
    split_rows: Counter  # rows per output table, plus ``interactions`` (the kept rows)
    n_items: int  # rows of items.parquet
    n_items_used: int  # items that occur in the kept rows
    kcore_rounds: int


def build_manifest(cfg: PreprocessConfig, inputs: list[str], read: ReadCounts, outcome: Outcome,
                   num_buckets: int, timings: dict, skipped: Optional[dict] = None) -> dict:
    """``skipped``: files of input folders that were not read (path -> reason), listed as ``inputs_skipped``."""
    removed, split_rows = outcome.removed, outcome.split_rows
    return {
        "kind": "preprocessed",
        "schema_version": SCHEMA_VERSION,
        "config": to_dict(cfg),
        "inputs": {p: {"sha256": sha256_file(p), "bytes": os.path.getsize(p)} for p in inputs},
        "inputs_skipped": dict(skipped or {}),
        "counts": {
            "rows_in": read.rows_in,
            "blank_lines": read.blank,
            "rejected": dict(sorted(read.row_rejected.items())),
            "rejected_total": read.n_rej,
            "catalog_rejected": dict(read.catalog_rejected),
            "removed": {k: removed.get(k, 0) for k in REMOVED_REASONS},
            "removed_total": sum(removed.values()),
            "kept": split_rows["interactions"],
            "users": split_rows["sequences"],
            "items": outcome.n_items,
            "items_used": outcome.n_items_used,
            "kcore_rounds": outcome.kcore_rounds,
            "splits": {k: split_rows[k] for k in ("train", "valid", "test")},
        },
        "files": {"train": "train.parquet", "valid": "valid.parquet", "test": "test.parquet",
                  "sequences": "sequences.parquet", "items": "items.parquet", "users": "users.parquet",
                  "rejects": "rejects", "removed": "removed"},
        "num_buckets": num_buckets,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "versions": _versions(),
    }


def check_accounting(read: ReadCounts, outcome: Outcome) -> None:
    """Every input row is rejected, removed or kept; anything else is a bug."""
    removed_total = sum(outcome.removed.values())
    kept = outcome.split_rows["interactions"]
    if read.rows_in != read.n_rej + removed_total + kept:
        raise RuntimeError(f"row accounting does not add up: in {read.rows_in} != rejected {read.n_rej} + removed "
                           f"{removed_total} + kept {kept} (internal error)")


def reject_examples(reject_dir: Path, n: int = 3) -> str:
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
