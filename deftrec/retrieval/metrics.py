"""Full-catalog, leave-one-out ranking metrics (HR@K, NDCG@K, MRR).

Protocol (stated here once, used everywhere in the project):

* every user has exactly one relevant item (its target) and is ranked against the
  full catalog ``0..n_items-1`` (no sampled negatives; Krichene & Rendle, KDD 2020);
* ties are broken deterministically: higher score first, equal scores ordered by lower
  item index (a stable sort of ``-score``). Metrics computed from a full score matrix
  therefore equal metrics recomputed from the top-K lists it produces;
* a score of ``-inf`` means "not rankable": such an item never appears in a top-K list
  (the slot is padded with item ``-1``) and a target scored ``-inf`` gets the sentinel
  rank ``n_items``, i.e. it is never a hit;
* ``exclude_history=True`` (the standard protocol) gives every item of the user's history
  the score ``-inf``, so a target that repeats a history item is a miss;
  ``exclude_history=False`` (the DeftRec authors' default) masks nothing.

Ranks are 0-based throughout. All functions take numpy arrays (torch tensors are
converted) and return numpy arrays or plain Python floats.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "PROTOCOLS",
    "mask_history",
    "target_ranks",
    "topk",
    "hit_rate",
    "ndcg",
    "mrr",
    "evaluate_scores",
    "evaluate_topk",
    "evaluate_both_protocols",
    "evaluate_in_chunks",
]

#: Names of the two reporting protocols, in the order they are reported.
PROTOCOLS: tuple[str, str] = ("history_excluded", "history_kept")

Histories = Sequence[Any]  # one 1-D int array (or list / tensor) per user, may be empty


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_scores(scores: Any) -> np.ndarray:
    s = _to_numpy(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [n_users, n_items], got shape {s.shape}")
    if s.shape[1] == 0:
        raise ValueError("scores must have at least one item column")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        # NaN breaks every comparison the tie rule relies on; fail loudly instead.
        raise ValueError("scores contain NaN")
    return s


def _check_targets(targets: Any, n_users: int, n_items: int | None) -> np.ndarray:
    t = _to_numpy(targets).astype(np.int64, copy=False).reshape(-1)
    if t.shape[0] != n_users:
        raise ValueError(f"got {t.shape[0]} targets for {n_users} users")
    if n_items is not None and t.size and (t.min() < 0 or t.max() >= n_items):
        raise ValueError(f"targets must lie in [0, {n_items}), got range [{t.min()}, {t.max()}]")
    return t


def _check_ks(ks: Sequence[int] | int) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one cutoff")
    for k in ks:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"every cutoff K must be a positive int, got {k!r}")
    return tuple(sorted({int(k) for k in ks}))


def _flatten_histories(histories: Histories, n_items: int, what: str = "history") -> tuple[np.ndarray, np.ndarray]:
    """Flatten ragged histories into (row index, item index) pairs, validated."""
    arrays = [_to_numpy(h).astype(np.int64, copy=False).reshape(-1) for h in histories]
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    if lengths.sum() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    items = np.concatenate(arrays)
    if items.min() < 0 or items.max() >= n_items:
        raise ValueError(
            f"{what} items must lie in [0, {n_items}), got range [{items.min()}, {items.max()}]"
        )
    rows = np.repeat(np.arange(len(arrays), dtype=np.int64), lengths)
    return rows, items


# --------------------------------------------------------------------------- ranking


def mask_history(scores: Any, histories: Histories) -> np.ndarray:
    """Return a copy of ``scores`` [U, N] with ``-inf`` at every history item of each user.

    Repeated history items are simply masked once; empty histories mask nothing.
    Vectorised: one fancy-indexed assignment over the flattened (user, item) pairs.
    """
    s = _check_scores(scores).copy()
    if len(histories) != s.shape[0]:
        raise ValueError(f"got {len(histories)} histories for {s.shape[0]} score rows")
    rows, items = _flatten_histories(histories, s.shape[1])
    s[rows, items] = -np.inf
    return s


def target_ranks(scores: Any, targets: Any) -> np.ndarray:
    """0-based rank of each user's target under the tie rule.

    ``rank_u = #{i : s_ui > s_ut} + #{i : s_ui = s_ut, i < t}`` where ``t`` is the target.
    A target scored ``-inf`` is unrankable and gets the sentinel rank ``N`` (never a hit).
    Returns int64 [U].
    """
    s = _check_scores(scores)
    n_users, n_items = s.shape
    t = _check_targets(targets, n_users, n_items)
    ts = s[np.arange(n_users), t][:, None]
    higher = (s > ts).sum(axis=1)
    # Equal scores at a lower item index also come first (stable sort of -score).
    tied_before = ((s == ts) & (np.arange(n_items)[None, :] < t[:, None])).sum(axis=1)
    ranks = (higher + tied_before).astype(np.int64)
    ranks[np.isneginf(ts[:, 0])] = n_items
    return ranks


def topk(scores: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items per user under the tie rule, best first.

    Returns ``(items [U, k] int64, scores [U, k])``. Slots whose score is ``-inf`` (masked
    or unrankable items, e.g. when ``k`` exceeds the number of unmasked items) hold item
    ``-1`` so that a masked target can never be "found" in the list.

    O(N) per row: ``np.partition`` finds the k-th largest value ``v``; all items above
    ``v`` are kept, and the remaining slots go to the lowest-index items equal to ``v``.
    Only the k survivors are then sorted (stable, so equal scores keep index order).
    """
    s = _check_scores(scores)
    n_users, n_items = s.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_items:
        raise ValueError(f"k must be an int in [1, {n_items}], got {k!r}")
    k = int(k)
    kth = np.partition(s, n_items - k, axis=1)[:, n_items - k][:, None]
    above = s > kth
    equal = s == kth
    need = k - above.sum(axis=1, keepdims=True)  # >= 1 by definition of the k-th value
    chosen = above | (equal & (np.cumsum(equal, axis=1) <= need))
    # Exactly k items per row are chosen; nonzero returns them row-major, ascending index.
    cols = np.nonzero(chosen)[1].reshape(n_users, k)
    vals = np.take_along_axis(s, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    items = np.take_along_axis(cols, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    items[np.isneginf(vals)] = -1
    return items, vals


# --------------------------------------------------------------------------- metrics


def hit_rate(ranks: Any, k: int) -> float:
    """Hit ratio at K: ``HR@K = (1/|U|) * sum_u 1[rank_u < K]`` (0-based ranks).

    Like :func:`ndcg` and :func:`mrr`, it trusts ``K <= n_items``: a larger K would count
    the unrankable sentinel rank ``n_items`` as a hit (the ``evaluate_*`` functions clip K).
    """
    r = _to_numpy(ranks)
    return float((r < k).mean()) if r.size else float("nan")


def ndcg(ranks: Any, k: int) -> float:
    """NDCG at K with a single relevant item per user.

    ``NDCG@K = (1/|U|) * sum_u 1[rank_u < K] / log2(rank_u + 2)``; the ideal DCG is 1
    because the one relevant item would sit at rank 0.
    """
    r = _to_numpy(ranks).astype(np.float64)
    if not r.size:
        return float("nan")
    return float(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0).mean())


def mrr(ranks: Any, k: int | None = None) -> float:
    """Mean reciprocal rank: ``MRR@K = (1/|U|) * sum_u 1[rank_u < K] / (rank_u + 1)``.

    ``k=None`` means no cutoff. Pass ``k=n_items`` to make the unrankable sentinel rank
    ``n_items`` contribute 0 (this is what :func:`evaluate_scores` reports as ``"mrr"``).
    """
    r = _to_numpy(ranks).astype(np.float64)
    if not r.size:
        return float("nan")
    rr = 1.0 / (r + 1.0)
    if k is not None:
        rr = np.where(r < k, rr, 0.0)
    return float(rr.mean())


def _metric_sums(ranks: np.ndarray, ks: tuple[int, ...], n_items: int | None,
                 squares: bool = False) -> dict[str, float]:
    """Per-metric sums over users (not means), so that chunks can be added up exactly. With
    ``squares``, also the sums of squares of HR@K and NDCG@K (``*_sq``), for standard errors."""
    n = ranks.size
    out: dict[str, float] = {}
    for k in ks:
        # Rankable items have rank < n_items, so clipping K keeps the sentinel rank
        # n_items a miss even when K exceeds the catalog.
        kk = k if n_items is None else min(k, n_items)
        out[f"hr@{k}"] = hit_rate(ranks, kk) * n
        out[f"ndcg@{k}"] = ndcg(ranks, kk) * n
        out[f"mrr@{k}"] = mrr(ranks, kk) * n
        if squares:
            gain = np.where(ranks < kk, 1.0 / np.log2(ranks.astype(np.float64) + 2.0), 0.0)
            out[f"hr@{k}_sq"] = float((ranks < kk).sum())
            out[f"ndcg@{k}_sq"] = float((gain * gain).sum())
    if n_items is not None:
        out["mrr"] = mrr(ranks, n_items) * n
    return out


def _means(sums: Mapping[str, float], n_users: int) -> dict[str, float]:
    if n_users == 0:
        raise ValueError("cannot evaluate zero users")
    return {name: value / n_users for name, value in sums.items()}


def standard_errors(means: Mapping[str, float], n_users: int) -> dict[str, float]:
    """Turn the mean squares ``<metric>_sq`` of :func:`evaluate_in_chunks` (``with_se=True``) into
    standard errors of the means, ``<metric>_se = sqrt(sample variance / n)``; other keys unchanged.

    Mean squares average linearly, so results of several ranks can be combined (weighted by their
    user counts) before this step."""
    out = {k: v for k, v in means.items() if not k.endswith("_sq")}
    for key, sq in means.items():
        if key.endswith("_sq"):
            base = key[:-3]
            mean = means[base]
            var = max(sq - mean * mean, 0.0) * n_users / max(n_users - 1, 1)
            out[f"{base}_se"] = float(np.sqrt(var / n_users))
    return out


def evaluate_scores(
    scores: Any,
    targets: Any,
    histories: Histories | None,
    ks: Sequence[int] = (5, 10, 20),
    exclude_history: bool = True,
) -> dict[str, float]:
    """HR@K, NDCG@K, MRR@K for every K in ``ks`` plus full-ranking ``"mrr"``.

    ``scores`` is [U, N] (higher = better); ``targets`` [U]; ``histories`` one item
    sequence per user (only needed when ``exclude_history`` is True).
    """
    ks = _check_ks(ks)
    s = _check_scores(scores)
    if exclude_history:
        if histories is None:
            raise ValueError("histories are required when exclude_history=True")
        s = mask_history(s, histories)
    ranks = target_ranks(s, targets)
    return _means(_metric_sums(ranks, ks, s.shape[1]), ranks.size)


def evaluate_topk(topk_items: Any, targets: Any, ks: Sequence[int] = (5, 10, 20),
                  with_se: bool = False) -> dict[str, float]:
    """Recompute HR@K, NDCG@K, MRR@K from saved top-K lists [U, K_list] (``with_se``: and the standard
    errors of HR@K and NDCG@K, ``*_se``).

    The target's position in its list is its rank; a target absent from the list is a miss.
    Every requested K must be <= K_list (a shorter list cannot tell a hit at K from a miss).
    Full-ranking ``"mrr"`` is not reported: it needs the whole ranking.
    """
    ks = _check_ks(ks)
    items = _to_numpy(topk_items).astype(np.int64, copy=False)
    if items.ndim != 2:
        raise ValueError(f"topk_items must be 2-D [n_users, K], got shape {items.shape}")
    n_users, k_list = items.shape
    if ks[-1] > k_list:
        raise ValueError(f"cutoff K={ks[-1]} exceeds the length of the saved lists ({k_list})")
    t = _check_targets(targets, n_users, None)
    match = items == t[:, None]
    # The sentinel k_list is >= every allowed K, so absent targets are never hits.
    ranks = np.where(match.any(axis=1), match.argmax(axis=1), k_list).astype(np.int64)
    means = _means(_metric_sums(ranks, ks, None, squares=with_se), n_users)
    return standard_errors(means, n_users) if with_se else means


def evaluate_both_protocols(
    scores: Any,
    targets: Any,
    histories: Histories,
    ks: Sequence[int] = (5, 10, 20),
) -> dict[str, dict[str, float]]:
    """Metrics under both protocols: ``{"history_excluded": {...}, "history_kept": {...}}``."""
    return {
        "history_excluded": evaluate_scores(scores, targets, histories, ks, exclude_history=True),
        "history_kept": evaluate_scores(scores, targets, histories, ks, exclude_history=False),
    }


def evaluate_in_chunks(
    score_fn: Callable[[np.ndarray], Any],
    user_idx: Any,
    targets: Any,
    histories: Histories,
    chunk_size: int,
    ks: Sequence[int] = (5, 10, 20),
    with_se: bool = False,
) -> dict[str, dict[str, float]]:
    """Both protocols, scoring ``chunk_size`` users at a time (``with_se``: also the mean squares
    ``hr@K_sq``/``ndcg@K_sq``, see :func:`standard_errors`).

    ``user_idx`` [U] holds whatever identifies a user to ``score_fn`` (ids or positions);
    ``targets[i]`` and ``histories[i]`` belong to ``user_idx[i]``. ``score_fn`` receives a
    slice of ``user_idx`` and returns scores [b, N]. Only one [b, N] block (plus its masked
    copy) is alive at a time; per-metric sums are accumulated and divided once at the end,
    so the result equals :func:`evaluate_both_protocols` on the full matrix.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    ks = _check_ks(ks)
    users = _to_numpy(user_idx).reshape(-1)
    n_users = users.shape[0]
    t = _check_targets(targets, n_users, None)
    if len(histories) != n_users:
        raise ValueError(f"got {len(histories)} histories for {n_users} users")
    if n_users == 0:
        raise ValueError("cannot evaluate zero users")

    sums: dict[str, dict[str, float]] = {p: {} for p in PROTOCOLS}
    n_items: int | None = None
    for start in range(0, n_users, chunk_size):
        stop = min(start + chunk_size, n_users)
        block = _check_scores(score_fn(users[start:stop]))
        if block.shape[0] != stop - start:
            raise ValueError(f"score_fn returned {block.shape[0]} rows for {stop - start} users")
        if n_items is None:
            n_items = block.shape[1]
        elif block.shape[1] != n_items:
            raise ValueError(f"score_fn changed the catalog size from {n_items} to {block.shape[1]}")
        t_chunk = t[start:stop]
        for protocol, s in (
            ("history_kept", block),
            ("history_excluded", mask_history(block, histories[start:stop])),
        ):
            chunk_sums = _metric_sums(target_ranks(s, t_chunk), ks, n_items, squares=with_se)
            acc = sums[protocol]
            for name, value in chunk_sums.items():
                acc[name] = acc.get(name, 0.0) + value
    return {p: _means(sums[p], n_users) for p in PROTOCOLS}
