"""The read + validate stage of the preprocessing job (Ray Data).

This module owns getting the input into user-bucketed Parquet: resolving and checking the input
paths, choosing the number of user buckets, reading the item catalog, planning chunks and their
absolute line numbers, the Ray Data map that parses and validates every chunk (rejects and
per-chunk statistics go to side files), and the path for the published deftrec-format folders.
Its result (``ReadResult``) is what the later stages and the manifest need from the read.

A folder input is read recursively (Hive-style partitions such as ``day=2026-01-01/part-0.parquet``
included), files in sorted relative-path order. Files and folders whose name starts with ``_``
or ``.`` (``_SUCCESS``, ``_metadata``, ``.part-0.crc``, ``_temporary/``) and empty files are
skipped; each skipped path is logged and listed in the manifest (``inputs_skipped``). A file
named on its own is always read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from deftrec.config.data import PreprocessConfig
from deftrec.core.artifacts import write_json_atomic
from deftrec.data.catalog import RawCatalog, read_catalog
from deftrec.data.chunks import parse_chunk
from deftrec.data.deftrec_folder import read_deftrec_folder
from deftrec.data.layout import Chunk, check_file, needs_transcoding, plan_chunks, plan_layout
from deftrec.data.readers import InputError, empty_valid
from deftrec.data.records import scan_range
from deftrec.data.transcode import transcode_to_utf8

DEFTREC_FILES = ("train.txt", "test.txt", "item_list.txt", "user_list.txt")
MAX_CHUNK_BYTES = 1 << 30  # a range's lines are one Arrow array with 32-bit offsets


@dataclasses.dataclass
class ReadResult:
    """What the read stage hands on: per-chunk statistics, the catalog and the files it read."""

    chunk_stats: list[dict]  # per chunk: lines, blank_lines, rows, valid, rejected (reason -> count)
    catalog: Optional[RawCatalog]
    user_ids: dict  # log user key -> original user id (deftrec format only)
    inputs: list[str]  # every file read, for the manifest's checksums
    skipped: dict = dataclasses.field(default_factory=dict)  # path -> why a file in an input folder was not read


def _skip_reason(name: str) -> Optional[str]:
    if name.startswith("_"):
        return "name starts with '_' (marker or metadata)"
    if name.startswith("."):
        return "hidden (name starts with '.')"
    return None


def _walk_folder(folder: str, skipped: dict) -> list[str]:
    """Data files below ``folder``, sub-folders included, in sorted relative-path order."""
    found = []
    for root, dirs, files in os.walk(folder):
        for d in list(dirs):
            reason = _skip_reason(d)
            if reason:
                skipped[os.path.join(root, d) + os.sep] = reason
                dirs.remove(d)  # os.walk does not descend into removed names
        for name in files:
            path = os.path.join(root, name)
            reason = _skip_reason(name) or (None if os.path.getsize(path) else "empty file")
            if reason:
                skipped[path] = reason
            else:
                found.append(path)
    return sorted(found, key=lambda x: Path(x).relative_to(folder).parts)


def find_inputs(cfg: PreprocessConfig) -> tuple[list[str], dict]:
    """The input files, folders expanded -> (paths, skipped path -> reason)."""
    paths, skipped = [], {}
    for p in cfg.input:
        if cfg.format != "deftrec" and os.path.isdir(p):
            found = _walk_folder(p, skipped)
            if not found:
                raise InputError(f"{p}: folder has no data files"
                                 + (f" ({len(skipped)} skipped, e.g. {next(iter(skipped))})" if skipped else ""))
            paths.extend(found)
        else:
            paths.append(p)
    return paths, dict(sorted(skipped.items()))


def resolve_inputs(cfg: PreprocessConfig) -> list[str]:
    """The input files (folders expanded), each checked; raise InputError naming the first bad one."""
    paths = find_inputs(cfg)[0] if cfg.format != "deftrec" else [cfg.input[0]]
    for p in paths:
        if cfg.format == "deftrec":
            if not os.path.isdir(p):
                raise InputError(f"{p}: format 'deftrec' expects a folder with train.txt, test.txt, item_list.txt")
        else:
            check_file(p)
    return paths


def bucket_count(cfg: PreprocessConfig, paths: list[str]) -> int:
    """User-hash partitions: as configured, else one per 256 MiB of input (1 to 256)."""
    total_bytes = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    return cfg.num_buckets or max(1, min(256, -(-total_bytes // (256 << 20))))


def scan_args(cfg: PreprocessConfig, c: Chunk) -> tuple:
    """Arguments of ``records.scan_range`` for a chunk (CSV quoting only for one-character delimiters)."""
    delim = cfg.delimiter if cfg.format != "jsonl" and len(cfg.delimiter) == 1 else None
    return c.layout.data_path, c.start, c.end, 0, c.layout.data_encoding, delim


def number_chunks(chunks: list[Chunk], scans: list[dict]) -> None:
    """Absolute line numbers and, for CSV quoting, each range's start state (see deftrec.data.records):
    the ranges of a file, scanned in parallel, are chained in order here."""
    line, in_quote, opened = {}, {}, {}
    for c, r in zip(chunks, scans):
        path = c.layout.path
        c.first_line = line.get(path, c.layout.first_line)
        c.start_in_quote = in_quote.get(path, False)
        end_in, open_line = r["in" if c.start_in_quote else "out"]
        if end_in and open_line is not None:
            opened[path] = c.first_line + open_line
        in_quote[path] = end_in
        line[path] = c.first_line + r["lines"]
    for path, still_open in in_quote.items():
        if still_open:
            raise InputError(f"{path}: line {opened.get(path, '?')}: a quoted field opened on this line is never "
                             f"closed (the file ends inside quotes)")


def utf8_copies(cfg: PreprocessConfig, paths: list[str], work: Path, log) -> list[Optional[str]]:
    """Per input, its UTF-8 copy under ``work`` when the encoding cannot be cut into byte ranges
    (``deftrec.data.transcode``), else None: the file is read as it is."""
    if not needs_transcoding(cfg):
        return [None] * len(paths)
    folder = work / "utf8"
    folder.mkdir(parents=True, exist_ok=True)
    return [transcode_to_utf8(p, cfg.encoding, str(folder / f"{i:06d}-{Path(p).name}"), log)
            for i, p in enumerate(paths)]


def _parse_stage(cfg, paths, catalog_ids, num_buckets, work: Path, reject_dir: Path, log) -> list[dict]:
    """Ray Data: chunked read + validation -> user-bucketed Parquet; rejects and stats as side files."""
    import ray

    copies = utf8_copies(cfg, paths, work, log)
    layouts = [plan_layout(cfg, p, i, copy) for i, (p, copy) in enumerate(zip(paths, copies))]
    # At least ~2 read tasks per CPU so small clusters stay busy; never above chunk_mb.
    total = sum(os.path.getsize(p) for p in paths)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunk_bytes = max(1, int(min(cfg.chunk_mb * (1 << 20), max(4 << 20, total / (2 * cpus)), MAX_CHUNK_BYTES)))
    chunks: list[Chunk] = []
    for lay in layouts:
        chunks.extend(plan_chunks(lay, chunk_bytes, cfg.format))
    if cfg.format != "parquet":
        scan = ray.remote(num_cpus=1)(scan_range)
        number_chunks(chunks, ray.get([scan.remote(*scan_args(cfg, c)) for c in chunks]))
    log(f"[preprocess] read: {len(paths)} file(s), {len(chunks)} chunk(s), {num_buckets} user bucket(s)")
    stats_dir = work / "stats"
    stats_dir.mkdir(parents=True)
    cat_ref = ray.put(catalog_ids) if catalog_ids is not None else None

    def parse(batch: pa.Table, catalog) -> pa.Table:
        if isinstance(catalog, ray.ObjectRef):  # Ray Data passes fn_kwargs refs through unresolved
            catalog = ray.get(catalog)
        out = []
        for i in batch.column("i").to_pylist():
            valid, rejects, stats = parse_chunk(chunks[i], cfg, catalog, num_buckets)
            if rejects.num_rows:
                pq.write_table(rejects, reject_dir / f"part-{i:06d}.parquet")
            stats["rejected"] = dict(Counter(rejects.column("reason").to_pylist()))
            stats["valid"] = valid.num_rows
            write_json_atomic(stats_dir / f"chunk-{i:06d}.json", stats)
            out.append(valid)
        return pa.concat_tables(out) if out else empty_valid()

    ds = ray.data.from_items([{"i": i} for i in range(len(chunks))], override_num_blocks=len(chunks))
    ds = ds.map_batches(parse, batch_size=1, batch_format="pyarrow", fn_kwargs={"catalog": cat_ref},
                        num_cpus=1, zero_copy_batch=True)
    ds.write_parquet(str(work / "buckets"), partition_cols=["_bucket"])
    return [json.loads(p.read_text()) for p in sorted(stats_dir.glob("chunk-*.json"))]


def _read_published(cfg: PreprocessConfig, num_buckets: int, work: Path, reject_dir: Path) -> ReadResult:
    """A deftrec-format folder: read on the driver (it is small), then bucketed like the chunked read."""
    valid, rej, catalog, user_ids, st = read_deftrec_folder(cfg.input[0], num_buckets)
    if rej.num_rows:
        pq.write_table(rej, reject_dir / "part-000000.parquet")
    line_rej = rej.slice(catalog.rejects.num_rows)  # catalog rejects are counted apart
    st.update(valid=valid.num_rows, rejected=dict(Counter(line_rej.column("reason").to_pylist())))
    pads.write_dataset(valid, work / "buckets", format="parquet", partitioning=["_bucket"],
                       partitioning_flavor="hive")
    inputs = [os.path.join(cfg.input[0], n) for n in DEFTREC_FILES if os.path.exists(os.path.join(cfg.input[0], n))]
    return ReadResult([st], catalog, user_ids, inputs)


def _read_files(cfg: PreprocessConfig, paths: list[str], num_buckets: int, work: Path, reject_dir: Path,
                log: Callable[[str], None]) -> ReadResult:
    """Log files (and the optional catalog): the chunked Ray Data read."""
    catalog = None
    if cfg.items:
        catalog = read_catalog(cfg, cfg.items)
        if catalog.rejects.num_rows:
            pq.write_table(catalog.rejects, reject_dir / "catalog.parquet")
    cat_ids = catalog.table.column("key").combine_chunks() if catalog else None
    skipped = find_inputs(cfg)[1]
    for path, why in skipped.items():
        log(f"[preprocess] skipped {path}: {why}")
    chunk_stats = _parse_stage(cfg, paths, cat_ids, num_buckets, work, reject_dir, log)
    inputs = paths + ([cfg.items] if cfg.items else [])
    return ReadResult(chunk_stats, catalog, {}, inputs, skipped)


def read_inputs(cfg: PreprocessConfig, paths: list[str], num_buckets: int, work: Path, reject_dir: Path,
                log: Callable[[str], None]) -> ReadResult:
    """Read and validate every input into ``work/buckets`` (Hive partitioned by ``_bucket``)."""
    if cfg.format == "deftrec":
        return _read_published(cfg, num_buckets, work, reject_dir)
    return _read_files(cfg, paths, num_buckets, work, reject_dir, log)
