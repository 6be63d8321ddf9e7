"""SASRec baseline at toy size: it learns a planted next-item rule, early-stops on validation,
validates its config and repeats itself for a seed. Small enough for one CPU thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deftrec.batch.baselines import Baseline, Popularity, run_baselines
from deftrec.batch.sasrec import SASRec
from deftrec.config.baselines import SASRecConfig
from deftrec.core.config import ConfigError, from_dict
from deftrec.data.samples import Ragged

N_ITEMS = 120


def planted_log(n_users: int = 240, n_items: int = N_ITEMS, seed: int = 0) -> list[np.ndarray]:
    """Sequences following a hidden successor table (one cycle over all items) 90% of the time.

    The cycle is longer than any sequence, so the true next item is (almost) never already in the
    history and "history excluded" leaves it rankable. Start items are uniform, so popularity is flat.
    """
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(n_items)
    succ = np.empty(n_items, dtype=np.int64)
    succ[cycle] = np.roll(cycle, -1)
    seqs = []
    for _ in range(n_users):
        item, seq = int(rng.integers(n_items)), []
        for _ in range(int(rng.integers(8, 16))):
            seq.append(item)
            item = int(succ[item]) if rng.random() < 0.9 else int(rng.integers(n_items))
        seqs.append(np.array(seq, dtype=np.int64))
    return seqs


def small_cfg(**kw) -> SASRecConfig:
    base = dict(dim=32, blocks=1, heads=1, max_len=16, dropout=0.1, lr=5e-3, batch_size=32,
                max_epochs=25, eval_every=1, patience=4, max_seconds=None, seed=0, device="cpu", threads=1)
    base.update(kw)
    return SASRecConfig(**base)


@pytest.fixture(scope="module")
def log() -> list[np.ndarray]:
    return planted_log()


# --------------------------------------------------------------------------- (a) it learns


def test_sasrec_learns_planted_successors_and_beats_popularity(log):
    train = [s[:-1] for s in log]  # fit on everything before the evaluated target
    targets = np.array([s[-1] for s in log])
    model = SASRec(small_cfg())
    assert isinstance(model, Baseline)
    res = run_baselines(train, train, targets, N_ITEMS, ks=(10,),
                        models={"sasrec": model, "popularity": Popularity()})
    sas, pop = res["sasrec"]["history_excluded"], res["popularity"]["history_excluded"]
    # ~90% of targets follow the planted rule: a model that learned it ranks them first.
    assert sas["ndcg@10"] > 0.6, sas
    assert sas["ndcg@10"] > pop["ndcg@10"] + 0.4, (sas, pop)
    assert model.history_ and model.best_ndcg_ > 0.5


def test_score_shapes_empty_histories_and_ragged(log):
    model = SASRec(small_cfg(max_epochs=2)).fit(Ragged.from_lists([s.tolist() for s in log]), N_ITEMS)
    hist = [np.array([], dtype=np.int64), log[0], np.array([3]), log[1][:-1]]
    s = model.score(hist)
    assert s.dtype == np.float32 and s.shape == (4, N_ITEMS)
    assert np.isfinite(s).all()
    assert np.ptp(s[0]) == 0  # empty history: a constant row
    # Only the last max_len items matter.
    long = np.concatenate([np.arange(40) % N_ITEMS, log[0]])
    np.testing.assert_allclose(model.score([long]), model.score([long[-16:]]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="history items"):
        model.score([np.array([N_ITEMS])])
    with pytest.raises(RuntimeError, match="fit"):
        SASRec(small_cfg()).score([log[0]])


# --------------------------------------------------------------------------- (b) early stopping


def test_early_stopping_restores_best_state_and_stops_on_patience(log):
    model = SASRec(small_cfg(max_epochs=40, eval_every=2, patience=3))
    scripted = iter([0.10, 0.30, 0.20, 0.25, 0.29, 0.99])  # best at the 2nd validation (epoch 4)
    states = {}

    def fake_validate(net, histories, targets):
        states[len(states)] = {k: v.clone() for k, v in net.state_dict().items()}
        return next(scripted)

    model._validate = fake_validate
    model.fit(log, N_ITEMS)
    assert model.stop_reason_ == "patience"
    assert model.epochs_ == 10 < 40  # 5 validations x eval_every 2
    assert model.best_epoch_ == 4 and model.best_ndcg_ == pytest.approx(0.30)
    assert [h["epoch"] for h in model.history_] == [2, 4, 6, 8, 10]
    restored = model.model_.state_dict()
    for k, v in restored.items():
        torch.testing.assert_close(v, states[1][k], rtol=0, atol=0)
    assert any(not torch.equal(restored[k], states[4][k]) for k in restored)  # last weights differ


def test_restored_model_scores_its_best_validation_ndcg(log):
    model = SASRec(small_cfg(max_epochs=12, patience=2)).fit(log, N_ITEMS)
    assert model.stop_reason_ in ("patience", "max_epochs")
    assert model.best_ndcg_ == max(h["ndcg@10"] for h in model.history_)
    # Recompute the validation NDCG@10 on the restored weights: the held-out last items.
    hist = [s[:-1] for s in log if s.size >= 3]
    tgt = np.array([s[-1] for s in log if s.size >= 3])
    assert model._validate(model.model_, hist, tgt) == pytest.approx(model.best_ndcg_, abs=1e-12)


def test_max_seconds_caps_training(log):
    model = SASRec(small_cfg(max_epochs=50, max_seconds=1e-6)).fit(log, N_ITEMS)
    assert model.stop_reason_ == "max_seconds" and model.epochs_ == 1 and len(model.history_) == 1


def test_short_sequences_train_without_validation():
    seqs = [np.array([0, 1]), np.array([1, 2]), np.array([2, 3])]  # too short to hold an item out
    lines = []
    model = SASRec(small_cfg(max_epochs=3), log=lines.append).fit(seqs, 5)
    assert model.epochs_ == 3 and model.stop_reason_ == "max_epochs"
    assert len(lines) == 3 and lines[0].startswith("[sasrec] epoch 1 loss")
    assert np.isfinite(model.score(seqs)).all()


# --------------------------------------------------------------------------- (c) config


@pytest.mark.parametrize("field, value", [
    ("dim", 0), ("blocks", -1), ("heads", 0), ("max_len", 2.5), ("batch_size", True), ("max_epochs", 0),
    ("eval_every", 0), ("patience", 0), ("threads", 0), ("dropout", 1.0), ("dropout", -0.1), ("lr", 0.0),
    ("lr", float("nan")), ("weight_decay", -1e-4), ("max_seconds", 0.0), ("max_seconds", float("inf")),
    ("seed", -1), ("device", "tpu"), ("device", "cuda:x"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"sasrec\.{field}\b"):
        SASRecConfig(**{field: value})


def test_config_heads_must_divide_dim_and_defaults_are_valid():
    with pytest.raises(ValueError, match=r"sasrec\.heads .*sasrec\.dim"):
        SASRecConfig(dim=64, heads=3)
    cfg = SASRecConfig()
    assert (cfg.dim, cfg.blocks, cfg.heads) == (64, 2, 1)
    assert SASRecConfig(threads=None, max_seconds=None, device="cuda:1").device == "cuda:1"
    assert from_dict(SASRecConfig, {"max_len": "50", "dropout": 0.3}).max_len == 50
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(SASRecConfig, {"hidden": 64})


# --------------------------------------------------------------------------- (d) determinism


def test_same_seed_same_scores(log):
    hist = [s[:-1] for s in log[:50]]
    a = SASRec(small_cfg(max_epochs=3)).fit(log, N_ITEMS).score(hist)
    b = SASRec(small_cfg(max_epochs=3)).fit(log, N_ITEMS).score(hist)
    c = SASRec(small_cfg(max_epochs=3, seed=1)).fit(log, N_ITEMS).score(hist)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
