"""A catalog softmax whose cost follows a number of sampled negatives, not the catalog size.

Full softmax cross-entropy over n items costs O(n) scores per position; with ``negatives = S < n``
:func:`sampled_softmax_ce` scores the target and S drawn items instead (with replacement, shared by
the batch; uniformly, or from :func:`mixed_sampling_probs`), each logit corrected by log Q, Q the
expected number of draws of that item (Jean et al. 2015; Yi et al. 2019): with every item drawn
once, it is exactly the full softmax. A negative that is the row's own target (an accidental hit)
is masked, so the target is never its own negative.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["draw_negatives", "mixed_sampling_probs", "sampled_softmax_ce", "uses_sampled_softmax"]


def uses_sampled_softmax(negatives: int | None, n_items: int) -> bool:
    """Sampled softmax applies when ``negatives`` is set and smaller than the catalog."""
    return negatives is not None and negatives < n_items


def draw_negatives(n_items: int, negatives: int, device: torch.device | str,
                   generator: torch.Generator | None = None, probs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``negatives`` item ids drawn with replacement [S] and their log Q [S], Q = S p(item) the expected
    number of times each is drawn: uniformly (p = 1 / n_items), or from ``probs`` [n_items]."""
    if probs is None:
        ids = torch.randint(n_items, (negatives,), device=device, generator=generator)
        return ids, torch.full((negatives,), math.log(negatives / n_items), device=device)
    ids = torch.multinomial(probs, negatives, replacement=True, generator=generator)
    return ids, torch.log(negatives * probs[ids])


def mixed_sampling_probs(counts: Tensor, popular_share: float = 0.5) -> Tensor:
    """Draw probabilities [n_items]: ``popular_share`` in proportion to ``counts`` (popular items, the
    hard negatives uniform draws rarely meet), the rest uniform, so every item keeps a share."""
    counts = counts.double()
    n = counts.numel()
    total = float(counts.sum())
    popular = counts / total if total > 0 else torch.full_like(counts, 1.0 / n)
    return ((1 - popular_share) / n + popular_share * popular).float()


def sampled_softmax_ce(pos_logits: Tensor, neg_logits: Tensor, targets: Tensor, neg_ids: Tensor,
                       neg_log_q: Tensor, probs: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of the targets against sampled negatives.

    Args:
        pos_logits: [B] the logit of each row's target.
        neg_logits: [B, S] the logits of the negatives ``neg_ids`` [S] for each row.
        targets: [B] each row's target id (negatives equal to it are masked).
        neg_log_q: [S] log of each negative's expected draw count.
        probs: the draw probabilities the negatives came from (:func:`draw_negatives`), which give the
            targets their own log Q; None (uniform draws): the targets share the negatives' value, which
            every logit shares and so changes nothing.
    """
    if probs is not None:
        pos_log_q = torch.log(neg_ids.numel() * probs[targets])
    else:
        pos_log_q = neg_log_q[:1].expand_as(pos_logits) if neg_log_q.numel() else torch.zeros_like(pos_logits)
    neg = (neg_logits - neg_log_q[None, :]).masked_fill(neg_ids[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([(pos_logits - pos_log_q)[:, None], neg], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))
