"""FAISS retrieval over the item keys: construction, search with history exclusion, persistence.

One documented entry point builds any index from a FAISS factory string:

- ``"Flat"``: exact search (default); results equal a brute-force top-K.
- ``"HNSW32,Flat"``: graph search when RAM allows; ``efSearch`` trades recall for speed.
- ``"IVF{K},PQ{M}"``: large catalogs; trained on a sample (K about 4-16 x sqrt(N)); ``nprobe``.

Scores follow DeftRec's retrieval rule: ``metric="l2"`` ranks by -||q - e_i||^2 (FAISS returns
squared distances, we negate them), ``metric="ip"`` by the inner product. FAISS ids are the item
indices of ``items.parquet``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from deftrec.config.jobs import IndexConfig
from deftrec.core.config import ConfigError

INDEX_FILE = "items.faiss"


def _faiss():
    import faiss

    return faiss


def _faiss_metric(metric: str):
    faiss = _faiss()
    if metric not in ("l2", "ip"):
        raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def build_index(keys: np.ndarray, cfg: IndexConfig, metric: str = "l2", ids: Optional[np.ndarray] = None):
    """Build and fill a FAISS index over ``keys`` [N, d] (float32) ranking by ``metric`` (the model's
    ``eval.score``). Raises ConfigError on a bad factory."""
    faiss = _faiss()
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if keys.ndim != 2 or len(keys) == 0:
        raise ValueError(f"keys must be a non-empty [N, d] matrix, got shape {keys.shape}")
    n, d = keys.shape
    try:
        base = faiss.index_factory(d, cfg.factory, _faiss_metric(metric))
    except RuntimeError as e:
        raise ConfigError(f"invalid FAISS factory string {cfg.factory!r} for dimension {d}: {e}") from None
    if not base.is_trained:
        rng = np.random.default_rng(cfg.seed)
        sample = keys if n <= cfg.train_sample else keys[rng.choice(n, cfg.train_sample, replace=False)]
        try:
            base.train(sample)
        except RuntimeError as e:
            raise ConfigError(f"cannot train {cfg.factory!r} on {len(sample)} vectors: {e}") from None
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(keys, np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64))
    apply_search_params(index, cfg)
    return index


def apply_search_params(index, cfg: IndexConfig) -> dict:
    """Set efSearch / nprobe where the index has them; return what was set (for the manifest)."""
    faiss = _faiss()
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    params = {}
    if hasattr(base, "hnsw"):
        base.hnsw.efSearch = cfg.ef_search
        params["efSearch"] = cfg.ef_search
    ivf = faiss.try_extract_index_ivf(base)
    if ivf is not None:
        ivf.nprobe = cfg.nprobe
        params["nprobe"] = cfg.nprobe
    return params


def search(index, queries: np.ndarray, k: int, metric: str = "l2",
           exclude: Optional[Sequence[Sequence[int]]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` item ids and scores per query, optionally excluding each query's own items.

    Excluded items are filtered from a deeper search (k + longest exclusion list), so the result
    equals ranking the remaining catalog. Rows with fewer than ``k`` eligible items pad with id -1
    and score -inf.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n_total = index.ntotal
    extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    depth = min(n_total, k + extra)
    dist, ids = index.search(q, depth)
    scores = -dist if metric == "l2" else dist
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    if exclude is not None and extra:
        # (row, item) keys of every excluded pair, matched against the results in one vectorised
        # isin: memory O(results + exclusions), whatever the longest history
        lengths = np.fromiter((len(e) for e in exclude), dtype=np.int64, count=len(q))
        rows = np.repeat(np.arange(len(q), dtype=np.int64), lengths)
        cols = np.concatenate([np.asarray(e, dtype=np.int64).reshape(-1) for e in exclude]) if lengths.sum() else \
            np.zeros(0, np.int64)
        stride = np.int64(n_total + 1)
        found = np.arange(len(q), dtype=np.int64)[:, None] * stride + np.where(ids < 0, n_total, ids)
        banned = np.isin(found, rows * stride + cols) | (ids < 0)
        order = np.argsort(banned, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(ids, order, 1)
        scores = np.take_along_axis(scores, order, 1)
        kept = ~np.take_along_axis(banned, order, 1)
        ids = np.where(kept, ids, -1)
        scores = np.where(kept, scores, -np.inf)
    else:
        ids, scores = ids[:, :k], scores[:, :k]
    if ids.shape[1] < k:  # catalog smaller than k
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids, scores


def exact_topk(keys: np.ndarray, queries: np.ndarray, k: int, metric: str = "l2") -> np.ndarray:
    """Brute-force top-k ids (numpy), ties to the lower index: the reference for recall."""
    keys = keys.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "l2":
        scores = -((q * q).sum(1)[:, None] - 2 * q @ keys.T + (keys * keys).sum(1)[None, :])
    else:
        scores = q @ keys.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall_at_k(index, keys: np.ndarray, queries: np.ndarray, k: int = 10, metric: str = "l2") -> float:
    """Mean |approx top-k ∩ exact top-k| / k."""
    approx, _ = search(index, queries, k, metric)
    exact = exact_topk(keys, queries, k, metric)
    hits = [len(set(a[a >= 0]) & set(e)) for a, e in zip(approx, exact)]
    return float(np.mean(hits)) / k


def benchmark_queries(keys: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Held-in queries: perturbed item keys (a realistic query distribution for generated x0)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(keys), size=min(n, len(keys)), replace=False)
    noise = rng.standard_normal((len(idx), keys.shape[1])).astype(np.float32)
    return keys[idx] + 0.1 * keys.std() * noise


def save_index(index, directory: str | Path) -> None:
    _faiss().write_index(index, str(Path(directory) / INDEX_FILE))


def load_index(directory: str | Path, cfg: Optional[IndexConfig] = None):
    index = _faiss().read_index(str(Path(directory) / INDEX_FILE))
    if cfg is not None:
        apply_search_params(index, cfg)
    return index


def describe(index, cfg: IndexConfig, keys: np.ndarray, metric: str = "l2") -> dict:
    """Manifest fields: factory, search parameters, size, dimension, recall@10 vs exact, timings."""
    queries = benchmark_queries(keys, cfg.recall_queries, cfg.seed)
    t0 = time.perf_counter()
    rec = recall_at_k(index, keys, queries, 10, metric)
    return {
        "factory": cfg.factory,
        "metric": metric,
        "search_params": apply_search_params(index, cfg),
        "items": int(index.ntotal),
        "dim": int(keys.shape[1]),
        "recall@10": rec,
        "recall_queries": int(len(queries)),
        "recall_seconds": round(time.perf_counter() - t0, 3),
    }
