"""Preprocess interaction logs into leave-one-out Parquet splits on Ray Data.

    python -m pipelines.preprocess --input PATH [PATH ...] --format {csv,tsv,jsonl,parquet,movielens,deftrec}
        [--items PATH] --output DIR [--config preset.yaml] [--set key=value ...] [options]
"""

from __future__ import annotations

import argparse
import sys

from deftrec.config.data import FORMATS, PreprocessConfig
from deftrec.core.config import apply_overrides, from_dict, load_yaml
from pipelines._cli import run


def build_config(argv: list[str] | None = None) -> PreprocessConfig:
    return config_from_args(parse_args(argv))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.preprocess", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", help="input file(s) or folder(s); format deftrec: the dataset folder")
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--items", help="item catalog (item_id, title, category); movielens: movies.dat")
    p.add_argument("--output", help="output directory (written atomically)")
    p.add_argument("--config", help="YAML file with a 'preprocess' section or preprocess fields")
    p.add_argument("--user-col"), p.add_argument("--item-col"), p.add_argument("--time-col")
    p.add_argument("--rating-col", help="rating column; '' for none")
    p.add_argument("--delimiter"), p.add_argument("--encoding")
    p.add_argument("--no-header", action="store_true", help="the file has no header; columns are 0-based positions")
    p.add_argument("--timestamp-format", help="auto | unix | unix_ms | strptime format")
    p.add_argument("--rating-threshold", type=float)
    p.add_argument("--user-core", type=int), p.add_argument("--item-core", type=int)
    p.add_argument("--max-history", type=int)
    p.add_argument("--num-buckets", type=int, help="user-hash partitions (0 = by input size)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    p.add_argument("--verbose", action="store_true", help="show Ray's own INFO logs on the console too")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> PreprocessConfig:
    data = {}
    if a.config:
        y = load_yaml(a.config)
        data = y.get("preprocess", y)
    flat = {"input": a.input, "format": a.format, "items": a.items, "output": a.output,
            "delimiter": a.delimiter, "encoding": a.encoding, "timestamp_format": a.timestamp_format,
            "rating_threshold": a.rating_threshold, "user_core": a.user_core, "item_core": a.item_core,
            "max_history": a.max_history, "num_buckets": a.num_buckets}
    data.update({k: v for k, v in flat.items() if v is not None})
    if a.no_header:
        data["header"] = False
    if a.overwrite:
        data["overwrite"] = True
    cols = dict(data.get("columns") or {})
    for role, v in (("user", a.user_col), ("item", a.item_col), ("timestamp", a.time_col), ("rating", a.rating_col)):
        if v is not None:
            cols[role] = v or None
    if cols:
        data["columns"] = cols
    data = apply_overrides(data, a.set)
    return from_dict(PreprocessConfig, data, "preprocess")


def main(argv: list[str] | None = None) -> int:
    from deftrec.data.preprocess import run_preprocess

    a = parse_args(argv)

    def body() -> int:
        cfg = config_from_args(a)
        m = run_preprocess(cfg)
        c = m["counts"]
        print(f"[preprocess] {cfg.output}: {c['users']:,} users, {c['items']:,} items, {c['kept']:,} interactions "
              f"kept of {c['rows_in']:,}; rejected {c['rejected_total']:,}, removed {c['removed_total']:,}")
        return 0

    return run(a, body, "preprocess")


if __name__ == "__main__":
    sys.exit(main())
