"""Single-process pandas implementation of the preprocessing steps, for CSV/TSV logs.

It exists to check and to measure the Ray pipeline: the tests compare both outputs row for row,
and ``benchmarks/preprocess.py`` times both on the same files. Strings stay Arrow-backed
(``dtype_backend="pyarrow"``) so the log is never held as one Python object per value.
Only what the comparison needs is returned (no rejects files, no manifest).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from deftrec.config.data import PreprocessConfig
from deftrec.data.splits import build_splits, sort_key_ids


def reference_preprocess(cfg: PreprocessConfig, items_path: str | None = None) -> dict:
    c = cfg.columns
    usecols = [c.user, c.item, c.timestamp] + ([c.rating] if c.rating else [])
    frames = []
    for file_idx, path in enumerate(cfg.input):
        df = pd.read_csv(path, sep=cfg.delimiter, usecols=usecols, dtype="string[pyarrow]", engine="pyarrow",
                         on_bad_lines="skip", encoding=cfg.encoding)
        # input order: line number of each row (header = line 1); valid only without skipped lines
        df["_ord"] = (np.int64(file_idx) << 40) | (np.arange(len(df), dtype=np.int64) + 2)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    rows_in = len(df)
    u = df[c.user].str.strip()
    it = df[c.item].str.strip()
    ts_num = pd.to_numeric(df[c.timestamp].str.strip(), errors="coerce")
    ok = u.notna() & (u != "") & it.notna() & (it != "") & ts_num.notna()
    rating = pd.to_numeric(df[c.rating].str.strip(), errors="coerce") if c.rating else pd.Series(np.nan, index=df.index)
    if c.rating:
        ok &= rating.notna() | (df[c.rating].fillna("").str.strip() == "")
    if items_path:
        cat = pd.read_csv(items_path, dtype="string[pyarrow]", keep_default_na=False)
        ok &= it.isin(cat[cfg.catalog_columns.item])
    out = pd.DataFrame({"u": u[ok].astype("string[pyarrow]"), "i": it[ok].astype("string[pyarrow]"),
                        "ts": np.floor(ts_num[ok].to_numpy(dtype=np.float64)).astype(np.int64),
                        "r": rating[ok].to_numpy(dtype=np.float64), "_ord": df["_ord"][ok].to_numpy()})
    rejected = rows_in - len(out)
    out = out.sort_values("_ord", kind="stable").drop_duplicates(subset=["u", "i", "ts", "r"], keep="first")
    if cfg.rating_threshold is not None:
        out = out[out["r"] >= cfg.rating_threshold]
    user_min = max(cfg.user_core, cfg.min_sequence_length)
    while True:
        n = len(out)
        if cfg.item_core:
            ic = out["i"].value_counts()
            out = out[out["i"].map(ic).to_numpy() >= cfg.item_core]
        uc = out["u"].value_counts()
        out = out[out["u"].map(uc).to_numpy() >= user_min]
        if len(out) == n:
            break
    item_keys = sort_key_ids(pa.array(out["i"].unique()))
    user_keys = sort_key_ids(pa.array(out["u"].unique()))
    ii = pd.Index(item_keys.to_pandas()).get_indexer(out["i"])
    ui = pd.Index(user_keys.to_pandas()).get_indexer(out["u"])
    ts = out["ts"].to_numpy()
    order = np.lexsort((out["_ord"].to_numpy(), ts, ui))
    splits = build_splits(ui[order].astype(np.int64), ii[order].astype(np.int32), ts[order], cfg.max_history)
    splits["item_keys"] = item_keys
    splits["user_keys"] = user_keys
    splits["rows_in"] = rows_in
    splits["rejected"] = rejected
    return splits
