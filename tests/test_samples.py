"""Loading preprocessed directories and building DeftRec's training / evaluation samples."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deftrec.core.artifacts import ArtifactError, finish_manifest
from deftrec.data.samples import (
    ItemCatalog,
    Ragged,
    build_training_samples,
    load_dataset,
    training_pairs,
)
from deftrec.data.splits import build_splits

# Full chronological sequences (user -> items). Test target s[-1], valid s[-2], training part s[:-2].
SEQS = {
    0: [0, 1, 2, 3, 4, 5],  # training part [0, 1, 2, 3]
    1: [2, 2, 3],  # training part [2]
    2: [5, 4, 3, 2, 1],  # training part [5, 4, 3]
}
TITLES = ["zero", "one", "two", "three", "four", "five"]


def _write_dataset(root, seqs=SEQS, max_history=20, item_rows=None, complete=True):
    """A preprocessed directory in the real layout (split tables from preprocess.build_splits)."""
    root.mkdir(parents=True)
    users = np.concatenate([[u] * len(s) for u, s in seqs.items()]).astype(np.int64)
    items = np.concatenate([s for s in seqs.values()]).astype(np.int32)
    ts = np.arange(users.size, dtype=np.int64)
    tables = build_splits(users, items, ts, max_history)
    for name, table in tables.items():
        d = root / f"{name}.parquet"
        d.mkdir()
        # two parts in reverse user order: the loader must not rely on part order
        half = table.num_rows // 2
        pq.write_table(table.slice(half), d / "part-00000.parquet")
        pq.write_table(table.slice(0, half), d / "part-00001.parquet")
    rows = item_rows if item_rows is not None else list(range(len(TITLES)))
    pq.write_table(pa.table({
        "item": pa.array(rows, pa.int64()),
        "item_id": pa.array([f"i{r}" for r in rows]),
        "title": pa.array([TITLES[r] for r in rows]),
        "category": pa.array(["even" if r % 2 == 0 else "odd" for r in rows]),
    }), root / "items.parquet")
    pq.write_table(pa.table({"user": pa.array(list(seqs), pa.int64())}), root / "users.parquet")
    manifest = {"kind": "preprocessed"}
    if complete:
        finish_manifest(root, manifest)
    else:
        (root / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    return root


# --------------------------------------------------------------------------------------------- Ragged


def test_ragged_views_and_helpers():
    r = Ragged.from_lists([[1, 2, 3], [], [4, 5]])
    assert len(r) == 3
    assert r[0].tolist() == [1, 2, 3] and r[1].tolist() == [] and r[-1].tolist() == [4, 5]
    assert r.lengths.tolist() == [3, 0, 2]
    assert [x.tolist() for x in r] == [[1, 2, 3], [], [4, 5]]
    rows, items = r.flat()
    assert rows.tolist() == [0, 0, 0, 2, 2] and items.tolist() == [1, 2, 3, 4, 5]
    assert [x.tolist() for x in r.truncate(2)] == [[2, 3], [], [4, 5]]
    assert [x.tolist() for x in r.drop_last(2)] == [[1], [], []]
    assert r.last().tolist() == [3, -1, 5]
    sub = r[np.array([2, 0])]
    assert isinstance(sub, Ragged) and [x.tolist() for x in sub] == [[4, 5], [1, 2, 3]]
    assert sub.values is r.values  # fancy indexing copies bounds, not items
    with pytest.raises(IndexError):
        r[3]
    with pytest.raises(ValueError):
        Ragged(np.arange(3), np.array([0]), np.array([4]))


# --------------------------------------------------------------------------------------------- samples


def _samples_as_lists(s):
    return [(int(u), s.histories[i].tolist(), int(t)) for i, (u, t) in enumerate(zip(s.users, s.targets))]


def test_training_samples_hand_example():
    seqs = Ragged.from_lists([[0, 1, 2, 3], [2], [5, 4, 3]])  # the training parts of SEQS
    users = np.array([0, 1, 2])
    # min_history 3: only prefixes of length 3 whose next item is still in the training part
    s = build_training_samples(seqs, users, min_history=3, max_samples_per_user=20, max_history=20)
    assert _samples_as_lists(s) == [(0, [0, 1, 2], 3)]
    # min_history 1: every prefix, newest first, user-major
    s = build_training_samples(seqs, users, min_history=1, max_samples_per_user=20, max_history=20)
    assert _samples_as_lists(s) == [
        (0, [0, 1, 2], 3), (0, [0, 1], 2), (0, [0], 1),
        (2, [5, 4], 3), (2, [5], 4),
    ]
    # the cap keeps the newest samples; max_history keeps the last items of each prefix
    s = build_training_samples(seqs, users, min_history=1, max_samples_per_user=2, max_history=2)
    assert _samples_as_lists(s) == [(0, [1, 2], 3), (0, [0, 1], 2), (2, [5, 4], 3), (2, [5], 4)]


def test_training_samples_match_bruteforce():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50, size=n).tolist() for n in rng.integers(0, 40, size=60)]
    seqs = Ragged.from_lists(rows)
    users = np.arange(100, 160)
    s = build_training_samples(seqs, users, min_history=3, max_samples_per_user=7, max_history=5)
    expected = []
    for u, t in zip(users, rows):
        for j in range(len(t) - 1, 2, -1)[:7]:
            expected.append((int(u), t[max(0, j - 5):j], t[j]))
    assert _samples_as_lists(s) == expected


def test_load_dataset_hand_example(tmp_path):
    d = load_dataset(_write_dataset(tmp_path / "data"))
    assert d.n_users == 3 and d.n_items == 6
    assert d.users.tolist() == [0, 1, 2]
    assert [x.tolist() for x in d.sequences] == list(SEQS.values())
    assert [x.tolist() for x in d.train_sequences] == [[0, 1, 2, 3], [2], [5, 4, 3]]
    assert d.test.targets.tolist() == [5, 3, 1] and d.valid.targets.tolist() == [4, 2, 2]
    assert [x.tolist() for x in d.test.histories] == [[0, 1, 2, 3, 4], [2, 2], [5, 4, 3, 2]]
    assert d.train.targets.tolist() == [3, 2, 3]
    assert [x.tolist() for x in d.sequences_before("test")] == [[0, 1, 2, 3, 4], [2, 2], [5, 4, 3, 2]]
    assert d.catalog.titles.tolist() == TITLES and d.catalog.categories[3] == "odd"
    u, i = training_pairs(d)
    assert list(zip(u.tolist(), i.tolist())) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (2, 5), (2, 4), (2, 3)]
    sub = d.valid.sample(2, seed=1)
    assert len(sub) == 2 and np.all(np.diff(sub.users) > 0)
    assert d.valid.sample(None, seed=1) is d.valid


def test_load_dataset_refuses_incomplete_or_broken(tmp_path):
    with pytest.raises(ArtifactError, match="manifest"):
        load_dataset(tmp_path)  # no manifest at all
    with pytest.raises(ArtifactError, match="not 'complete'"):
        load_dataset(_write_dataset(tmp_path / "running", complete=False))
    broken = _write_dataset(tmp_path / "broken")
    import shutil

    shutil.rmtree(broken / "valid.parquet")
    with pytest.raises(ArtifactError, match="valid.parquet"):
        load_dataset(broken)
    # an item id outside the catalog
    with pytest.raises(ArtifactError, match="outside the catalog"):
        load_dataset(_write_dataset(tmp_path / "small_catalog", item_rows=[0, 1, 2, 3, 4]))


def test_catalog_with_gaps_keeps_lookup_by_index(tmp_path):
    d = load_dataset(_write_dataset(tmp_path / "gaps", seqs={0: [0, 5, 0], 1: [5, 0, 5, 0]}, item_rows=[0, 5]))
    assert d.n_items == 6
    assert d.catalog.titles[5] == "five" and d.catalog.titles[0] == "zero"
    assert d.catalog.titles[3] == "item 3"  # missing index: placeholder text, never a neighbour's title
    assert ItemCatalog.synthetic(3).titles.tolist() == ["item 0", "item 1", "item 2"]


def test_real_preprocess_output_invariants(ray_session, synth_small, tmp_path):
    """On the preprocess stage's own output: samples never see valid/test targets."""
    from deftrec.config.data import PreprocessConfig
    from deftrec.data.preprocess import run_preprocess

    out = tmp_path / "pp"
    run_preprocess(PreprocessConfig(input=[str(synth_small / "interactions.csv")], items=str(synth_small / "items.csv"),
                                    format="csv", output=str(out)), log=lambda s: None)
    d = load_dataset(out)
    seqs = [x.tolist() for x in d.sequences]
    s = build_training_samples(d.train_sequences, d.users, 3, 20, 20)
    # the newest sample of each user is exactly the train split row
    first = np.flatnonzero(np.r_[True, s.users[1:] != s.users[:-1]])
    rows = np.searchsorted(d.users, s.users[first])
    assert np.array_equal(s.targets[first], d.train.targets[rows])
    assert all(np.array_equal(s.histories[i], d.train.histories[r]) for i, r in zip(first, rows))
    # every sample is the r-th newest prefix of s[:-2] (brute force, user by user)
    pos = {int(u): k for k, u in enumerate(d.users)}
    r_of_user: dict[int, int] = {}
    for u, h, t in _samples_as_lists(s):
        train_part = seqs[pos[u]][:-2]
        r = r_of_user.get(u, 0)
        r_of_user[u] = r + 1
        j = len(train_part) - 1 - r
        assert j >= 3 and train_part[j] == t and h == train_part[max(0, j - 20):j]
    counts = np.bincount(np.searchsorted(d.users, s.users), minlength=len(d.users))
    assert np.array_equal(counts, np.clip(np.array([len(x) - 2 for x in seqs]) - 3, 0, 20))
    u, _ = training_pairs(d)
    assert u.size == sum(len(x) - 2 for x in seqs)
