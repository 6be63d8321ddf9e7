"""Settings of the neural baselines reported beside DeftRec (no torch import: configs stay light).

:class:`SASRecConfig` configures :class:`deftrec.batch.sasrec.SASRec` (the model, its training
protocol and why these defaults: see that module's docstring). One config serves every dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

from deftrec.config.components import DEFAULT_SOFTMAX_NEGATIVES, NegativeSampler
from deftrec.core.config import _nonneg_float, _pos_int

__all__ = ["SASRecConfig"]


@dataclass
class SASRecConfig:
    """SASRec (Kang & McAuley, ICDM 2018) with full-softmax cross-entropy and early stopping.

    Training stops at the first of: ``max_epochs`` epochs, ``patience`` validations in a row
    without a new best validation NDCG@10, or ``max_seconds`` of wall-clock training time
    (checked after every batch; a last validation then runs). The best validated weights are
    restored either way.
    """

    dim: int = 64  # embedding and hidden size (reference: 64)
    blocks: int = 2  # self-attention blocks (reference: 2)
    heads: int = 1  # attention heads; must divide dim
    max_len: int = 200  # items of history the model reads (and trains on per user, + 1 target)
    dropout: float = 0.2  # on embeddings, attention weights, feed-forward and residual branches
    negatives: int | None = DEFAULT_SOFTMAX_NEGATIVES  # full softmax up to this many items, sampled above; None: always full
    # how sampled negatives are drawn: "mixed" (half in proportion to training counts) or "uniform"
    negative_sampler: NegativeSampler = "mixed"
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    batch_size: int = 128  # users (sequences) per optimiser step
    max_epochs: int = 200  # hard cap on passes over the training users
    eval_every: int = 1  # epochs between validations
    patience: int = 5  # validations without NDCG@10 gain before stopping
    valid_users: int | None = 10_000  # a fixed, seeded subset validates (null: every user with a held-out item)
    max_seconds: float | None = 1500.0  # wall-clock cap on fit (ml1m on 2 CPU cores); None: no cap
    seed: int = 0  # torch and batch-order seed (CPU runs are bit-for-bit repeatable)
    device: str = "auto"  # "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N"
    threads: int | None = None  # torch CPU threads during fit/score; None: torch's default

    def __post_init__(self) -> None:
        owner = "sasrec"
        for name in ("dim", "blocks", "heads", "max_len", "batch_size", "max_epochs", "eval_every", "patience"):
            _pos_int(owner, name, getattr(self, name))
        _pos_int(owner, "valid_users", self.valid_users, allow_none=True)
        _pos_int(owner, "threads", self.threads, allow_none=True)
        _pos_int(owner, "negatives", self.negatives, allow_none=True)
        if self.dim % self.heads:
            raise ValueError(f"{owner}.heads ({self.heads}) must divide {owner}.dim ({self.dim})")
        _nonneg_float(owner, "dropout", self.dropout, upper=1.0)
        _nonneg_float(owner, "lr", self.lr)
        if self.lr == 0:
            raise ValueError(f"{owner}.lr must be > 0, got {self.lr!r}")
        _nonneg_float(owner, "weight_decay", self.weight_decay)
        if self.max_seconds is not None:
            _nonneg_float(owner, "max_seconds", self.max_seconds)
            if self.max_seconds == 0:
                raise ValueError(f"{owner}.max_seconds must be > 0 or None (no cap), got {self.max_seconds!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{owner}.seed must be an int >= 0, got {self.seed!r}")
        dev = self.device
        ok = isinstance(dev, str) and (
            dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
        )
        if not ok:
            raise ValueError(f"{owner}.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
