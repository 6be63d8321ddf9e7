"""Sampled softmax (deftrec.model.softmax) for DeftRec's catalog cross-entropy and SASRec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deftrec.model.deftrec as deftrec_module
from deftrec.batch.sasrec import SASRec
from deftrec.config.baselines import SASRecConfig
from deftrec.config.components import DiffusionConfig
from deftrec.config.pipeline import load_pipeline_config
from deftrec.core.config import ConfigError
from deftrec.model.deftrec import DeftRecTask
from deftrec.model.softmax import draw_negatives, mixed_sampling_probs, sampled_softmax_ce, uses_sampled_softmax
from tests.test_levers import D_C, N_ITEMS, build, cache  # noqa: F401  (module fixtures)


def every_item_once(n_items, negatives, device, generator=None, probs=None):
    """Negatives that are the whole catalog, each drawn once: Q = 1 for every item (uniform draws), or
    Q = S p(item) for draws from ``probs``."""
    log_q = torch.zeros(n_items) if probs is None else torch.log(n_items * probs)  # S = n_items draws
    return torch.arange(n_items, device=device), log_q.to(device)


def test_sampled_softmax_with_every_item_as_negative_equals_the_full_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    ids, log_q = every_item_once(11, 11, "cpu")
    sampled = sampled_softmax_ce(logits[torch.arange(7), targets], logits[:, ids], targets, ids, log_q)
    full = F.cross_entropy(logits, targets)
    torch.testing.assert_close(sampled, full)
    (g_sampled,) = torch.autograd.grad(sampled, logits)
    (g_full,) = torch.autograd.grad(full, logits)
    torch.testing.assert_close(g_sampled, g_full)


def test_uniform_draws_and_their_correction():
    assert uses_sampled_softmax(100, 1000) and not uses_sampled_softmax(None, 1000)
    assert not uses_sampled_softmax(1000, 1000)  # the whole catalog: the full softmax is exact and as cheap
    ids, log_q = draw_negatives(50, 4000, "cpu", torch.Generator().manual_seed(0))
    assert ids.min() >= 0 and ids.max() < 50 and len(set(ids.tolist())) == 50
    torch.testing.assert_close(log_q, torch.full((4000,), float(np.log(80.0))))
    # a negative equal to the row's target is masked: the target is never its own negative
    loss = sampled_softmax_ce(torch.zeros(1), torch.tensor([[5.0, 0.0]]), torch.tensor([3]), torch.tensor([3, 4]),
                              torch.zeros(2))
    torch.testing.assert_close(loss, torch.tensor(float(np.log(2.0))))


def test_mixed_draws_follow_the_counts_and_carry_their_own_correction():
    """Half the mass in proportion to the counts, half uniform (every item keeps a share); the draws
    follow those probabilities and each carries log(S p(item))."""
    counts = torch.tensor([0.0, 1.0, 1.0, 2.0, 96.0])
    probs = mixed_sampling_probs(counts)
    torch.testing.assert_close(probs, 0.5 / 5 + 0.5 * counts / 100)
    assert float(probs.sum()) == pytest.approx(1.0) and float(probs.min()) == pytest.approx(0.1)
    ids, log_q = draw_negatives(5, 200_000, "cpu", torch.Generator().manual_seed(0), probs=probs)
    freq = torch.bincount(ids, minlength=5).double() / ids.numel()
    torch.testing.assert_close(freq, probs.double(), atol=5e-3, rtol=0)
    torch.testing.assert_close(log_q, torch.log(200_000 * probs[ids]))
    with pytest.raises(ConfigError, match="diffusion.ce_negative_sampler: 'popular' is not one of"):
        load_pipeline_config(None, ["diffusion.ce_negative_sampler=popular"])
    with pytest.raises(ConfigError, match="sasrec.negative_sampler: 'popular' is not one of"):
        load_pipeline_config(None, ["evaluate.sasrec.negative_sampler=popular"])


def test_deftrec_mixed_sampler_corrects_the_target_and_the_negatives_by_their_own_q(build, monkeypatch):
    """With every item drawn once from the mixed distribution, the sampled cross-entropy is the full
    softmax over the scores less log(S p(item)) for every item, the target's own included; the task
    refuses the mixed sampler without the training counts."""
    overrides = ("diffusion.lambda_ce=1.0", "eval.score=ip", f"diffusion.ce_negatives={N_ITEMS - 1}",
                 "diffusion.ce_negative_sampler=mixed")
    counts = torch.arange(N_ITEMS, dtype=torch.float32)
    task = DeftRecTask(build(*overrides), item_counts=counts)
    with pytest.raises(ValueError, match="training counts"):
        DeftRecTask(build(*overrides))
    monkeypatch.setattr(deftrec_module, "draw_negatives", every_item_once)
    g = torch.Generator().manual_seed(0)
    q, table = torch.randn(64, D_C, generator=g), torch.randn(N_ITEMS, D_C, generator=g)
    targets = torch.randint(0, N_ITEMS, (64,), generator=g)
    corrected = q @ table.T - torch.log(N_ITEMS * mixed_sampling_probs(counts))[None, :]  # S = N_ITEMS draws
    torch.testing.assert_close(task.catalog_ce(q, table, targets), F.cross_entropy(corrected, targets))
    assert "ce_neg_probs" not in task.state_dict()  # derived from the data, never saved


@pytest.mark.parametrize("score", ["l2", "ip"])
@pytest.mark.parametrize("scale", ["raw", "normalised"])
def test_deftrec_catalog_ce_sampled_over_the_whole_catalog_equals_the_full_one(build, monkeypatch, score, scale):
    full = DeftRecTask(build("diffusion.lambda_ce=1.0", f"diffusion.ce_scale={scale}", f"eval.score={score}"))
    sampled = DeftRecTask(build("diffusion.lambda_ce=1.0", f"diffusion.ce_scale={scale}", f"eval.score={score}",
                                f"diffusion.ce_negatives={N_ITEMS - 1}"))
    monkeypatch.setattr(deftrec_module, "draw_negatives", every_item_once)
    g = torch.Generator().manual_seed(0)
    q, table = torch.randn(64, D_C, generator=g), torch.randn(N_ITEMS, D_C, generator=g)
    targets = torch.randint(0, N_ITEMS, (64,), generator=g)
    torch.testing.assert_close(sampled.catalog_ce(q, table, targets), full.catalog_ce(q, table, targets))


@pytest.mark.parametrize("sampler", ["uniform", "mixed"])
def test_sasrec_learns_a_cycle_with_sampled_negatives(sampler):
    """Sequences that walk a cycle of 40 items: with 8 sampled negatives per step SASRec still learns
    the next item."""
    n = 40
    seqs = [np.arange(s, s + 12) % n for s in range(n)] * 4
    model = SASRec(SASRecConfig(dim=16, blocks=1, max_len=12, negatives=8, negative_sampler=sampler, max_epochs=30,
                                patience=30, batch_size=32, lr=5e-3, dropout=0.0, threads=1)).fit(seqs, n)
    assert (model._neg_probs is None) == (sampler == "uniform")
    scores = model.score([np.arange(s, s + 6) % n for s in range(n)])
    hits = np.mean(scores.argmax(1) == (np.arange(n) + 6) % n)
    assert hits > 0.8, hits


def test_the_defaults_keep_the_full_softmax_up_to_4096_items_and_sample_above():
    """Every catalog here (at most 3,706 items) trains on the full softmax by default; a 20k catalog samples."""
    for negatives in (DiffusionConfig().ce_negatives, SASRecConfig().negatives):
        assert not uses_sampled_softmax(negatives, 4096)
        assert uses_sampled_softmax(negatives, 20_000)
    assert not uses_sampled_softmax(None, 1_000_000)


def test_sasrec_validates_on_a_fixed_subset_of_valid_users(monkeypatch):
    """sasrec.valid_users bounds a validation's users x items scoring: the same seeded users every epoch
    and every run, and NDCG@10 a mean over that many users."""
    n = 30
    seqs = [np.arange(s, s + 8) % n for s in range(n)] * 2
    cfg = SASRecConfig(dim=8, blocks=1, max_len=8, max_epochs=2, patience=5, batch_size=16, threads=1,
                       valid_users=7)
    seen = []
    original = SASRec._validate

    def recording(self, model, histories, targets):
        seen.append(targets.copy())
        return original(self, model, histories, targets)

    monkeypatch.setattr(SASRec, "_validate", recording)
    SASRec(cfg).fit(seqs, n)
    SASRec(cfg).fit(seqs, n)
    assert len(seen) == 4 and all(len(t) == 7 for t in seen)
    assert all(np.array_equal(seen[0], t) for t in seen)
    with pytest.raises(ValueError, match="valid_users"):
        SASRecConfig(valid_users=0)
