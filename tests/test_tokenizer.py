"""Tests for the continuous tokenizer (method.md section 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deftrec.config.components import ContinuousTokenizerConfig
from deftrec.model.tokenizer import ContinuousTokenizer

torch.set_num_threads(1)


def _make(K: int = 2, combine: str = "none", mask_ratio: float = 0.1, d_c: int = 8, d_llm: int = 12, hidden=None, seed=0):
    torch.manual_seed(seed)
    return ContinuousTokenizer(
        ContinuousTokenizerConfig(d_c=d_c, d_llm=d_llm, K=K, mask_ratio=mask_ratio, combine=combine, hidden=hidden)
    )


def _reference(tok: ContinuousTokenizer, x: torch.Tensor) -> torch.Tensor:
    """Per-branch loop with F.linear, written from the formula z_k = W_k(relu(e' + MLP_k(e')))."""
    outs = []
    for k in range(tok.cfg.K):
        h = torch.relu(F.linear(x, tok.w1[k].T, tok.b1[k]))
        mlp = F.linear(h, tok.w2[k].T, tok.b2[k])
        outs.append(F.linear(torch.relu(x + mlp), tok.w_out[k].T, tok.b_out[k]))
    return torch.stack(outs, dim=-2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(d_c=0, d_llm=4),
        dict(d_c=4, d_llm=4, K=0),
        dict(d_c=4, d_llm=4, mask_ratio=1.0),
        dict(d_c=4, d_llm=4, mask_ratio=-0.1),
        dict(d_c=4, d_llm=4, combine="mean"),
        dict(d_c=4, d_llm=4, hidden=0),
        dict(d_c=4.0, d_llm=4),
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        ContinuousTokenizerConfig(**kwargs)


def test_hidden_defaults_to_d_c():
    cfg = ContinuousTokenizerConfig(d_c=6, d_llm=3)
    assert cfg.hidden == 6
    assert ContinuousTokenizer(cfg).w1.shape == (2, 6, 6)
    assert ContinuousTokenizer(ContinuousTokenizerConfig(d_c=6, d_llm=3, hidden=5)).w2.shape == (2, 5, 6)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("combine", ["none", "sum"])
def test_shapes_and_num_tokens(K, combine):
    tok = _make(K=K, combine=combine)
    n_tok = 1 if combine == "sum" else K
    assert tok.num_tokens == n_tok
    e = torch.randn(5, 8)
    assert tok(e).shape == (5, n_tok, 12)
    tok.eval()
    assert tok(e).shape == (5, n_tok, 12)
    # leading dims are preserved (e.g. [batch, history, d_c])
    assert tok(torch.randn(2, 3, 8)).shape == (2, 3, n_tok, 12)
    with pytest.raises(ValueError):
        tok(torch.randn(5, 7))


def test_input_not_modified():
    tok = _make(mask_ratio=0.5).train()
    e = torch.randn(16, 8)
    e_copy = e.clone()
    tok(e)
    assert torch.equal(e, e_copy)
    assert not e.requires_grad


def test_eval_is_deterministic_and_unmasked():
    tok = _make(mask_ratio=0.5).eval()
    e = torch.randn(10, 8)
    a, b = tok(e), tok(e)
    assert torch.equal(a, b)
    # eval output equals the formula on e + p with no masking at all
    torch.testing.assert_close(a, _reference(tok, e + tok.pos))


def test_training_mask_rate_and_independence():
    ratio = 0.1
    tok = _make(mask_ratio=ratio, d_c=64).train()
    e = torch.rand(2000, 64) + 1.0  # strictly positive, so a zero means "masked"
    torch.manual_seed(123)
    masked = tok.mask(e) == 0
    rate = masked.float().mean().item()
    # 128k Bernoulli(0.1) draws: std ~ 8.4e-4, allow ~6 sigma
    assert abs(rate - ratio) < 5e-3
    # every row is masked at about the same rate: no row (e.g. row 0) treated specially
    row_rates = masked.float().mean(1)
    assert row_rates.max() < 0.5 and row_rates[0] < 0.5
    # rows get different patterns (the reference bug used one pattern for the whole batch)
    n_distinct = torch.unique(masked, dim=0).shape[0]
    assert n_distinct > 1900
    # features are masked independently: per-feature rate ~ ratio too
    col_rates = masked.float().mean(0)
    assert (col_rates - ratio).abs().max() < 0.05
    # correlation between masks of adjacent rows is ~0 (independence across rows)
    m = masked.float()
    corr = torch.corrcoef(torch.stack([m[:-1].flatten(), m[1:].flatten()]))[0, 1].item()
    assert abs(corr) < 0.02
    # unmasked features are kept exactly (no rescaling)
    kept = tok.mask(e)
    nz = kept != 0
    assert torch.equal(kept[nz], e[nz])


def test_training_forward_uses_mask():
    tok = _make(mask_ratio=0.3).train()
    e = torch.randn(6, 8)
    torch.manual_seed(7)
    out = tok(e)
    torch.manual_seed(7)
    m = tok.mask(e)
    torch.testing.assert_close(out, _reference(tok, m + tok.pos))
    # two training passes differ (fresh mask), eval does not mask
    assert not torch.equal(tok(e), tok(e))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_batched_branches_match_per_branch_loop(K):
    tok = _make(K=K, hidden=5).eval()
    e = torch.randn(7, 8)
    torch.testing.assert_close(tok(e), _reference(tok, e + tok.pos))


def test_combine_sum_equals_sum_of_branches():
    torch.manual_seed(0)
    tok_none = _make(K=3, combine="none").eval()
    tok_sum = ContinuousTokenizer(ContinuousTokenizerConfig(d_c=8, d_llm=12, K=3, combine="sum")).eval()
    tok_sum.load_state_dict(tok_none.state_dict())
    e = torch.randn(4, 8)
    torch.testing.assert_close(tok_sum(e), tok_none(e).sum(dim=1, keepdim=True))
    torch.testing.assert_close(tok_sum(e)[:, 0], _reference(tok_sum, e + tok_sum.pos).sum(1))


@pytest.mark.parametrize("combine", ["none", "sum"])
def test_gradients_reach_position_and_every_branch(combine):
    tok = _make(K=3, combine=combine, mask_ratio=0.1).train()
    e = torch.randn(9, 8, requires_grad=True)
    out = tok(e)
    # weight each token differently so a zero gradient cannot come from symmetry
    (out * torch.randn_like(out)).sum().backward()
    for name, p in tok.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if p.dim() >= 2 and p.shape[0] == 3:
            for k in range(3):
                assert p.grad[k].abs().sum() > 0, f"{name}[{k}] got no gradient"
        else:
            assert p.grad.abs().sum() > 0, name
    assert e.grad is not None and e.grad.abs().sum() > 0
