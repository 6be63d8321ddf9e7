"""The published sequence format (``../shared/data/*``): one folder per dataset.

This module owns reading a deftrec-format folder (``train.txt``, ``test.txt``, ``item_list.txt``
and optionally ``user_list.txt``) into the same valid-row and reject tables the chunk readers
produce, plus its catalog and the user id map. It checks that every test line is its train line
plus one item and rejects sequences that name items outside the catalog.

Accounting: a row is one item of a ``test.txt`` line (``rows_in`` counts every item read). A
rejected line (an item not in the catalog, bytes that are not UTF-8) rejects the whole sequence:
one reject per item on it, each naming the line, so ``rows_in == rejected + removed + kept``
holds. ``item_list.txt`` needs ``org_id``, ``remap_id`` and ``title`` (``category`` is optional,
empty when absent); its bad rows, and bad rows of ``user_list.txt`` (wrong field count,
duplicate or non-integer ``remap_id``), are catalog rejects, counted under ``catalog_rejected``.
Structural problems (a user index that is not an integer, a test line that is not its train
line plus one item, undecodable bytes in ``train.txt``) are ``InputError`` naming file and line.
"""

from __future__ import annotations

import os
import re

import pyarrow as pa

from deftrec.config.data import CatalogColumnsConfig
from deftrec.data.catalog import catalog_from_rows, read_delimited
from deftrec.data.layout import check_file
from deftrec.data.readers import REJECT_SCHEMA, VALID_SCHEMA, InputError, reject_table
from deftrec.data.validation import bucket_of

_INDEX_RE = re.compile(r"[0-9]{1,18}")  # ASCII digits that fit int64 (str.isdigit admits "²")


def _index_problem(key: str):
    return None if _INDEX_RE.fullmatch(key) else "catalog: remap_id is not a non-negative integer"


def _read_items(path: str):
    """item_list.txt -> (catalog with original ids)."""
    header, rows, numbers = read_delimited(path, " ", "utf-8", header=True)
    for col in ("org_id", "remap_id", "title"):
        if col not in header:
            raise InputError(f"{path}: line 1 (header): no column {col!r}; header is {header}")
    cat = catalog_from_rows(path, header, rows, numbers,
                            CatalogColumnsConfig(item="remap_id", title="title", category="category"), True,
                            key_check=_index_problem)
    ri, oi = header.index("remap_id"), header.index("org_id")
    org = {r[ri].strip(): r[oi] for r in rows if r is not None and len(r) == len(header)}
    keys = cat.table.column("key").to_pylist()
    cat.table = cat.table.set_column(1, "item_id", pa.array([org[k] for k in keys], pa.string()))
    return cat


def _read_users(path: str) -> tuple[dict, list]:
    """user_list.txt -> (remap_id -> org_id, rejected rows)."""
    header, rows, numbers = read_delimited(path, " ", "utf-8", header=True)
    if "org_id" not in header or "remap_id" not in header:
        raise InputError(f"{path}: line 1 (header): expected org_id and remap_id, got {header}")
    ri, oi = header.index("remap_id"), header.index("org_id")
    users, first, rej = {}, {}, []
    for r, line in zip(rows, numbers):
        raw = " ".join(r).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if r else ""
        if r is None or len(r) != len(header):
            rej.append((line, "*", f"user list: wrong field count (expected {len(header)})", raw))
        elif raw != " ".join(r):
            rej.append((line, "*", "user list: invalid utf-8 bytes", raw))
        elif not _INDEX_RE.fullmatch(r[ri]):
            rej.append((line, "remap_id", "user list: remap_id is not a non-negative integer", raw))
        elif r[ri] in users:
            rej.append((line, "remap_id", f"user list: duplicate remap_id (first on line {first[r[ri]]})", raw))
        else:
            users[r[ri]], first[r[ri]] = r[oi], line
    return users, rej


def _read_lines(path: str, strict: bool):
    """-> [(line number, tokens, raw text, undecodable)] of the non-blank lines, and the blank count."""
    out, blank = [], 0
    with open(path, "rb") as f:
        for i, b in enumerate(f, 1):
            try:
                text, bad = b.decode("utf-8"), False
            except UnicodeDecodeError:
                if strict:
                    raise InputError(f"{path}: line {i}: bytes that are not valid utf-8") from None
                text, bad = b.decode("utf-8", "backslashreplace"), True
            if text.strip():
                out.append((i, text.split(), text.rstrip("\r\n"), bad))
            else:
                blank += 1
    return out, blank


def read_deftrec_folder(folder: str, num_buckets: int):
    """train.txt/test.txt/item_list.txt/user_list.txt -> (valid rows, rejects, catalog, user ids, stats).

    The log key of an item is its ``remap_id`` and of a user the line's first field; the catalog maps
    remap_id to the original id, title and category, and ``user_list.txt`` maps users likewise.
    ``rejects`` holds the catalog's rejects first (``catalog.rejects``), then the sequence rejects.
    """
    folder = str(folder)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: format 'deftrec' expects a folder with train.txt, test.txt, item_list.txt")
    paths = {n: os.path.join(folder, n) for n in ("train.txt", "test.txt", "item_list.txt", "user_list.txt")}
    for n in ("train.txt", "test.txt", "item_list.txt"):
        check_file(paths[n])
    cat = _read_items(paths["item_list.txt"])
    user_ids = {}
    if os.path.exists(paths["user_list.txt"]):
        user_ids, urej = _read_users(paths["user_list.txt"])
        if urej:
            extra = pa.table({"file": [paths["user_list.txt"]] * len(urej),
                              "line": pa.array([x[0] for x in urej], pa.int64()), "field": [x[1] for x in urej],
                              "reason": [x[2] for x in urej], "raw": [x[3] for x in urej]}, schema=REJECT_SCHEMA)
            cat.rejects = pa.concat_tables([cat.rejects, extra])
    train = {}
    for i, parts, _, _ in _read_lines(paths["train.txt"], strict=True)[0]:
        train[parts[0]] = (i, parts[1:])
    test_path = paths["test.txt"]
    test_lines, blank = _read_lines(test_path, strict=False)
    users, items, positions, ords, rejects = [], [], [], [], []
    valid_items = set(cat.table.column("key").to_pylist())
    seen_users = set()
    for i, parts, raw, bad in test_lines:
        if bad:  # the user field cannot be trusted: reject the line as it stands
            rejects.extend((i, "*", "invalid utf-8 bytes", raw) for _ in range(max(1, len(parts) - 1)))
            continue
        u, seq = parts[0], parts[1:]
        _check_sequence(test_path, i, u, seq, train, seen_users)
        seen_users.add(u)
        unknown = {x for x in seq if x not in valid_items}
        if unknown:
            rejects.extend((i, "item", "item not in catalog" if x in unknown else
                            "sequence rejected: another item is not in catalog", raw) for x in seq)
            continue
        users.extend([u] * len(seq))
        items.extend(seq)
        positions.extend(range(len(seq)))  # the order within a line is the sequence order
        ords.extend([(i << 20) | k for k in range(len(seq))])
    missing_test = sorted(set(train) - seen_users - _rejected_users(test_lines), key=int)
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
    stats = {"lines": len(test_lines) + blank, "blank_lines": blank, "rows": len(users) + len(rejects)}
    return valid, rej, cat, user_ids, stats


def _rejected_users(test_lines) -> set:
    """Users whose test line was rejected for its bytes: their train line is not an orphan."""
    return {parts[0] for _, parts, _, bad in test_lines if bad and parts}


def _check_sequence(test_path: str, i: int, u: str, seq: list, train: dict, seen_users: set) -> None:
    if not _INDEX_RE.fullmatch(u):
        raise InputError(f"{test_path}: line {i}: field user: {u!r} is not a user index")
    if u in seen_users:
        raise InputError(f"{test_path}: line {i}: user {u} appears twice")
    if u not in train:
        raise InputError(f"{test_path}: line {i}: user {u} has no line in train.txt")
    tl, tseq = train[u]
    if tseq != seq[:-1]:
        raise InputError(f"{test_path}: line {i}: user {u}: the sequence is not train.txt line {tl} plus one "
                         f"test item")
