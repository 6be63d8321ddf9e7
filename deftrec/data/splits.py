"""Split building: ordered interaction rows -> sequences and leave-one-out split tables.

This module owns the pure table functions that define the output layout: the ``sequences`` and
train/valid/test split schemas, the deterministic id order (``sort_key_ids``) and
``build_splits``. They hold no Ray code; the Ray pipeline, the single-process reference
(``deftrec.data.reference``) and the tests all use them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPLIT_SCHEMA = pa.schema([("user", pa.int64()), ("history", pa.list_(pa.int32())), ("target", pa.int64())])
SEQ_SCHEMA = pa.schema([("user", pa.int64()), ("items", pa.list_(pa.int32())),
                        ("timestamps", pa.list_(pa.int64()))])


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
