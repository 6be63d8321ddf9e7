"""FAISS retrieval: exactness of Flat, approximate indexes' recall, history exclusion, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from deftrec.config.jobs import IndexConfig
from deftrec.retrieval.index import (
    build_index,
    describe,
    exact_topk,
    load_index,
    recall_at_k,
    save_index,
    search,
)


@pytest.fixture(scope="module")
def keys():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2000, 16)).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_equals_brute_force(keys, metric):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((50, 16)).astype(np.float32)
    idx = build_index(keys, IndexConfig(), metric)
    ids, scores = search(idx, q, 10, metric)
    assert (ids == exact_topk(keys, q, 10, metric)).all()
    # scores are the DeftRec scores: -||q - e||^2 or <q, e>
    e = keys[ids[0]].astype(np.float64)
    ref = -((q[0] - e) ** 2).sum(1) if metric == "l2" else e @ q[0]
    np.testing.assert_allclose(scores[0], ref, rtol=1e-4, atol=1e-3)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_history_exclusion_equals_ranking_the_rest(keys):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((20, 16)).astype(np.float32)
    idx = build_index(keys, IndexConfig())
    exact = exact_topk(keys, q, 30)
    # exclude each query's 3 best items plus an unrelated one, with a repeat
    hist = [[int(e[0]), int(e[2]), int(e[0]), 1999 - r, int(e[5])] for r, e in enumerate(exact)]
    ids, scores = search(idx, q, 10, "l2", exclude=hist)
    for r in range(len(q)):
        banned = set(hist[r])
        assert list(ids[r]) == [i for i in exact[r] if i not in banned][:10]
    assert np.isfinite(scores).all()


def test_small_catalog_pads(keys):
    idx = build_index(keys[:5], IndexConfig())
    ids, scores = search(idx, keys[:2], 8, "l2", exclude=[[0], []])
    assert (ids[0, 4:] == -1).all() and np.isinf(scores[0, 4:]).all() and 0 not in ids[0]
    assert sorted(ids[1, :5]) == [0, 1, 2, 3, 4] and (ids[1, 5:] == -1).all()


def test_approximate_indexes_record_recall(keys):
    hnsw = build_index(keys, IndexConfig(factory="HNSW32,Flat", ef_search=64))
    m = describe(hnsw, IndexConfig(factory="HNSW32,Flat", ef_search=64, recall_queries=200), keys)
    assert m["search_params"] == {"efSearch": 64} and m["items"] == 2000 and m["dim"] == 16
    assert m["recall@10"] > 0.9
    cfg = IndexConfig(factory="IVF32,PQ4", nprobe=4, train_sample=1500)
    ivf = build_index(keys, cfg)
    r_low = recall_at_k(ivf, keys, keys[:100], 10)
    cfg_hi = IndexConfig(factory="IVF32,PQ4", nprobe=32)
    ivf_hi = load_index_roundtrip(ivf, cfg_hi)
    assert recall_at_k(ivf_hi, keys, keys[:100], 10) >= r_low
    assert describe(ivf_hi, cfg_hi, keys)["search_params"] == {"nprobe": 32}


def load_index_roundtrip(index, cfg, tmp=None):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_index(index, d)
        return load_index(d, cfg)


def test_save_load_roundtrip(keys, tmp_path):
    idx = build_index(keys, IndexConfig())
    save_index(idx, tmp_path)
    again = load_index(tmp_path)
    a, _ = search(idx, keys[:5], 10)
    b, _ = search(again, keys[:5], 10)
    assert (a == b).all() and (a[:, 0] == np.arange(5)).all()


def test_bad_config_and_factory():
    with pytest.raises(ValueError, match="metric"):
        build_index(np.zeros((10, 4), np.float32), IndexConfig(), "cosine")
    with pytest.raises(ValueError, match="invalid FAISS factory"):
        build_index(np.zeros((10, 4), np.float32), IndexConfig(factory="NotAnIndex"))
