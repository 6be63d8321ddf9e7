"""A preprocessed dataset in compact numpy form, and the samples DeftRec trains and is evaluated on.

Layout read (``deftrec.data.preprocess``): ``sequences.parquet`` (user, items, timestamps),
``train/valid/test.parquet`` (user, history, target), ``items.parquet`` (item, item_id, title,
category), ``manifest.json`` (must say ``status: complete``).

Leave-one-out (method.md, "Task and protocol"), for a user with full sequence s of length n:
test target s[-1], validation target s[-2], and the *training sequence* t = s[:-2] (length
m = n - 2). Training samples are the prefixes of t: for every j with min_history <= j <= m - 1,
history t[max(0, j - max_history):j] predicts t[j]; at most ``max_samples_per_user`` per user,
newest (largest j) first; with ``train.positions: all`` the samples are windows that tile t (see
:func:`build_training_samples`' ``stride``). LightGCN sees the (user, item) pairs of t only.

Ragged data (sequences, histories) is stored as one flat value array plus per-row
``[start, stop)`` bounds (:class:`Ragged`): training histories are overlapping windows of the
same flat sequence array, so building millions of samples copies no item ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deftrec.core.artifacts import ArtifactError, read_manifest

__all__ = [
    "ItemCatalog",
    "PreprocessedData",
    "EvalSet",
    "Ragged",
    "TrainingSamples",
    "build_training_samples",
    "load_dataset",
    "training_pairs",
]

_SPLITS = ("train", "valid", "test")
#: Items dropped from the end of a full sequence to get what precedes each split's target.
_DROP = {"train": 3, "valid": 2, "test": 1}
_FILES = ("sequences.parquet", "items.parquet") + tuple(f"{s}.parquet" for s in _SPLITS)


# --------------------------------------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class Ragged(Sequence):
    """Rows ``values[starts[i]:stops[i]]`` (rows may overlap or share storage).

    Behaves as a read-only sequence of 1-D numpy views, so it can be passed wherever the metrics
    and baselines expect "one int array per user". Slicing or fancy indexing returns a Ragged that
    shares ``values``.
    """

    values: np.ndarray  # flat item ids
    starts: np.ndarray  # int64 [n]
    stops: np.ndarray  # int64 [n]

    def __post_init__(self) -> None:
        if self.starts.shape != self.stops.shape or self.starts.ndim != 1:
            raise ValueError(f"starts and stops must be 1-D of equal length, got {self.starts.shape}, {self.stops.shape}")
        if self.starts.size and (self.starts.min() < 0 or self.stops.max() > self.values.size
                                 or (self.stops < self.starts).any()):
            raise ValueError("row bounds must satisfy 0 <= start <= stop <= len(values)")

    @classmethod
    def from_offsets(cls, values: np.ndarray, offsets: np.ndarray) -> Ragged:
        offsets = np.asarray(offsets, dtype=np.int64)
        return cls(np.asarray(values), offsets[:-1].copy(), offsets[1:].copy())

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], dtype=np.int64) -> Ragged:
        """Small inputs (tests, single requests): a list of id lists."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter((int(x) for r in rows for x in r), dtype=dtype, count=int(lengths.sum()))
        return cls.from_offsets(flat, np.concatenate([[0], np.cumsum(lengths)]))

    @classmethod
    def from_arrow(cls, column: pa.Array | pa.ChunkedArray) -> Ragged:
        """A list<int> column; works for sliced/taken arrays (offsets are rebuilt from lengths)."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if column.null_count:
            raise ArtifactError("list column has null rows")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        return cls.from_offsets(values, np.concatenate([[0], np.cumsum(lengths)]))

    @property
    def lengths(self) -> np.ndarray:
        return self.stops - self.starts

    def __len__(self) -> int:
        return int(self.starts.size)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"row {index} out of range for {len(self)} rows")
            return self.values[self.starts[i]:self.stops[i]]
        return Ragged(self.values, self.starts[index], self.stops[index])

    def __iter__(self) -> Iterator[np.ndarray]:
        for a, b in zip(self.starts.tolist(), self.stops.tolist()):
            yield self.values[a:b]

    def truncate(self, max_len: int) -> Ragged:
        """Keep the last ``max_len`` items of every row (a view)."""
        return Ragged(self.values, np.maximum(self.starts, self.stops - max_len), self.stops)

    def drop_last(self, n: int) -> Ragged:
        """Rows without their last ``n`` items (e.g. s[:-2], the training sequence)."""
        return Ragged(self.values, self.starts, np.maximum(self.starts, self.stops - n))

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(row index, item) of every element, vectorised (row-major, in order)."""
        lengths = self.lengths
        total = int(lengths.sum())
        rows = np.repeat(np.arange(len(self), dtype=np.int64), lengths)
        pos = np.repeat(self.starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(total)
        return rows, self.values[pos].astype(np.int64, copy=False)

    def last(self, fill: int = -1) -> np.ndarray:
        """Last item of every row, ``fill`` for empty rows."""
        out = np.full(len(self), fill, dtype=np.int64)
        ok = self.stops > self.starts
        out[ok] = self.values[self.stops[ok] - 1]
        return out


@dataclass(frozen=True, eq=False)
class ItemCatalog:
    """Item texts indexed by item id 0..n_items-1 (object arrays of str)."""

    item_ids: np.ndarray  # original ids (str)
    titles: np.ndarray
    categories: np.ndarray

    def __post_init__(self) -> None:
        if not (len(self.item_ids) == len(self.titles) == len(self.categories)):
            raise ValueError("item_ids, titles and categories must have the same length")

    @property
    def n_items(self) -> int:
        return len(self.titles)

    @classmethod
    def from_table(cls, table: pa.Table) -> ItemCatalog:
        item = table.column("item").to_numpy().astype(np.int64)
        n = int(item.max()) + 1 if item.size else 0
        if item.size and (item.min() < 0 or np.unique(item).size != item.size):
            raise ArtifactError("items.parquet: item indices must be distinct and >= 0")
        # Gaps (possible with published indices) get placeholder texts so lookups stay by index.
        ids = np.array([f"item {i}" for i in range(n)], dtype=object)
        titles, cats = ids.copy(), np.full(n, "", dtype=object)
        ids[item] = np.asarray(table.column("item_id").to_pylist(), dtype=object)
        titles[item] = np.asarray([t if t is not None else "" for t in table.column("title").to_pylist()],
                                  dtype=object)
        cats[item] = np.asarray([c if c is not None else "" for c in table.column("category").to_pylist()],
                                dtype=object)
        return cls(ids, titles, cats)

    @classmethod
    def synthetic(cls, n_items: int) -> ItemCatalog:
        """Titles "item 0".. for callers without a catalog (tests, id-only data)."""
        ids = np.array([str(i) for i in range(n_items)], dtype=object)
        return cls(ids, np.array([f"item {i}" for i in range(n_items)], dtype=object), np.full(n_items, "", object))


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Rows of one split table, sorted by user: users [n], histories (Ragged: the prompt's input, at
    most ``max_history`` newest items), targets [n], and ``seen`` (Ragged: the user's whole sequence
    before the target, what every model excludes from the ranking under the history-excluded
    protocol). Without ``seen``, the histories are taken to be the whole sequence."""

    users: np.ndarray
    histories: Ragged
    targets: np.ndarray
    seen: Ragged | None = None

    def __post_init__(self) -> None:
        if not (len(self.users) == len(self.histories) == len(self.targets)):
            raise ValueError("users, histories and targets must have the same length")
        if self.seen is not None and len(self.seen) != len(self.users):
            raise ValueError("seen must have one row per user")

    def __len__(self) -> int:
        return int(self.users.size)

    @property
    def exclusions(self) -> Ragged:
        """The items each user's ranking excludes (history excluded): everything before the target."""
        return self.seen if self.seen is not None else self.histories

    def subset(self, index) -> EvalSet:
        return EvalSet(self.users[index], self.histories[index], self.targets[index],
                       None if self.seen is None else self.seen[index])

    def sample(self, n: int | None, seed: int) -> EvalSet:
        """A fixed random subset of ``n`` rows (all rows when n is None or >= len), in user order."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self.subset(idx)


@dataclass(frozen=True, eq=False)
class TrainingSamples:
    """Training samples: ``histories[i]`` (a window of the training sequence) predicts ``targets[i]``."""

    users: np.ndarray  # int64 [S]
    histories: Ragged  # windows into the flat sequence array
    targets: np.ndarray  # int64 [S]

    def __len__(self) -> int:
        return int(self.users.size)

    def subset(self, index) -> TrainingSamples:
        return TrainingSamples(self.users[index], self.histories[index], self.targets[index])


@dataclass(frozen=True, eq=False)
class PreprocessedData:
    """A preprocessed directory in memory."""

    root: Path
    users: np.ndarray  # int64 [n_seq] user id of each sequence row (sorted)
    sequences: Ragged  # full chronological sequences
    catalog: ItemCatalog
    train: EvalSet
    valid: EvalSet
    test: EvalSet
    n_users: int  # max user id + 1 (LightGCN's user table size)
    n_items: int  # catalog size
    manifest: dict

    @property
    def train_sequences(self) -> Ragged:
        """s[:-2] for every user: what LightGCN and the training samples may see."""
        return self.sequences.drop_last(2)

    def sequences_before(self, split: str) -> Ragged:
        """Everything before the split's target: s[:-2] for valid, s[:-1] for test (baselines' fit data,
        and each split's ``seen``)."""
        if split not in _DROP:
            raise ValueError(f"split must be one of {list(_DROP)}, got {split!r}")
        return self.sequences.drop_last(_DROP[split])

    def split(self, name: str) -> EvalSet:
        if name not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {name!r}")
        return getattr(self, name)


# --------------------------------------------------------------------------------------------- loading


def _read_sorted(path: Path, columns: list[str]) -> pa.Table:
    table = pq.read_table(path, columns=columns)
    return table.sort_by("user")  # parts come in any order; rows are keyed by user


def _read_split(path: Path) -> EvalSet:
    t = _read_sorted(path, ["user", "history", "target"])
    return EvalSet(t.column("user").to_numpy().astype(np.int64), Ragged.from_arrow(t.column("history")),
                   t.column("target").to_numpy().astype(np.int64))


def load_dataset(path: str | Path) -> PreprocessedData:
    """Load a preprocessed directory; raises ArtifactError if it is incomplete or inconsistent."""
    root = Path(path)
    manifest = read_manifest(root, files=_FILES)  # raises unless complete with every file
    seq = _read_sorted(root / "sequences.parquet", ["user", "items"])
    users = seq.column("user").to_numpy().astype(np.int64)
    if users.size == 0:
        raise ArtifactError(f"{root}: no sequences")
    if np.unique(users).size != users.size:
        raise ArtifactError(f"{root}: sequences.parquet has repeated users")
    sequences = Ragged.from_arrow(seq.column("items"))
    if sequences.lengths.min() < 3:
        raise ArtifactError(f"{root}: a sequence is shorter than 3 (leave-one-out needs train, valid and test items)")
    catalog = ItemCatalog.from_table(pq.read_table(root / "items.parquet"))
    splits = {name: _read_split(root / f"{name}.parquet") for name in _SPLITS}
    n_items = catalog.n_items
    for name, es in splits.items():
        if not np.array_equal(es.users, users):
            raise ArtifactError(f"{root}: {name}.parquet users differ from sequences.parquet")
        hi = max(int(es.targets.max()), int(es.histories.values.max()) if es.histories.values.size else -1)
        if es.targets.min() < 0 or hi >= n_items:
            raise ArtifactError(f"{root}: {name}.parquet has item ids outside the catalog [0, {n_items})")
    if sequences.values.size and (sequences.values.min() < 0 or sequences.values.max() >= n_items):
        raise ArtifactError(f"{root}: sequences.parquet has item ids outside the catalog [0, {n_items})")
    # the split tables hold the prompt's window; what is excluded is everything before the target
    splits = {name: dataclasses.replace(es, seen=sequences.drop_last(_DROP[name])) for name, es in splits.items()}
    return PreprocessedData(root=root, users=users, sequences=sequences, catalog=catalog, n_users=int(users.max()) + 1,
                   n_items=n_items, manifest=manifest, **splits)


# --------------------------------------------------------------------------------------------- samples


def sample_options(cfg) -> dict:
    """``build_training_samples`` keyword arguments of a :class:`~deftrec.config.model.DeftRecConfig`:
    one sample per prefix (``train.positions: last``) or windows of ``prompt.max_history`` items; whole
    prefixes when the model reads the items before the window (``tokenizer.user_vector: earlier_items``)."""
    t, window = cfg.train, cfg.prompt.max_history
    return {"min_history": t.min_history, "max_samples_per_user": t.max_samples_per_user,
            "max_history": window, "stride": window if t.positions == "all" else 1,
            "whole_prefix": cfg.tokenizer.reads_earlier_items}


def build_training_samples(
    sequences: Ragged,
    users: np.ndarray,
    min_history: int = 3,
    max_samples_per_user: int = 20,
    max_history: int = 20,
    stride: int = 1,
    whole_prefix: bool = False,
) -> TrainingSamples:
    """Prefix samples of the given (already cut) training sequences, vectorised.

    For a row t of length m: j = m-1, m-1-stride, m-1-2 stride, ... while j >= min_history (at most
    ``max_samples_per_user`` of them; None: all) gives history t[max(0, j - max_history):j] and
    target t[j]. Samples are user-major (in row order), newest first within a user. ``stride = 1``:
    every prefix; ``stride = max_history``: windows that tile t, so that training on every position
    of every window (``train.positions: all``) predicts each item of t[min_history:] exactly once.
    ``whole_prefix``: the history is all of t[:j] (the same targets); the model reads its last
    ``max_history`` items as the window.
    """
    cap = np.iinfo(np.int64).max if max_samples_per_user is None else max_samples_per_user
    if min_history < 1 or cap < 1 or max_history < 1 or stride < 1:
        raise ValueError("min_history, max_samples_per_user, max_history and stride must be >= 1")
    users = np.asarray(users, dtype=np.int64)
    if users.shape != (len(sequences),):
        raise ValueError(f"users must be [{len(sequences)}], got {users.shape}")
    m = sequences.lengths
    # targets j = m-1 - r*stride >= min_history, r = 0, 1, ...
    count = np.minimum(np.where(m > min_history, (m - 1 - min_history) // stride + 1, 0), cap)
    total = int(count.sum())
    row = np.repeat(np.arange(len(sequences), dtype=np.int64), count)
    # r-th newest sample of a row (r = 0, 1, ...): r = global index - first index of the row
    first = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    r = np.arange(total, dtype=np.int64) - np.repeat(first, count)
    target_pos = sequences.stops[row] - 1 - r * stride  # absolute position of t[j] in the flat array
    hist_start = sequences.starts[row] if whole_prefix else np.maximum(sequences.starts[row], target_pos - max_history)
    hist = Ragged(sequences.values, hist_start, target_pos)
    return TrainingSamples(users[row], hist, sequences.values[target_pos].astype(np.int64))


def training_pairs(dataset: PreprocessedData) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) interactions of the training sequences s[:-2] (LightGCN's graph)."""
    rows, items = dataset.train_sequences.flat()
    return dataset.users[rows], items
