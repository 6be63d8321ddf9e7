"""Tests for LightGCN collaborative embeddings (method.md section 1)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deftrec.config.components import LightGCNConfig
from deftrec.config.model import DeftRecConfig
from deftrec.data.samples import EvalSet, ItemCatalog, PreprocessedData, Ragged
from deftrec.model.lightgcn import LightGCN, build_norm_adj
from deftrec.retrieval.metrics import evaluate_scores
from deftrec.training.collab_job import fit_collab
from deftrec.training.lightgcn import (
    _InteractionSet,
    epoch_batch_size,
    epoch_shard,
    hit_rate_at_k,
    sample_negatives,
    train_lightgcn,
)

torch.set_num_threads(1)

# Tiny graph: 3 users, 4 items; (0, 1) is repeated, user 2 and item 3 are isolated.
TINY_U = np.array([0, 0, 0, 1, 1])
TINY_I = np.array([0, 1, 1, 1, 2])


def _dense_norm_adj(users, items, n_users, n_items) -> np.ndarray:
    """Independent dense construction of D^-1/2 A D^-1/2."""
    n = n_users + n_items
    A = np.zeros((n, n))
    for u, i in zip(users, items):
        A[u, n_users + i] = A[n_users + i, u] = 1.0  # duplicates collapse
    d = A.sum(1)
    inv = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)
    return inv[:, None] * A * inv[None, :]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=0),
        dict(layers=-1),
        dict(lr=0.0),
        dict(lr=float("nan")),
        dict(reg=-1e-4),
        dict(batch_size=0),
        dict(epochs=0),
        dict(eval_every=0),
        dict(patience=0),
        dict(seed=-1),
        dict(init_std=0.0),
        dict(device="tpu"),
        dict(dim=True),
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        LightGCNConfig(**kwargs)


def test_adjacency_matches_dense_numpy():
    adj = build_norm_adj(TINY_U, TINY_I, 3, 4)
    assert adj.is_sparse and adj.is_coalesced()
    assert adj._nnz() == 2 * 4  # 4 distinct edges, both directions
    dense = _dense_norm_adj(TINY_U, TINY_I, 3, 4)
    np.testing.assert_allclose(adj.to_dense().numpy(), dense, rtol=1e-6, atol=1e-7)
    # hand values: deg(u0)=2, deg(i1)=2 -> 1/2; deg(u1)=2, deg(i2)=1 -> 1/sqrt(2)
    a = adj.to_dense().numpy()
    assert a[0, 3 + 1] == pytest.approx(0.5)
    assert a[1, 3 + 2] == pytest.approx(1 / math.sqrt(2))
    assert np.all(a[2] == 0) and np.all(a[3 + 3] == 0)  # isolated nodes


def test_adjacency_rejects_bad_ids():
    with pytest.raises(ValueError):
        build_norm_adj(np.array([0, 3]), np.array([0, 1]), 3, 4)
    with pytest.raises(ValueError):
        build_norm_adj(np.array([0]), np.array([-1]), 3, 4)


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_propagation_equals_mean_of_dense_matrix_powers(layers):
    model = LightGCN(3, 4, TINY_U, TINY_I, LightGCNConfig(dim=5, layers=layers, seed=1))
    A = _dense_norm_adj(TINY_U, TINY_I, 3, 4)
    X0 = np.concatenate([model.user_emb.weight.detach().numpy(), model.item_emb.weight.detach().numpy()]).astype(
        np.float64
    )
    expected = sum(np.linalg.matrix_power(A, l) @ X0 for l in range(layers + 1)) / (layers + 1)
    U, E = model()
    np.testing.assert_allclose(U.detach().numpy(), expected[:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(E.detach().numpy(), expected[3:], rtol=1e-5, atol=1e-6)


def test_propagation_gradient_equals_the_dense_products():
    """The CSR propagation's hand-written backward (the graph is its own transpose) matches autograd
    through dense matrix powers."""
    model = LightGCN(3, 4, TINY_U, TINY_I, LightGCNConfig(dim=5, layers=3, seed=2))
    A = torch.from_numpy(_dense_norm_adj(TINY_U, TINY_I, 3, 4)).double()
    ego = torch.cat([model.user_emb.weight, model.item_emb.weight]).detach().double().requires_grad_()
    weights = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, total = ego, ego
    for _ in range(3):
        x = A @ x
        total = total + x
    ((total / 4) * weights).sum().backward()
    U, E = model()
    (torch.cat([U, E]) * weights.float()).sum().backward()
    got = torch.cat([model.user_emb.weight.grad, model.item_emb.weight.grad])
    np.testing.assert_allclose(got.numpy(), ego.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_init_std_and_seed():
    cfg = LightGCNConfig(dim=64, seed=3)
    a = LightGCN(300, 200, TINY_U, TINY_I, cfg)
    b = LightGCN(300, 200, TINY_U, TINY_I, cfg)
    assert torch.equal(a.item_emb.weight, b.item_emb.weight)
    assert a.user_emb.weight.std().item() == pytest.approx(0.1, rel=0.05)


def test_bpr_loss_hand_example():
    # layers=0: final embeddings are the ego embeddings, so scores are plain dot products.
    model = LightGCN(2, 3, TINY_U[:2], TINY_I[:2], LightGCNConfig(dim=2, layers=0, reg=0.0))
    with torch.no_grad():
        model.user_emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        model.item_emb.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    users, pos, neg = torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([1, 0])
    # user0: 2 - 0 = 2 ; user1: 2 - 0 = 2 -> loss = log(1 + e^-2)
    expected = math.log1p(math.exp(-2.0))
    assert model.bpr_loss(users, pos, neg).item() == pytest.approx(expected, rel=1e-6)
    # wrong order: diff = -2 -> log(1 + e^2)
    assert model.bpr_loss(users, neg, pos).item() == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-6)

    # L2 on ego embeddings: 0.5 * reg * (|u|^2 + |p|^2 + |n|^2) summed over batch / B
    model.cfg = LightGCNConfig(dim=2, layers=0, reg=0.1)
    sq = (1 + 4 + 1) + (4 + 2 + 4)
    assert model.bpr_loss(users, pos, neg).item() == pytest.approx(expected + 0.1 * 0.5 * sq / 2, rel=1e-6)


def test_bpr_gradient_reaches_propagated_neighbours():
    model = LightGCN(3, 4, TINY_U, TINY_I, LightGCNConfig(dim=4, layers=2))
    model.bpr_loss(torch.tensor([1]), torch.tensor([2]), torch.tensor([3])).backward()
    # user 0 is not in the batch but is two hops from item 2 (via item 1 and user 1)
    assert model.user_emb.weight.grad[0].abs().sum() > 0
    assert model.user_emb.weight.grad[2].abs().sum() == 0  # isolated and not in the batch


def test_negative_sampler_excludes_seen_and_is_uniform():
    users = np.array([0, 0, 0, 1])
    items = np.array([0, 1, 2, 4])
    seen = _InteractionSet(users, items, 5)
    q = np.repeat([0, 1], 20_000)
    neg = sample_negatives(q, seen, 5, np.random.default_rng(0))
    assert not seen.contains(q, neg).any()
    c0 = np.bincount(neg[q == 0], minlength=5)
    assert c0[:3].sum() == 0
    assert abs(c0[3] / 20_000 - 0.5) < 0.02  # two candidates {3, 4}, uniform
    c1 = np.bincount(neg[q == 1], minlength=5) / 20_000
    np.testing.assert_allclose(c1[:4], 0.25, atol=0.02)
    assert c1[4] == 0
    same = sample_negatives(q, seen, 5, np.random.default_rng(0))
    assert np.array_equal(neg, same)


@pytest.mark.parametrize("n_pairs,world_size", [(10, 2), (11, 3), (2, 4), (7, 1)])
def test_epoch_shards_cover_pairs_with_equal_lengths(n_pairs, world_size):
    shards = [epoch_shard(n_pairs, 42, 3, r, world_size) for r in range(world_size)]
    length = -(-n_pairs // world_size)
    assert all(len(s) == length for s in shards)  # same number of steps on every rank
    allidx = np.concatenate(shards)
    assert set(allidx.tolist()) == set(range(n_pairs))  # every pair visited
    if n_pairs % world_size == 0:
        assert len(np.unique(allidx)) == n_pairs  # disjoint shards when no padding
    # same epoch -> same shards; next epoch -> new order
    assert np.array_equal(shards[0], epoch_shard(n_pairs, 42, 3, 0, world_size))
    if n_pairs >= 7:
        assert not np.array_equal(
            np.concatenate(shards), np.concatenate([epoch_shard(n_pairs, 42, 4, r, world_size) for r in range(world_size)])
        )


def test_hit_rate_hand_example():
    U = np.array([[1.0, 0.0], [0.0, 1.0]])
    E = np.array([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # user 0 ranks items 0 > 1 > 2 > 3. History {0} excluded -> item 1 is at rank 0.
    assert hit_rate_at_k(U, E, np.array([0]), [np.array([0])], np.array([1]), k=1) == 1.0
    assert hit_rate_at_k(U, E, np.array([0]), [np.array([], dtype=int)], np.array([1]), k=1) == 0.0
    # user 1: item 3 first, items 0..2 tie at 0 -> ties broken by id: target 2 has rank 3
    assert hit_rate_at_k(U, E, np.array([1]), [np.array([], dtype=int)], np.array([2]), k=3) == 0.0
    assert hit_rate_at_k(U, E, np.array([1]), [np.array([], dtype=int)], np.array([2]), k=4) == 1.0
    # a target inside the history is excluded: always a miss
    assert hit_rate_at_k(U, E, np.array([0]), [np.array([1])], np.array([1]), k=4) == 0.0
    # mean over users, chunking does not change the result
    hist = [np.array([0]), np.array([], dtype=int)]
    assert hit_rate_at_k(U, E, np.array([0, 1]), hist, np.array([1, 2]), k=1, chunk=1) == 0.5


def test_train_rejects_bad_setups():
    cfg = LightGCNConfig(dim=4, epochs=1)
    with pytest.raises(ValueError, match="process group"):
        train_lightgcn(TINY_U, TINY_I, 3, 4, cfg, log=None, world_size=2)
    with pytest.raises(ValueError, match="every item"):
        train_lightgcn(np.array([0, 0]), np.array([0, 1]), 1, 2, cfg, log=None)


def test_training_is_deterministic_for_a_seed():
    u, i, _ = _planted(n_users=60, n_items=40, seed=1)
    cfg = LightGCNConfig(dim=8, epochs=3, batch_size=128, seed=5)
    U1, E1, h1 = train_lightgcn(u, i, 60, 40, cfg, log=None)
    U2, E2, h2 = train_lightgcn(u, i, 60, 40, cfg, log=None)
    assert U1.dtype == np.float32 and U1.shape == (60, 8) and E1.shape == (40, 8)
    assert np.array_equal(U1, U2) and np.array_equal(E1, E2)
    assert h1 == h2 and [r["epoch"] for r in h1] == [1, 2, 3]
    U3, _, _ = train_lightgcn(u, i, 60, 40, LightGCNConfig(dim=8, epochs=3, batch_size=128, seed=6), log=None)
    assert not np.array_equal(U1, U3)


def test_an_epoch_is_at_most_max_steps_per_epoch_whatever_the_data_size():
    cfg = LightGCNConfig(batch_size=100, max_steps_per_epoch=10)
    assert epoch_batch_size(500, cfg) == 100  # small data: the configured batch
    assert epoch_batch_size(10_001, cfg) == 1001  # larger: raised so that 10 steps cover the pairs
    assert epoch_batch_size(10_001, dataclasses.replace(cfg, max_steps_per_epoch=None)) == 100
    u, i, _ = _planted(n_users=60, n_items=40, seed=1)
    lines = []
    train_lightgcn(u, i, 60, 40, LightGCNConfig(dim=8, epochs=1, batch_size=16, max_steps_per_epoch=3),
                   log=lines.append)
    n_pairs = len(set(zip(u.tolist(), i.tolist())))
    assert f"{n_pairs:,} training pairs: batch {-(-n_pairs // 3):,}" in lines[0], lines
    assert "3 steps per epoch" in lines[0], lines
    with pytest.raises(ValueError, match="max_steps_per_epoch"):
        LightGCNConfig(max_steps_per_epoch=0)


def _planted(n_users=300, n_items=200, n_cat=5, n_inter=20, seed=0):
    """Users prefer 1-2 of n_cat item categories; within a category items have skewed popularity.

    Each user's sequence is chronological; the last item is the validation target and the rest
    is training history. Returns (train_users, train_items, (val_users, histories, targets)).
    """
    rng = np.random.default_rng(seed)
    cat = np.arange(n_items) % n_cat
    weight = 1.0 / np.sqrt(1.0 + rng.permutation(n_items) % (n_items // n_cat))
    seqs = []
    for _ in range(n_users):
        cats = rng.choice(n_cat, size=rng.integers(1, 3), replace=False)
        cand = np.flatnonzero(np.isin(cat, cats))
        seqs.append(rng.choice(cand, size=min(n_inter, cand.size), replace=False, p=weight[cand] / weight[cand].sum()))
    tr_u = np.concatenate([np.full(len(s) - 1, u) for u, s in enumerate(seqs)])
    tr_i = np.concatenate([s[:-1] for s in seqs])
    valid = (np.arange(n_users), [s[:-1] for s in seqs], np.array([s[-1] for s in seqs]))
    return tr_u, tr_i, valid


def _popularity_hr10(train_items, n_items, histories, targets) -> float:
    """Popularity baseline, same protocol: full catalogue, history excluded, ties by item id."""
    pop = np.bincount(train_items, minlength=n_items).astype(float)
    hits = 0
    for h, t in zip(histories, targets):
        s = pop.copy()
        s[h] = -np.inf
        top = np.argsort(-s, kind="stable")[:10]
        hits += int(t in top and t not in h)
    return hits / len(targets)


def test_lightgcn_beats_popularity_on_planted_data():
    u, i, valid = _planted()
    pop_hr = _popularity_hr10(i, 200, valid[1], valid[2])
    cfg = LightGCNConfig(dim=32, epochs=40, batch_size=1024, eval_every=2, patience=3, seed=0)
    logs: list[str] = []
    U, E, hist = train_lightgcn(u, i, 300, 200, cfg, valid=valid, log=logs.append)
    evaluated = [r["hr@10"] for r in hist if "hr@10" in r]
    assert evaluated and len(logs) >= len(hist)
    # the BPR loss goes down from its log(2) starting point
    assert hist[-1]["loss"] < hist[0]["loss"] < math.log(2) + 0.05
    # returned embeddings are the best evaluated ones
    hr = hit_rate_at_k(U, E, *valid, k=10)
    assert hr == pytest.approx(max(evaluated))
    # independent recomputation of the returned model's HR@10 with the popularity protocol code
    scores = U @ E.T
    hits = 0
    for uu, h, t in zip(*valid):
        s = scores[uu].astype(np.float64)
        s[h] = -np.inf
        hits += int(t in np.argsort(-s, kind="stable")[:10])
    assert hits / 300 == pytest.approx(hr)
    assert hr > 2 * pop_hr and hr > 0.3, (hr, pop_hr)
    # early stopping: either stopped before the budget or used it with < patience bad evals at the end
    if len(hist) < cfg.epochs:
        assert evaluated[-3:] and max(evaluated[-3:]) <= max(evaluated[:-3])


def _long_histories(n_users=24, n_items=30, length=22, max_history=3, seed=0) -> PreprocessedData:
    """Every user saw 20 of 30 items before the validation target, but the split tables hold only the
    prompt's 3 newest: the other 17 are training positives LightGCN ranks high unless excluded."""
    rng = np.random.default_rng(seed)
    seqs = [rng.permutation(n_items)[:length] for _ in range(n_users)]
    sequences = Ragged.from_lists(seqs)
    users = np.arange(n_users, dtype=np.int64)

    def split(drop: int) -> EvalSet:  # target s[-drop]; seen: everything before it, like load_dataset
        window = Ragged.from_lists([s[:-drop][-max_history:] for s in seqs])
        return EvalSet(users, window, np.array([s[-drop] for s in seqs]), sequences.drop_last(drop))

    return PreprocessedData(root=Path("."), users=users, sequences=sequences, catalog=ItemCatalog.synthetic(n_items),
                            train=split(3), valid=split(2), test=split(1), n_users=n_users, n_items=n_items,
                            manifest={})


def test_validation_excludes_the_whole_history_not_only_the_prompt_window():
    data = _long_histories()
    cfg = DeftRecConfig(collab=LightGCNConfig(dim=8, epochs=3, eval_every=1, batch_size=64, seed=0))
    U, E, hist = fit_collab(cfg, data, log=None)
    v = data.valid
    scores = U[v.users] @ E.T
    whole = evaluate_scores(scores, v.targets, v.exclusions, ks=(10,))["hr@10"]
    window = evaluate_scores(scores, v.targets, v.histories, ks=(10,))["hr@10"]
    # 10 items are left once the 20 seen ones are masked: every target is in the top 10
    assert whole == 1.0 and window < whole
    assert max(h["hr@10"] for h in hist) == pytest.approx(whole)  # the returned embeddings are the best
    assert hit_rate_at_k(U, E, v.users, v.exclusions, v.targets) == pytest.approx(whole)


def test_validation_scores_a_fixed_subset_of_collab_valid_users(monkeypatch):
    """collab.valid_users bounds a validation's users x items scoring: LightGCN validates on that many
    seeded users, the same subset in every run, and keeps the embeddings best on them."""
    import deftrec.training.lightgcn as lightgcn

    seen = []

    def recording(*args, valid=None, **kwargs):
        seen.append(valid[0].copy())
        return train(*args, valid=valid, **kwargs)

    train = lightgcn.train_lightgcn
    monkeypatch.setattr(lightgcn, "train_lightgcn", recording)
    data = _long_histories(n_users=24)
    cfg = DeftRecConfig(collab=LightGCNConfig(dim=8, epochs=2, eval_every=1, batch_size=64, seed=0, valid_users=5))
    U, E, hist = fit_collab(cfg, data, log=None)
    fit_collab(cfg, data, log=None)
    v = data.valid.sample(5, 0)
    assert [len(u) for u in seen] == [5, 5] and np.array_equal(seen[0], seen[1]) and np.array_equal(seen[0], v.users)
    assert max(h["hr@10"] for h in hist) == pytest.approx(hit_rate_at_k(U, E, v.users, v.exclusions, v.targets))
    with pytest.raises(ValueError, match="valid_users"):
        LightGCNConfig(valid_users=0)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        u, i, valid = _planted(n_users=60, n_items=40, seed=2)
        cfg = LightGCNConfig(dim=8, epochs=3, batch_size=64, eval_every=2, seed=11)
        logs: list[str] = []
        U, E, hist = train_lightgcn(u, i, 60, 40, cfg, valid=valid, log=logs.append, rank=rank, world_size=world_size)
        np.savez(
            os.path.join(out_dir, f"rank{rank}.npz"),
            U=U,
            E=E,
            loss=np.array([r["loss"] for r in hist]),
            hr=np.array([r.get("hr@10", -1.0) for r in hist]),
            n_logs=np.array(len(logs)),
        )
    finally:
        dist.destroy_process_group()


def test_ddp_two_process_gloo(tmp_path):
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(world_size))
    assert r0["U"].shape == (60, 8) and r0["E"].shape == (40, 8)
    np.testing.assert_array_equal(r0["U"], r1["U"])
    np.testing.assert_array_equal(r0["E"], r1["E"])
    np.testing.assert_array_equal(r0["loss"], r1["loss"])  # all-reduced epoch loss
    np.testing.assert_array_equal(r0["hr"], r1["hr"])  # broadcast from rank 0
    assert r0["hr"][1] >= 0 and r0["hr"][2] >= 0  # evaluated at epoch 2 and at the last epoch
    assert int(r0["n_logs"]) == 3 and int(r1["n_logs"]) == 0  # only rank 0 logs
    assert np.isfinite(r0["U"]).all()


def test_user_vectors_never_see_the_validation_or_test_targets():
    """tokenizer.user_tokens feeds LightGCN's U into the prompt: U is fit on s[:-2] only, so changing
    every user's validation and test targets leaves its graph unchanged, and changing the test
    targets (which validation does not read) leaves U and E bit for bit the same."""
    from deftrec.data.samples import training_pairs

    data = _long_histories(length=12, max_history=12)

    def with_targets(drop: int, shift: int) -> PreprocessedData:
        seqs = [s.copy() for s in data.sequences]
        for s in seqs:
            s[-drop] = (s[-drop] + shift) % data.n_items
        sequences = Ragged.from_lists(seqs)

        def split(d: int) -> EvalSet:
            return EvalSet(data.users, Ragged.from_lists([s[:-d] for s in seqs]), np.array([s[-d] for s in seqs]),
                           sequences.drop_last(d))

        return dataclasses.replace(data, sequences=sequences, train=split(3), valid=split(2), test=split(1))

    other = with_targets(1, 7)
    for changed in (with_targets(1, 7), with_targets(2, 5)):
        assert not np.array_equal(changed.sequences.flat()[1], data.sequences.flat()[1])
        for a, b in zip(training_pairs(changed), training_pairs(data)):
            np.testing.assert_array_equal(a, b)
    cfg = DeftRecConfig(collab=LightGCNConfig(dim=8, epochs=3, eval_every=1, batch_size=64, seed=0))
    U, E, _ = fit_collab(cfg, data, log=None)
    U2, E2, _ = fit_collab(cfg, other, log=None)
    np.testing.assert_array_equal(U, U2)
    np.testing.assert_array_equal(E, E2)
