"""Ranking metrics against hand-computed rankings, plus consistency of the code paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deftrec.retrieval.metrics import (
    evaluate_both_protocols,
    evaluate_in_chunks,
    evaluate_scores,
    evaluate_topk,
    hit_rate,
    mask_history,
    mrr,
    ndcg,
    target_ranks,
    topk,
)

# ---------------------------------------------------------------- golden toy example
# 6 items, 3 users. Orderings written out by hand (ties -> lower index first):
#   u0 scores 4:.9  1:.5  2:.5  3:.3  0:.1  5:0   -> order 4 1 2 3 0 5
#   u1 all equal                                   -> order 0 1 2 3 4 5
#   u2 scores 0:1.  2:.8  3:.8  5:.6  1:.4  4:.1   -> order 0 2 3 5 1 4
SCORES = np.array(
    [
        [0.1, 0.5, 0.5, 0.3, 0.9, 0.0],
        [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
        [1.0, 0.4, 0.8, 0.8, 0.1, 0.6],
    ]
)
# u0: repeated history item 4; u1: empty history; u2: target 2 repeats its history and
# only 3 items (5, 1, 4) stay unmasked.
HISTORIES = [np.array([4, 4, 1]), np.array([], dtype=np.int64), np.array([2, 0, 3, 2, 0])]
TARGETS = np.array([2, 3, 2])
N = 6

# Kept:     u0 target 2 at rank 2, u1 target 3 at rank 3, u2 target 2 at rank 1.
RANKS_KEPT = [2, 3, 1]
# Excluded: u0 order 2 3 0 5 -> rank 0; u1 unchanged -> 3; u2 target masked -> sentinel N.
RANKS_EXCL = [0, 3, N]


def test_mask_history_masks_each_history_item_and_copies():
    masked = mask_history(SCORES, HISTORIES)
    expected = SCORES.copy()
    expected[0, [1, 4]] = -np.inf
    expected[2, [0, 2, 3]] = -np.inf
    np.testing.assert_array_equal(masked, expected)
    assert np.isfinite(SCORES).all()  # input untouched


def test_target_ranks_golden():
    np.testing.assert_array_equal(target_ranks(SCORES, TARGETS), RANKS_KEPT)
    np.testing.assert_array_equal(target_ranks(mask_history(SCORES, HISTORIES), TARGETS), RANKS_EXCL)


def test_ties_lower_index_wins():
    s = np.zeros((1, 5))
    np.testing.assert_array_equal(
        [target_ranks(s, [t])[0] for t in range(5)], [0, 1, 2, 3, 4]
    )
    items, _ = topk(s, 3)
    np.testing.assert_array_equal(items, [[0, 1, 2]])


def test_topk_golden_lists():
    items, vals = topk(SCORES, 6)
    np.testing.assert_array_equal(items, [[4, 1, 2, 3, 0, 5], [0, 1, 2, 3, 4, 5], [0, 2, 3, 5, 1, 4]])
    np.testing.assert_array_equal(vals, np.take_along_axis(SCORES, items, axis=1))
    items3, _ = topk(SCORES, 3)
    np.testing.assert_array_equal(items3, items[:, :3])  # ties across the cut resolved by index


def test_topk_k_larger_than_unmasked_items_pads_with_minus_one():
    items, vals = topk(mask_history(SCORES, HISTORIES), 5)
    np.testing.assert_array_equal(items, [[2, 3, 0, 5, -1], [0, 1, 2, 3, 4], [5, 1, 4, -1, -1]])
    assert np.isneginf(vals[2, 3:]).all() and np.isneginf(vals[0, 4])


def test_metric_functions_golden():
    r = np.array(RANKS_KEPT)
    assert hit_rate(r, 1) == 0.0
    assert hit_rate(r, 2) == pytest.approx(1 / 3)
    assert ndcg(r, 2) == pytest.approx((1 / math.log2(3)) / 3)
    assert ndcg(r, 5) == pytest.approx((1 / math.log2(4) + 1 / math.log2(5) + 1 / math.log2(3)) / 3)
    assert mrr(r) == pytest.approx((1 / 3 + 1 / 4 + 1 / 2) / 3)
    assert mrr(r, 3) == pytest.approx((1 / 3 + 1 / 2) / 3)


def test_evaluate_scores_both_protocols_golden():
    excl = evaluate_scores(SCORES, TARGETS, HISTORIES, ks=(1, 5), exclude_history=True)
    assert excl["hr@1"] == pytest.approx(1 / 3)
    assert excl["hr@5"] == pytest.approx(2 / 3)
    assert excl["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert excl["mrr@5"] == pytest.approx((1 + 1 / 4) / 3)
    assert excl["mrr"] == pytest.approx((1 + 1 / 4 + 0) / 3)  # masked target contributes 0

    kept = evaluate_scores(SCORES, TARGETS, HISTORIES, ks=(1, 5), exclude_history=False)
    assert kept["hr@1"] == 0.0
    assert kept["hr@5"] == 1.0
    assert kept["mrr"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 2) / 3)
    # Without exclusion histories are not needed.
    assert evaluate_scores(SCORES, TARGETS, None, ks=(1, 5), exclude_history=False) == kept

    both = evaluate_both_protocols(SCORES, TARGETS, HISTORIES, ks=(1, 5))
    assert both == {"history_excluded": excl, "history_kept": kept}
    assert set(excl) == {"hr@1", "ndcg@1", "mrr@1", "hr@5", "ndcg@5", "mrr@5", "mrr"}


def test_k_larger_than_catalog_and_unmasked_items():
    # K=10 > 6 items: every rankable target is a hit, the masked one still is not.
    excl = evaluate_scores(SCORES, TARGETS, HISTORIES, ks=(10,))
    assert excl["hr@10"] == pytest.approx(2 / 3)
    assert excl["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    kept = evaluate_scores(SCORES, TARGETS, HISTORIES, ks=(10,), exclude_history=False)
    assert kept["hr@10"] == 1.0


def test_raw_minus_inf_target_is_never_a_hit():
    s = np.array([[0.0, -np.inf, -np.inf]])
    assert target_ranks(s, [1])[0] == 3
    assert evaluate_scores(s, [1], None, ks=(3,), exclude_history=False)["hr@3"] == 0.0


def test_torch_inputs_accepted():
    out = evaluate_scores(torch.tensor(SCORES), torch.tensor(TARGETS), [torch.tensor(h) for h in HISTORIES], ks=(5,))
    assert out == evaluate_scores(SCORES, TARGETS, HISTORIES, ks=(5,))


# ---------------------------------------------------------------- random consistency


def _random_case(seed: int, n_users: int = 40, n_items: int = 25):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(n_users, n_items)).astype(np.float32)  # many ties
    histories = [rng.integers(0, n_items, size=rng.integers(0, 8)) for _ in range(n_users)]
    targets = rng.integers(0, n_items, size=n_users)
    return scores, histories, targets


@pytest.mark.parametrize("seed", [0, 1])
def test_ranks_and_topk_match_stable_argsort(seed):
    scores, histories, targets = _random_case(seed)
    masked = mask_history(scores, histories)
    order = np.argsort(-masked, axis=1, kind="stable")  # independent reference ranking
    pos = np.argsort(order, axis=1)[np.arange(len(targets)), targets]
    finite = np.isfinite(masked[np.arange(len(targets)), targets])
    expected = np.where(finite, pos, masked.shape[1])
    np.testing.assert_array_equal(target_ranks(masked, targets), expected)

    items, vals = topk(masked, 20)
    ref = order[:, :20].copy()
    ref[np.isneginf(np.take_along_axis(masked, ref, axis=1))] = -1
    np.testing.assert_array_equal(items, ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_topk_equals_evaluate_scores(seed):
    scores, histories, targets = _random_case(seed)
    ks = (1, 5, 10, 20)
    for exclude in (True, False):
        s = mask_history(scores, histories) if exclude else scores
        full = evaluate_scores(scores, targets, histories, ks, exclude_history=exclude)
        from_lists = evaluate_topk(topk(s, 20)[0], targets, ks)
        full.pop("mrr")  # needs the whole ranking, not reported from lists
        assert from_lists == pytest.approx(full)


def test_evaluate_topk_absent_target_is_miss_and_short_list_rejected():
    lists = np.array([[3, 1, 2], [0, 1, 2]])
    out = evaluate_topk(lists, [1, 5], ks=(1, 2, 3))
    assert out == pytest.approx(
        {"hr@1": 0.0, "hr@2": 0.5, "hr@3": 0.5, "ndcg@1": 0.0, "ndcg@2": 0.5 / math.log2(3),
         "ndcg@3": 0.5 / math.log2(3), "mrr@1": 0.0, "mrr@2": 0.25, "mrr@3": 0.25}
    )
    with pytest.raises(ValueError, match="exceeds"):
        evaluate_topk(lists, [1, 5], ks=(5,))


@pytest.mark.parametrize("chunk_size", [1, 7, 40, 100])
def test_chunked_equals_unchunked(chunk_size):
    scores, histories, targets = _random_case(3)
    seen: list[int] = []

    def score_fn(users):
        seen.append(len(users))
        return torch.from_numpy(scores[users])  # tensors are accepted from score_fn too

    out = evaluate_in_chunks(score_fn, np.arange(len(targets)), targets, histories, chunk_size, (1, 5, 10))
    ref = evaluate_both_protocols(scores, targets, histories, (1, 5, 10))
    assert set(out) == set(ref)
    for protocol in ref:
        assert out[protocol] == pytest.approx(ref[protocol], abs=1e-12)
    assert max(seen) <= chunk_size and sum(seen) == len(targets)


def test_chunked_passes_user_ids_through():
    scores, histories, targets = _random_case(4, n_users=10)
    ids = np.arange(100, 110)
    out = evaluate_in_chunks(lambda u: scores[u - 100], ids, targets, histories, 3, (5,))
    ref = evaluate_both_protocols(scores, targets, histories, (5,))
    for protocol in ref:  # approx: chunk sums add in a different order
        assert out[protocol] == pytest.approx(ref[protocol], abs=1e-12)


def test_input_validation():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(np.array([[0.0, np.nan]]), [0])
    with pytest.raises(ValueError, match="k must be"):
        topk(SCORES, 7)
    with pytest.raises(ValueError, match="histories"):
        mask_history(SCORES, HISTORIES[:2])
    with pytest.raises(ValueError, match="history items"):
        mask_history(SCORES, [[6], [], []])
    with pytest.raises(ValueError, match="targets"):
        target_ranks(SCORES, [0, 1, 6])
    with pytest.raises(ValueError, match="cutoff"):
        evaluate_scores(SCORES, TARGETS, HISTORIES, ks=(0, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_in_chunks(lambda u: SCORES[u], np.arange(3), TARGETS, HISTORIES, 0)
