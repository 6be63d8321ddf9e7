"""The published sequence format (``../shared/data/*``): one folder per dataset.

This module owns reading a deftrec-format folder (``train.txt``, ``test.txt``, ``item_list.txt``
and optionally ``user_list.txt``) into the same valid-row and reject tables the chunk readers
produce, plus its catalog and the user id map. It checks that every test line is its train line
plus one item and rejects sequences that name items outside the catalog.
"""

from __future__ import annotations

import os

import pyarrow as pa

from deftrec.data.catalog import catalog_from_rows, read_delimited
from deftrec.data.layout import check_file
from deftrec.data.readers import VALID_SCHEMA, InputError, reject_table
from deftrec.data.validation import bucket_of


def read_deftrec_folder(folder: str, num_buckets: int):
    """train.txt/test.txt/item_list.txt/user_list.txt -> (valid rows, rejects, catalog, user ids, stats).

    The log key of an item is its ``remap_id`` and of a user the line's first field; the catalog maps
    remap_id to the original id, title and category, and ``user_list.txt`` maps users likewise.
    """
    folder = str(folder)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: format 'deftrec' expects a folder with train.txt, test.txt, item_list.txt")
    paths = {n: os.path.join(folder, n) for n in ("train.txt", "test.txt", "item_list.txt", "user_list.txt")}
    for n in ("train.txt", "test.txt", "item_list.txt"):
        check_file(paths[n])
    # item_list.txt: space separated, quoted fields, header names the columns (order varies).
    rows, numbers = read_delimited(paths["item_list.txt"], " ", "utf-8", header=True)
    header, rows, numbers = rows[0], rows[1:], numbers[1:]
    for col in ("org_id", "remap_id", "title", "category"):
        if col not in header:
            raise InputError(f"{paths['item_list.txt']}: line 1 (header): no column {col!r}; header is {header}")
    from deftrec.config.data import CatalogColumnsConfig
    cat = catalog_from_rows(paths["item_list.txt"], header, rows, numbers,
                            CatalogColumnsConfig(item="remap_id", title="title", category="category"), True)
    org = {r[header.index("remap_id")].strip(): r[header.index("org_id")] for r in rows
           if len(r) == len(header)}
    keys = cat.table.column("key").to_pylist()
    bad_keys = [k for k in keys if not k.isdigit()]
    if bad_keys:
        raise InputError(f"{paths['item_list.txt']}: remap_id must be a non-negative integer, got {bad_keys[0]!r}")
    cat.table = cat.table.set_column(1, "item_id", pa.array([org[k] for k in keys], pa.string()))
    user_ids = {}
    if os.path.exists(paths["user_list.txt"]):
        urows, unum = read_delimited(paths["user_list.txt"], " ", "utf-8", header=True)
        uh = urows[0]
        if "org_id" not in uh or "remap_id" not in uh:
            raise InputError(f"{paths['user_list.txt']}: line 1 (header): expected org_id and remap_id, got {uh}")
        for r in urows[1:]:
            user_ids[r[uh.index("remap_id")]] = r[uh.index("org_id")]

    def read_lines(p):
        with open(p, encoding="utf-8") as f:
            return [(i, ln.split()) for i, ln in enumerate(f, 1) if ln.strip()]

    train = {}
    for i, parts in read_lines(paths["train.txt"]):
        train[parts[0]] = (i, parts[1:])
    users, items, positions, ords, rejects = [], [], [], [], []
    valid_items = set(keys)
    seen_users = set()
    test_path = paths["test.txt"]
    for i, parts in read_lines(test_path):
        u, seq = parts[0], parts[1:]
        if not u.isdigit():
            raise InputError(f"{test_path}: line {i}: field user: {u!r} is not a user index")
        if u in seen_users:
            raise InputError(f"{test_path}: line {i}: user {u} appears twice")
        seen_users.add(u)
        if u not in train:
            raise InputError(f"{test_path}: line {i}: user {u} has no line in train.txt")
        tl, tseq = train[u]
        if tseq != seq[:-1]:
            raise InputError(f"{test_path}: line {i}: user {u}: the sequence is not train.txt line {tl} plus one "
                             f"test item")
        unknown = [x for x in seq if x not in valid_items]
        if unknown:
            rejects.append((i, "item", f"item not in catalog ({unknown[0]})", " ".join(parts)))
            continue
        users.extend([u] * len(seq))
        items.extend(seq)
        positions.extend(range(len(seq)))
        ords.extend([(i << 20) | k for k in range(len(seq))])
    missing_test = sorted(set(train) - seen_users, key=int)
    if missing_test:
        raise InputError(f"{paths['train.txt']}: line {train[missing_test[0]][0]}: user {missing_test[0]} has no "
                         f"line in test.txt ({len(missing_test)} such users)")
    if not users:
        raise InputError(f"{test_path}: no valid sequences")
    uarr = pa.array(users, pa.string())
    valid = pa.table({
        "user_id": uarr, "item_id": pa.array(items, pa.string()),
        "timestamp": pa.array(positions, pa.int64()), "rating": pa.nulls(len(users), pa.float64()),
        "_ord": pa.array(ords, pa.int64()), "_bucket": pa.array(bucket_of(uarr, num_buckets), pa.int32()),
    }, schema=VALID_SCHEMA)
    rej = reject_table(test_path, [r[0] for r in rejects], [r[1] for r in rejects], [r[2] for r in rejects],
                       [r[3] for r in rejects])
    rej = pa.concat_tables([cat.rejects, rej])
    stats = {"lines": len(seen_users) + len(rejects), "blank_lines": 0, "rows": len(users)}
    return valid, rej, cat, user_ids, stats
