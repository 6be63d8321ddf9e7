"""Baselines on hand-checkable toys, then against the reference figures on `software`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deftrec.batch.baselines import (
    BASELINES,
    EASE,
    interaction_gram,
    Baseline,
    MarkovLastItem,
    Popularity,
    run_baselines,
)
from deftrec.core.config import ConfigError
from deftrec.retrieval.metrics import evaluate_both_protocols, topk

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Toy training data, 5 items. Users (sequences containing the item) per item:
#   item 0: u0, u3 -> 2;  item 1: u0, u1, u2 -> 3;  item 2: u1, u2 -> 2;  item 3: u2, u3 -> 2;  item 4: 0
# Occurrences: item 1 appears 4 times (u0 repeats it).
TRAIN = [np.array([0, 1, 1]), np.array([1, 2]), np.array([2, 3, 1]), np.array([3, 0])]


def test_popularity_counts_users_or_interactions():
    pop = Popularity().fit(TRAIN, 5)
    s = pop.score([np.array([0]), np.array([], dtype=np.int64)])
    assert s.dtype == np.float32 and s.shape == (2, 5)
    np.testing.assert_array_equal(s, [[2, 3, 2, 2, 0]] * 2)
    # Order: 1 first, then the tied 0, 2, 3 by index, then 4.
    np.testing.assert_array_equal(topk(s, 5)[0][0], [1, 0, 2, 3, 4])
    inter = Popularity(count="interactions").fit(TRAIN, 5).score([np.array([0])])
    np.testing.assert_array_equal(inter, [[2, 4, 2, 2, 0]])


def test_markov_follows_planted_transition():
    # Transitions (pairs): 0->1, 1->1 (self), 1->2, 2->3, 3->1, 3->0.
    m = MarkovLastItem().fit(TRAIN, 5)
    pop = np.array([2, 3, 2, 2, 0]) / 3 * 0.5  # default tie-break: 0.5 * users-popularity / max
    hist = [np.array([4, 0]), np.array([2, 2, 1]), np.array([0, 3]), np.array([4]), np.array([], dtype=np.int64)]
    s = m.score(hist)
    assert s.dtype == np.float32
    expected = np.tile(pop, (5, 1))
    expected[0, 1] += 1  # last 0: 0->1
    expected[1, [1, 2]] += 1  # last 1: 1->1 and 1->2
    expected[2, [1, 0]] += 1  # last 3: 3->1 and 3->0
    # user 3 (last item 4 never followed) and user 4 (empty) fall back to popularity.
    np.testing.assert_allclose(s, expected, rtol=1e-6)
    top = topk(s, 2)[0]
    np.testing.assert_array_equal(top[0], [1, 0])  # 0->1 planted, then popularity
    np.testing.assert_array_equal(top[1], [1, 2])  # count tie 1, 2 broken by popularity (3 > 2)
    np.testing.assert_array_equal(top[3], [1, 0])
    np.testing.assert_array_equal(top[4], [1, 0])


def test_markov_count_beats_popularity_even_at_large_counts():
    # 200 transitions 0->2 and one 0->3; item 1 is by far the most popular.
    train = [np.array([0, 2])] * 200 + [np.array([0, 3])] + [np.array([1])] * 500
    s = MarkovLastItem().fit(train, 4).score([np.array([0])])
    np.testing.assert_array_equal(topk(s, 4)[0], [[2, 3, 1, 0]])
    # Among items with equal (zero) count, popularity decides, and survives float32.
    s2 = MarkovLastItem().fit([np.array([2, 3])] * 300 + [np.array([1])] * 2 + [np.array([0])], 4)
    np.testing.assert_array_equal(topk(s2.score([np.array([2])]), 4)[0], [[3, 2, 1, 0]])


def _ease_by_columns(x: np.ndarray, lam: float) -> np.ndarray:
    """Independent EASE: column j is the ridge regression of x[:, j] on the other columns."""
    n = x.shape[1]
    b = np.zeros((n, n))
    for j in range(n):
        rest = np.delete(np.arange(n), j)
        xr = x[:, rest]
        b[rest, j] = np.linalg.solve(xr.T @ xr + lam * np.eye(n - 1), xr.T @ x[:, j])
    return b


def test_ease_equals_columnwise_ridge_solution():
    rng = np.random.default_rng(0)
    n_users, n_items, lam = 30, 7, 3.0
    seqs = [rng.integers(0, n_items, size=rng.integers(1, 6)) for _ in range(n_users)]
    x = np.zeros((n_users, n_items))
    for u, s in enumerate(seqs):
        x[u, s] = 1.0
    model = EASE(lam=lam).fit(seqs, n_items)
    ref = _ease_by_columns(x, lam)
    np.testing.assert_allclose(model.B_, ref, atol=1e-6)
    assert np.all(np.diag(model.B_) == 0)
    # Scores use the binary history vector: a repeated item counts once.
    hist = [np.array([1, 1, 4]), np.array([], dtype=np.int64)]
    s = model.score(hist)
    assert s.dtype == np.float32
    np.testing.assert_allclose(s[0], ref[1] + ref[4], atol=1e-6)
    np.testing.assert_array_equal(s[1], np.zeros(n_items))


def test_ease_sparse_gram_equals_the_dense_product():
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 6, size=rng.integers(0, 5)) for _ in range(23)]  # repeats and empty users
    x = np.zeros((23, 6))
    for u, s in enumerate(seqs):
        x[u, s] = 1.0
    np.testing.assert_array_equal(interaction_gram(seqs, 6).numpy(), x.T @ x)
    np.testing.assert_allclose(EASE(lam=2.0).fit(seqs, 6).B_, _ease_by_columns(x, 2.0), atol=1e-6)


def test_ease_refuses_a_catalog_whose_matrices_do_not_fit_before_any_work():
    with pytest.raises(ConfigError, match=r"EASE needs 6\.0 GiB for two dense 20,000 x 20,000 float64 matrices "
                       r"\(n_items=20,000\) but 1\.0 GiB is available: leave 'ease' out of evaluate\.baselines"):
        EASE.check_memory(20_000, available_bytes=2**30)
    EASE.check_memory(20_000, available_bytes=EASE.required_bytes(20_000))  # exactly enough: accepted


def test_configs_validate():
    with pytest.raises(ValueError, match="lam"):
        EASE(lam=0.0)
    with pytest.raises(ValueError, match="tie_break"):
        MarkovLastItem(tie_break=1.0)
    with pytest.raises(ValueError, match="count"):
        Popularity(count="clicks")
    with pytest.raises(ValueError, match="training items"):
        Popularity().fit([np.array([0, 5])], 5)
    with pytest.raises(ValueError, match="n_items"):
        Popularity().fit(TRAIN, 0)
    with pytest.raises(RuntimeError, match="fit"):
        EASE().score([np.array([0])])


def test_run_baselines_matches_direct_evaluation():
    hist = [np.array([0, 1]), np.array([2]), np.array([3, 1, 2]), np.array([], dtype=np.int64)]
    targets = np.array([1, 3, 1, 0])
    out = run_baselines(TRAIN, hist, targets, 5, ks=(1, 3), chunk_size=3)
    assert set(out) == set(BASELINES)
    for name, cls in BASELINES.items():
        model = cls().fit(TRAIN, 5)
        assert isinstance(model, Baseline)
        ref = evaluate_both_protocols(model.score(hist), targets, hist, (1, 3))
        for protocol in ref:
            metrics = {k: v for k, v in out[name][protocol].items() if not k.endswith("_se")}
            assert metrics == pytest.approx(ref[protocol], abs=1e-12)
            assert set(out[name][protocol]) - set(metrics) == {f"{m}@{k}_se" for m in ("hr", "ndcg") for k in (1, 3)}


# ---------------------------------------------------------------- real data: software


def _load_test_lines(name: str) -> list[np.ndarray]:
    """test.txt: `user item item ...`; last item = test target, the one before = validation."""
    lines = (DATA / name / "test.txt").read_text().splitlines()
    return [np.array(line.split()[1:], dtype=np.int64) for line in lines if line.strip()]


# Reference figures (HR@10, NDCG@10) from shared/data/README.md, computed there by
# independent scripts on the same splits.
SOFTWARE_REFERENCE = {
    "history_excluded": {"popularity": (0.016, 0.006), "markov": (0.127, 0.091), "ease": (0.161, 0.092)},
    "history_kept": {"popularity": (0.171, 0.073), "markov": (0.303, 0.263), "ease": (0.312, 0.145)},
}


def test_software_matches_reference_figures():
    lines = _load_test_lines("software")
    n_items = max(int(s.max()) for s in lines) + 1  # 778 items used (ids 0..777)
    histories = [s[:-1] for s in lines]
    targets = np.array([s[-1] for s in lines])
    # The reference fits on everything before the test target, validation target included
    # (the train.txt line): fitting on the line minus two items gives popularity
    # history-kept HR@10 0.019 instead of 0.171, see the check at the end.
    out = run_baselines(histories, histories, targets, n_items, ks=(10,))
    for protocol, per_model in SOFTWARE_REFERENCE.items():
        for name, (hr, nd) in per_model.items():
            got = out[name][protocol]
            assert got["hr@10"] == pytest.approx(hr, abs=0.01), (name, protocol, got)
            assert got["ndcg@10"] == pytest.approx(nd, abs=0.01), (name, protocol, got)

    # 18% of test targets repeat a history item: excluding history must cost hits.
    assert np.mean([t in set(h.tolist()) for h, t in zip(histories, targets)]) == pytest.approx(0.181, abs=0.005)
    without_val = run_baselines(
        [s[:-2] for s in lines], histories, targets, n_items, ks=(10,), models={"popularity": Popularity()}
    )
    assert without_val["popularity"]["history_kept"]["hr@10"] < 0.05


def test_isolated_baselines_end_alone_on_an_exception_or_the_time_cap(ray_session):
    """Each baseline runs in its own Ray task: one that raises or outlives the time cap is reported
    not run with the reason, the others' results are those of the in-process runner."""
    import time

    from deftrec.batch.baselines import run_baselines_isolated

    class Raises(Popularity):
        def fit(self, train_sequences, n_items):
            raise MemoryError("no room for the item-item matrix")

    class Sleeps(Popularity):
        def fit(self, train_sequences, n_items):
            time.sleep(60)

    seqs = [[0, 1, 2], [1, 2, 3], [2, 3, 4], [0, 2, 4]]
    hist, targets = [[0], [1], [2], [3]], np.array([1, 2, 3, 4])
    results, not_run = run_baselines_isolated({"popularity": Popularity(), "raises": Raises()}, seqs, hist, targets,
                                              5, (5,))
    assert results["popularity"] == run_baselines(seqs, hist, targets, 5, (5,), models={"p": Popularity()})["p"]
    assert not_run == {"raises": "MemoryError: no room for the item-item matrix"}
    t0 = time.monotonic()
    results, not_run = run_baselines_isolated({"markov": MarkovLastItem(), "sleeps": Sleeps()}, seqs, hist, targets,
                                              5, (5,), timeout_s=8)
    assert set(results) == {"markov"} and "baseline_timeout_s=8" in not_run["sleeps"]
    assert time.monotonic() - t0 < 40
