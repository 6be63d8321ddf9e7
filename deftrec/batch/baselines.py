"""Baselines reported beside DeftRec: popularity, last-item Markov chain, EASE (here) and SASRec
(:mod:`deftrec.batch.sasrec`).

All share one small protocol (:class:`Baseline`): ``fit(train_sequences, n_items)`` then
``score(histories) -> float32 [U, n_items]`` (higher = better). Chunked evaluation is left
to :func:`deftrec.retrieval.metrics.evaluate_in_chunks` through a ``score_fn`` closure.

Data conventions: items are ints ``0..n_items-1``; ``train_sequences`` holds each user's
chronological training sequence (never a target of the split being evaluated: to evaluate
on test, fit on everything before the test target, i.e. including the validation target,
which is how the reference figures in ``shared/data/README.md`` were produced).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from deftrec.core.config import ConfigError
from deftrec.retrieval.metrics import _flatten_histories, evaluate_in_chunks, standard_errors

__all__ = [
    "Baseline",
    "Popularity",
    "MarkovLastItem",
    "EASE",
    "interaction_gram",
    "BASELINES",
    "run_baselines",
    "run_baselines_isolated",
]


@runtime_checkable
class Baseline(Protocol):
    """What every baseline offers."""

    def fit(self, train_sequences: Sequence[Any], n_items: int) -> "Baseline": ...

    def score(self, histories: Sequence[Any]) -> np.ndarray: ...


# --------------------------------------------------------------------------- helpers


def _check_n_items(n_items: int) -> int:
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 1:
        raise ValueError(f"n_items must be a positive int, got {n_items!r}")
    return int(n_items)


def _item_counts(
    sequences: Sequence[Any], n_items: int, count: Literal["users", "interactions"]
) -> np.ndarray:
    """Per-item popularity: number of sequences containing it, or number of occurrences."""
    rows, items = _flatten_histories(sequences, n_items, "training")
    if count == "users":
        # Count each (user, item) pair once: repeated purchases should not outweigh reach.
        items = np.unique(rows * n_items + items) % n_items
    return np.bincount(items, minlength=n_items).astype(np.float64)


class _Fitted:
    """Mixin: remembers the catalog size and refuses to score before ``fit``."""

    n_items_: int | None = None

    def _require_fitted(self) -> int:
        if self.n_items_ is None:
            raise RuntimeError(f"{type(self).__name__} must be fit before scoring")
        return self.n_items_


_COUNT_MODES = ("users", "interactions")


# --------------------------------------------------------------------------- popularity


@dataclass(eq=False)  # identity semantics: fitted arrays make == meaningless
class Popularity(_Fitted):
    """Score of item i = its popularity in the training sequences, the same for every user.

    ``count="users"`` (default) counts the sequences containing i; ``"interactions"``
    counts every occurrence. The reference figures use ``"users"``: on ``software``,
    where some users buy the same item many times, ``"interactions"`` ranks those
    repeat-heavy items first and scores far lower.
    """

    count: Literal["users", "interactions"] = "users"
    counts_: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.count not in _COUNT_MODES:
            raise ValueError(f"count must be one of {_COUNT_MODES}, got {self.count!r}")

    def fit(self, train_sequences: Sequence[Any], n_items: int) -> "Popularity":
        self.n_items_ = _check_n_items(n_items)
        self.counts_ = _item_counts(train_sequences, self.n_items_, self.count)
        return self

    def score(self, histories: Sequence[Any]) -> np.ndarray:
        n_items = self._require_fitted()
        _flatten_histories(histories, n_items, "history")  # validate ids like the other baselines
        row = self.counts_.astype(np.float32)
        return np.broadcast_to(row, (len(histories), n_items)).copy()


# --------------------------------------------------------------------------- Markov


@dataclass(eq=False)
class MarkovLastItem(_Fitted):
    """First-order Markov chain on the last history item.

    ``score_u(j) = C[last_u, j] + tie_break * pop(j) / max(pop)``, where ``C[a, j]`` counts
    consecutive pairs ``a -> j`` (self-transitions included: repeat purchases are real
    signal) and ``pop`` is :class:`Popularity` with ``count=popularity_count``. Because
    ``C`` is integer and ``0 <= tie_break < 1``, popularity only orders items with equal
    counts, e.g. every item for users whose last item was never seen followed by anything.
    An empty history scores by popularity alone.

    Why 0.5 rather than a "tiny" 1e-6: scores are float32, whose spacing at a count of
    100 is ~7.6e-6, so a 1e-6 term would be rounded away exactly where it is needed.

    Transitions are stored sparsely (CSR by source item), so memory is O(#distinct pairs).
    """

    tie_break: float = 0.5
    popularity_count: Literal["users", "interactions"] = "users"
    indptr_: np.ndarray | None = field(default=None, init=False, repr=False)
    dst_: np.ndarray | None = field(default=None, init=False, repr=False)
    cnt_: np.ndarray | None = field(default=None, init=False, repr=False)
    prior_: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.tie_break < 1.0:
            raise ValueError(
                f"tie_break must be in [0, 1) so it never overturns a transition count, got {self.tie_break}"
            )
        if self.popularity_count not in _COUNT_MODES:
            raise ValueError(
                f"popularity_count must be one of {_COUNT_MODES}, got {self.popularity_count!r}"
            )

    def fit(self, train_sequences: Sequence[Any], n_items: int) -> "MarkovLastItem":
        n = _check_n_items(n_items)
        rows, items = _flatten_histories(train_sequences, n, "training")
        # Consecutive positions of the flat array form a pair only inside one sequence.
        same = rows[1:] == rows[:-1]
        codes = items[:-1][same] * n + items[1:][same]
        pairs, counts = np.unique(codes, return_counts=True)  # sorted by (src, dst)
        src = pairs // n
        self.indptr_ = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=n))]).astype(np.int64)
        self.dst_ = (pairs % n).astype(np.int64)
        self.cnt_ = counts.astype(np.float64)
        pop = _item_counts(train_sequences, n, self.popularity_count)
        self.prior_ = self.tie_break * pop / max(pop.max(), 1.0)
        self.n_items_ = n
        return self

    def score(self, histories: Sequence[Any]) -> np.ndarray:
        n = self._require_fitted()
        n_users = len(histories)
        _flatten_histories(histories, n, "history")
        scores = np.broadcast_to(self.prior_, (n_users, n)).copy()
        has = np.fromiter((len(h) > 0 for h in histories), dtype=bool, count=n_users)
        users = np.flatnonzero(has)
        if users.size:
            last = np.fromiter(
                (int(np.asarray(histories[u]).reshape(-1)[-1]) for u in users), dtype=np.int64, count=users.size
            )
            start, stop = self.indptr_[last], self.indptr_[last + 1]
            lengths = stop - start
            # Gather every outgoing row's entries at once: position = row start + offset.
            offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            pos = np.repeat(start, lengths) + offsets
            scores[np.repeat(users, lengths), self.dst_[pos]] += self.cnt_[pos]
        return scores.astype(np.float32)


# --------------------------------------------------------------------------- EASE


def _available_memory_bytes() -> int:
    """Memory this machine can still give a process (psutil: a Ray dependency)."""
    import psutil

    return int(psutil.virtual_memory().available)


def interaction_gram(sequences: Sequence[Any], n_items: int):
    """X^T X of the binary user x item matrix X of ``sequences`` (a repeated item counts once), as a
    dense float64 torch tensor [n_items, n_items], by a sparse product: X itself is never dense."""
    import torch

    rows, items = _flatten_histories(sequences, n_items, "training")
    pairs = np.unique(rows * n_items + items)
    index = torch.from_numpy(np.stack([pairs // n_items, pairs % n_items]))
    x = torch.sparse_coo_tensor(index, torch.ones(pairs.size, dtype=torch.float64), (len(sequences), n_items),
                                is_coalesced=True, check_invariants=True)
    return torch.sparse.mm(x.t().coalesce(), x).to_dense()


@dataclass(eq=False)
class EASE(_Fitted):
    """EASE^R (Steck, WWW 2019): item-item linear autoencoder with a zero diagonal.

    With X the binary user-item matrix of the training sequences,
    ``P = (X^T X + lam * I)^-1`` and ``B = I - P diag(1/diag(P))``, i.e.
    ``B_ij = -P_ij / P_jj`` off the diagonal and ``B_jj = 0``; this is the minimiser of
    ``||X - XB||_F^2 + lam ||B||_F^2`` subject to ``diag(B) = 0``. A user scores
    ``x_u B`` with ``x_u`` the binary vector of its history (an empty history scores 0
    everywhere, so ties are broken by item index).

    X^T X is a sparse product (X is never dense: its cost follows the interactions, not users x
    items); the inverse is dense, O(N^3) time and two N x N float64 matrices at its peak
    (:meth:`required_bytes`), which :meth:`check_memory` compares with what the machine has before
    any work.
    """

    lam: float = 250.0
    B_: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ValueError(f"lam must be > 0 (it makes X^T X + lam I invertible), got {self.lam}")

    @staticmethod
    def required_bytes(n_items: int) -> int:
        """Peak memory of :meth:`fit`: the Gram matrix and its inverse, N x N float64 each."""
        return 2 * 8 * int(n_items) ** 2

    @classmethod
    def check_memory(cls, n_items: int, available_bytes: int | None = None) -> None:
        """Refuse a catalog whose dense N x N matrices do not fit in ``available_bytes`` (default: the
        memory available on this machine now), naming the numbers and the setting that skips EASE."""
        need = cls.required_bytes(n_items)
        have = _available_memory_bytes() if available_bytes is None else int(available_bytes)
        if need > have:
            raise ConfigError(
                f"EASE needs {need / 2**30:.1f} GiB for two dense {n_items:,} x {n_items:,} float64 matrices "
                f"(n_items={n_items:,}) but {have / 2**30:.1f} GiB is available: leave 'ease' out of "
                f"evaluate.baselines to skip it, or evaluate on a machine with more memory"
            )

    def fit(self, train_sequences: Sequence[Any], n_items: int) -> "EASE":
        import torch

        n = _check_n_items(n_items)
        self.check_memory(n)
        gram = interaction_gram(train_sequences, n)
        gram.diagonal().add_(self.lam)
        # X^T X + lam I is symmetric positive definite: its Cholesky factor inverts it with one
        # N x N matrix alive beside it (a general inverse holds three)
        factor = torch.linalg.cholesky(gram)
        del gram
        p = torch.cholesky_inverse(factor).numpy()
        del factor
        p /= -np.diag(p)[None, :]  # in place: B_ij = -P_ij / P_jj
        p[np.diag_indices(n)] = 0.0
        self.B_ = p.astype(np.float32)
        self.n_items_ = n
        return self

    def score(self, histories: Sequence[Any]) -> np.ndarray:
        n = self._require_fitted()
        rows, items = _flatten_histories(histories, n, "history")
        x = np.zeros((len(histories), n), dtype=np.float32)
        x[rows, items] = 1.0  # binary: repeated history items count once
        return x @ self.B_


# --------------------------------------------------------------------------- runner

BASELINES: dict[str, type] = {"popularity": Popularity, "markov": MarkovLastItem, "ease": EASE}



def run_baselines(
    train_sequences: Sequence[Any],
    histories: Sequence[Any],
    targets: Any,
    n_items: int,
    ks: Sequence[int] = (5, 10, 20),
    *,
    chunk_size: int = 1024,
    models: Mapping[str, Baseline] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Fit each baseline and evaluate it under both protocols.

    ``models`` maps names to unfitted instances (default: every entry of
    :data:`BASELINES` with its default config). Returns
    ``{name: {"history_excluded": {...}, "history_kept": {...}}}``.
    """
    if len(histories) != len(targets):
        raise ValueError(f"got {len(histories)} histories for {len(targets)} targets")
    if models is None:
        models = {name: cls() for name, cls in BASELINES.items()}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, model in models.items():
        model.fit(train_sequences, n_items)

        def score_fn(positions: np.ndarray, model: Baseline = model) -> np.ndarray:
            return model.score([histories[i] for i in positions])

        raw = evaluate_in_chunks(score_fn, np.arange(len(histories)), targets, histories, chunk_size, ks,
                                 with_se=True)
        results[name] = {p: standard_errors(v, len(histories)) for p, v in raw.items()}
    return results


def _fit_and_evaluate(name: str, model: Any, train_sequences: Sequence[Any], histories: Sequence[Any],
                      targets: Any, n_items: int, ks: Sequence[int]) -> dict[str, dict[str, float]]:
    if not isinstance(model, Baseline):  # a factory: build it in this process
        model = model()
    return run_baselines(train_sequences, histories, targets, n_items, ks, models={name: model})[name]


def run_baselines_isolated(
    models: Mapping[str, Any],
    train_sequences: Sequence[Any],
    histories: Sequence[Any],
    targets: Any,
    n_items: int,
    ks: Sequence[int] = (5, 10, 20),
    *,
    timeout_s: float | None = None,
    gpus: Mapping[str, float] | None = None,
    log: Any = None,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str]]:
    """:func:`run_baselines`, each baseline (an unfitted model, or a factory that builds one in its
    process) in its own Ray task (one CPU; ``gpus[name]`` GPUs), in parallel where the cluster has room: a native crash, an out-of-memory kill, an exception or
    ``timeout_s`` seconds end only that baseline.

    Returns (results of the baselines that finished, ``{name: reason}`` of those that did not).
    """
    import ray

    say = log or (lambda line: None)
    fit_ref, hist_ref = ray.put(list(train_sequences)), ray.put(list(histories))
    task = ray.remote(_fit_and_evaluate)
    refs = {name: task.options(num_cpus=1, num_gpus=(gpus or {}).get(name, 0), max_retries=0,
                               name=f"baseline:{name}").remote(name, model, fit_ref, hist_ref, targets, n_items,
                                                               tuple(ks))
            for name, model in models.items()}
    names = {ref: name for name, ref in refs.items()}
    results: dict[str, dict[str, dict[str, float]]] = {}
    not_run: dict[str, str] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs.values())
    while pending:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=wait)
        if not done:  # the time cap: cancel every baseline still running
            for ref in pending:
                ray.cancel(ref, force=True)
                not_run[names[ref]] = f"exceeded evaluate.baseline_timeout_s={timeout_s:g}"
            break
        ref = done[0]
        try:
            results[names[ref]] = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # an exception inside the baseline
            cause = e.cause if getattr(e, "cause", None) is not None else e
            not_run[names[ref]] = f"{type(cause).__name__}: {cause}"
        except ray.exceptions.RayError as e:  # its process died: a native crash, OOM kill, node loss
            not_run[names[ref]] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'process died'}"
    for name, reason in not_run.items():
        say(f"[evaluate] baseline {name} not run: {reason}")
    # report order: the order asked for
    return ({n: results[n] for n in models if n in results}, {n: not_run[n] for n in models if n in not_run})
