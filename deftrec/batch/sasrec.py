"""SASRec (Kang & McAuley, ICDM 2018): the neural sequential baseline reported beside DeftRec.

It follows the :class:`deftrec.batch.baselines.Baseline` protocol: ``fit(train_sequences, n_items)``
then ``score(histories) -> float32 [U, n_items]`` (higher = better), so ``run_baselines`` evaluates
it like popularity, Markov and EASE.

Model (:class:`SASRecNet`): item embeddings (id 0 is padding, item ``i`` is row ``i + 1``) scaled by
``sqrt(dim)`` plus learned positional embeddings, ``blocks`` pre-LayerNorm Transformer blocks
(multi-head self-attention under a causal + padding mask, point-wise feed-forward, dropout,
residuals), a final LayerNorm; the score of item ``i`` after position ``t`` is ``h_t . E_i`` with
the same embedding table as the input (shared embeddings). Sequences are left-padded and
positions are counted from the right, so the newest item always has the same position.

Training protocol (:meth:`SASRec.fit`): every user contributes its last ``max_len + 1`` items, and
every non-padding position is trained to predict the next item with full-softmax cross-entropy
over the whole catalog (no sampled negatives: Klenitskiy & Vasilev, RecSys 2023, show this is
what makes SASRec strong) up to ``negatives`` items, and against that many sampled negatives on a
larger catalog. For early stopping, the LAST item of every training sequence is held out: the
model trains on the sequence without it, and every ``eval_every`` epochs the held-out items are
ranked from the rest of the sequence (NDCG@10, history excluded, with the project's metrics code)
for at most ``valid_users`` users (a fixed seeded subset, so that a validation's users x items
scoring stays bounded); users whose sequence would then be shorter than 2 items are trained on
whole and not validated. The best validated weights are kept and restored; training stops after
``patience`` validations without gain, at ``max_epochs`` or after ``max_seconds``.

Defaults (:class:`deftrec.config.baselines.SASRecConfig`), one setting for every dataset: the
reference's 2 blocks of width 64 and 1 head, dropout 0.2, Adam(W) at 1e-3 with batches of 128 users
(the usual full-softmax SASRec settings), validation every epoch with patience 5. ``max_len`` 200
rather than 50, by measurement (test NDCG@10, history excluded): ml1m (137 items per user on
average) reaches 0.144 within the 25-minute cap (reference 0.143) and validates higher per epoch
than with 50; lastfm gives 0.042 with 200 and 0.043 with 50 (reference 0.043); software and the
synthetic data are unaffected (their sequences are short, and every batch is cut to its longest
row, so a long ``max_len`` costs nothing there). ``max_seconds`` 1500 bounds ml1m on 2 CPU cores;
note that the ml1m figure therefore depends on throughput. Runs are repeatable for a seed on CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deftrec.batch.baselines import _check_n_items
from deftrec.config.baselines import SASRecConfig
from deftrec.model.softmax import draw_negatives, mixed_sampling_probs, sampled_softmax_ce, uses_sampled_softmax
from deftrec.retrieval.metrics import _flatten_histories, evaluate_in_chunks

__all__ = ["SASRecNet", "SASRec"]

_SCORE_BATCH = 256  # users per forward pass when scoring
_EVAL_KS = (10,)


# --------------------------------------------------------------------------- model


class _Block(nn.Module):
    """Pre-LN Transformer block: x + attn(LN(x)), then + ffn(LN(x)), dropout on both branches."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln_attn, self.ln_ff = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.ln_attn(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, heads, n, d/heads]
        p = self.p if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff(self.ln_ff(x)))


class SASRecNet(nn.Module):
    """The network: ``hidden(seq)`` [B, L, dim] for left-padded ids (0 = pad, item i = i + 1)."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.scale = math.sqrt(cfg.dim)
        self.item = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        nn.init.normal_(self.item.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.item.weight[0].zero_()
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg.dim, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))
        self.ln = nn.LayerNorm(cfg.dim)

    def hidden(self, seq: torch.Tensor) -> torch.Tensor:
        n = seq.shape[1]
        real = seq > 0
        x = self.item(seq) * self.scale + self.pos.weight[self.pos.num_embeddings - n:]
        x = self.drop(x) * real[..., None]
        # Causal + padding mask; every position may see itself, so no row is fully masked (no NaN).
        eye = torch.eye(n, dtype=torch.bool, device=seq.device)
        allowed = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril() & (real[:, None, :] | eye)
        allowed = allowed[:, None]  # [B, 1, n, n], broadcast over heads
        for block in self.blocks:
            x = block(x, allowed) * real[..., None]
        return self.ln(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scores [..., n_items] of hidden states h [..., dim] against the shared item embeddings."""
        return h @ self.item.weight[1:].T


# --------------------------------------------------------------------------- helpers


def _as_arrays(sequences: Sequence[Any], n_items: int, what: str) -> list[np.ndarray]:
    _flatten_histories(sequences, n_items, what)  # validates ids
    return [np.asarray(s).astype(np.int64, copy=False).reshape(-1) for s in sequences]


def _left_padded(seqs: Sequence[np.ndarray], width: int) -> np.ndarray:
    """[U, width] int64: the last ``width`` items of each row, shifted by +1, right-aligned, 0-padded."""
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        tail = s[-width:] if s.size else s
        if tail.size:
            out[row, width - tail.size:] = tail + 1
    return out


def _trim(mat: np.ndarray) -> np.ndarray:
    """Drop the all-padding leading columns of a right-aligned batch (its longest row sets the width)."""
    used = np.flatnonzero((mat > 0).any(axis=0))
    return mat[:, used[0]:] if used.size else mat[:, -1:]


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- baseline


class SASRec:
    """SASRec as a :class:`deftrec.batch.baselines.Baseline`; see the module docstring.

    After ``fit``: ``model_`` (the restored best network), ``history_`` (one dict per
    validation: epoch, loss, ndcg@10, seconds), ``best_epoch_``, ``best_ndcg_``, ``epochs_``
    (epochs run), ``stop_reason_`` ("patience", "max_epochs", "max_seconds" or "no_data") and
    ``train_seconds_``.
    """

    def __init__(self, cfg: SASRecConfig | None = None, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg if cfg is not None else SASRecConfig()
        self.log = log
        self.model_: SASRecNet | None = None
        self.n_items_: int | None = None
        self.history_: list[dict[str, float]] = []
        self._neg_probs: torch.Tensor | None = None  # sampled negatives' draw probabilities (None: uniform)
        self.best_epoch_ = 0
        self.best_ndcg_ = float("nan")
        self.epochs_ = 0
        self.stop_reason_ = ""
        self.train_seconds_ = 0.0

    def __repr__(self) -> str:
        return f"SASRec({self.cfg!r})"

    # ----------------------------------------------------------------------- fit

    def fit(self, train_sequences: Sequence[Any], n_items: int) -> "SASRec":
        n = _check_n_items(n_items)
        seqs = _as_arrays(train_sequences, n, "training")
        cfg = self.cfg
        held = [s.size >= 3 for s in seqs]  # held out: the rest keeps >= 2 items
        train = [s[:-1] if h else s for s, h in zip(seqs, held)]
        train = [s for s in train if s.size >= 2]  # a single item predicts nothing
        valid_rows = np.flatnonzero(held)
        if cfg.valid_users is not None and valid_rows.size > cfg.valid_users:  # a validation scores users x items
            valid_rows = np.sort(np.random.default_rng(cfg.seed).choice(valid_rows, cfg.valid_users, replace=False))
        valid_hist = [seqs[r][:-1] for r in valid_rows]
        valid_targets = np.array([seqs[r][-1] for r in valid_rows], dtype=np.int64)
        device = _resolve_device(cfg.device)
        rng_devices = [] if device.type != "cuda" else [
            device.index if device.index is not None else torch.cuda.current_device()]
        with _torch_threads(cfg.threads), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(cfg.seed)
            model = SASRecNet(n, cfg).to(device)
            self.model_, self.n_items_ = model, n
            self.history_ = []
            self._neg_probs = None
            if cfg.negative_sampler == "mixed" and uses_sampled_softmax(cfg.negatives, n):
                counts = np.bincount(np.concatenate(train), minlength=n) if train else np.zeros(n)
                self._neg_probs = mixed_sampling_probs(torch.from_numpy(counts)).to(device)
            self._train(model, _left_padded(train, cfg.max_len + 1), valid_hist, valid_targets)
        return self

    def _validate(self, model: SASRecNet, histories: list[np.ndarray], targets: np.ndarray) -> float:
        """NDCG@10 of the held-out items, history excluded (the project's metrics code)."""
        if not len(histories):
            return float("nan")
        res = evaluate_in_chunks(lambda idx: self._scores(model, [histories[i] for i in idx]),
                                 np.arange(len(histories)), targets, histories, 1024, _EVAL_KS)
        return res["history_excluded"]["ndcg@10"]

    def _loss(self, model: SASRecNet, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the next items: full softmax, or against ``negatives`` sampled items."""
        n_items = model.item.num_embeddings - 1
        if not uses_sampled_softmax(self.cfg.negatives, n_items):
            return F.cross_entropy(model.logits(h), targets)
        probs = self._neg_probs
        neg_ids, neg_log_q = draw_negatives(n_items, self.cfg.negatives, h.device, probs=probs)
        items = model.item.weight[1:]
        return sampled_softmax_ce((h * items[targets]).sum(1), h @ items[neg_ids].T, targets, neg_ids, neg_log_q,
                                  probs)

    def _epoch(self, model: SASRecNet, opt: torch.optim.Optimizer, mat: np.ndarray,
               rng: np.random.Generator, deadline: float) -> tuple[float, bool]:
        """One pass in random order; returns (mean loss per position, whether the deadline passed)."""
        model.train()
        device = next(model.parameters()).device
        order = rng.permutation(mat.shape[0])
        total, count = 0.0, 0
        for start in range(0, order.size, self.cfg.batch_size):
            batch = torch.from_numpy(_trim(mat[order[start:start + self.cfg.batch_size]])).to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            real = inputs > 0  # right-aligned rows: a real input always has a real next item
            loss = self._loss(model, model.hidden(inputs)[real], targets[real] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            positions = int(real.sum())
            total, count = total + loss.item() * positions, count + positions
            if time.perf_counter() > deadline:
                return total / max(count, 1), True
        return total / max(count, 1), False

    def _train(self, model: SASRecNet, mat: np.ndarray, valid_hist: list[np.ndarray],
               valid_targets: np.ndarray) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        deadline = t0 + cfg.max_seconds if cfg.max_seconds is not None else math.inf
        if mat.shape[0] == 0:
            self.stop_reason_, self.epochs_, self.train_seconds_ = "no_data", 0, 0.0
            return
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        rng = np.random.default_rng(cfg.seed)
        best_state, best, best_epoch, bad = None, -math.inf, 0, 0
        reason, epoch = "max_epochs", 0
        for epoch in range(1, cfg.max_epochs + 1):
            loss, timed_out = self._epoch(model, opt, mat, rng, deadline)
            if not (epoch % cfg.eval_every == 0 or timed_out or epoch == cfg.max_epochs):
                continue
            ndcg = self._validate(model, valid_hist, valid_targets)
            if math.isnan(ndcg) or ndcg > best:  # nothing to validate on: keep the newest weights
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best, best_epoch, bad = ndcg, epoch, 0
            else:
                bad += 1
            elapsed = time.perf_counter() - t0
            self.history_.append({"epoch": epoch, "loss": loss, "ndcg@10": ndcg, "seconds": elapsed})
            if self.log is not None:
                self.log(f"[sasrec] epoch {epoch} loss {loss:.3f} valid NDCG@10 {ndcg:.4f} "
                         f"(best {best:.4f} @ {best_epoch}) {elapsed:.1f}s")
            if timed_out:
                reason = "max_seconds"
                break
            if bad >= cfg.patience:
                reason = "patience"
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        self.best_epoch_, self.best_ndcg_, self.epochs_ = best_epoch, best, epoch
        self.stop_reason_, self.train_seconds_ = reason, time.perf_counter() - t0

    # ----------------------------------------------------------------------- score

    @torch.no_grad()
    def _scores(self, model: SASRecNet, histories: Sequence[np.ndarray]) -> np.ndarray:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = np.zeros((len(histories), self.n_items_), dtype=np.float32)
        for start in range(0, len(histories), _SCORE_BATCH):
            chunk = histories[start:start + _SCORE_BATCH]
            mat = _left_padded(chunk, self.cfg.max_len)
            rows = np.flatnonzero(mat[:, -1] > 0)  # empty histories keep the constant row 0
            if rows.size:
                seq = torch.from_numpy(_trim(mat[rows])).to(device)
                logits = model.logits(model.hidden(seq)[:, -1])
                out[start + rows] = logits.float().cpu().numpy()
        model.train(was_training)
        return out

    def score(self, histories: Sequence[Any]) -> np.ndarray:
        if self.model_ is None or self.n_items_ is None:
            raise RuntimeError("SASRec must be fit before scoring")
        hist = _as_arrays(histories, self.n_items_, "history")
        with _torch_threads(self.cfg.threads):
            return self._scores(self.model_, hist)
