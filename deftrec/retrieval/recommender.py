"""deftrec.retrieval.recommender."""

from __future__ import annotations
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
import numpy as np
import torch
from torch import Tensor
from deftrec.config.model import InferenceConfig
from deftrec.retrieval.metrics import topk as _topk
if TYPE_CHECKING:

    pass
from deftrec.model.deftrec import DeftRec
from deftrec.model.deftrec import _cache_kwarg
from deftrec.model.deftrec import _cache_of
from deftrec.model.deftrec import _masked_mean
from deftrec.model.deftrec import _to_device
from deftrec.model.deftrec import keyed_normal
from deftrec.retrieval.metrics import Histories


@dataclass
class Recommendations:
    """Top-K per user: ``items`` [B, k] (-1 where fewer rankable items), ``scores`` [B, k], and the
    generated reasoning text per user when it was produced."""

    items: np.ndarray
    scores: np.ndarray
    reasoning: list[str] | None = None


class DeftRecRecommender:
    """Batched inference over a trained :class:`DeftRec` (see the module docstring for the steps)."""

    def __init__(self, model: DeftRec, cfg: InferenceConfig | None = None) -> None:
        self.model = model
        self.cfg = cfg if cfg is not None else model.cfg.eval
        T = model.head.cfg.T
        if self.cfg.sampler == "ddim" and self.cfg.steps > T:
            raise ValueError(f"eval.steps ({self.cfg.steps}) must be <= diffusion.T ({T})")
        if self.cfg.guidance_w > 0 and model.head.cfg.cond_dropout == 0:
            raise ValueError("guidance_w > 0 needs a model trained with diffusion.cond_dropout > 0")

    # -- step 1-3: prompt -> (reasoning) -> condition
    @torch.no_grad()
    def conditions(self, histories: Histories, users: Sequence[int] | np.ndarray | None = None,
                   explain: bool = False) -> tuple[Tensor, list[str] | None]:
        """Condition vectors [B, d_llm] and, if text was generated, the reasoning strings."""
        m = self.model
        batch = _to_device(m.make_batch(histories, users=users, generation=True), m.device)
        embeds = m.embed(batch)
        kind = m.cfg.condition
        generate = kind != "prompt_state" or explain
        out = m.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=generate)
        h_last = out.last_hidden_state[:, -1]  # left padding: every prompt ends at the last column
        if not generate:
            return h_last.float(), None
        tokens, keep, tok_embeds, tok_hidden = self._greedy(batch, h_last, _cache_of(out),
                                                            need_hidden=kind == "hidden_states")
        if kind == "prompt_state":
            cond = h_last.float()
        elif kind == "response_embeddings":
            cond = _masked_mean(tok_embeds.float(), keep)
        else:
            cond = _masked_mean(tok_hidden.float(), keep)
        rows = tokens.masked_fill(~keep, -1).tolist()
        text = m.text_tokenizer.batch_decode([[t for t in r if t >= 0] for r in rows], skip_special_tokens=True)
        return cond, [s.strip() for s in text]

    def _greedy(self, batch: dict[str, Tensor], h_last: Tensor, cache: Any, need_hidden: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Batched greedy decoding with the KV cache, continuing a left-padded prompt.

        Returns generated ids [B, G], ``keep`` [B, G] (response tokens: before eos, eos excluded,
        like ``response_mask`` in training), their input embeddings and (if asked) their last
        hidden states, i.e. the states a teacher-forced pass over prompt + text would give.
        """
        m = self.model
        tok = m.text_tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        emb_layer = m.llm.get_input_embeddings()
        lm_head = m.llm.get_output_embeddings()
        mask = batch["attention_mask"]
        pos = batch["position_ids"][:, -1]
        B = mask.shape[0]
        finished = torch.zeros(B, dtype=torch.bool, device=mask.device)
        decoder = m.decoder
        cache_kw = _cache_kwarg(decoder)
        ids, keeps, embs, hids = [], [], [], []
        for step in range(self.cfg.max_gen_tokens):
            nxt = lm_head(h_last).argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            is_eos = (nxt == eos) & ~finished
            keep = ~finished & ~is_eos
            finished = finished | is_eos
            e = emb_layer(nxt)
            ids.append(nxt), keeps.append(keep), embs.append(e)
            last = step == self.cfg.max_gen_tokens - 1
            if bool(finished.all()) or (last and not need_hidden):
                if need_hidden:
                    hids.append(torch.zeros_like(h_last))  # only eos / padding here: never pooled
                break
            # Tokens after eos are masked out of attention; the rows are finished anyway.
            mask = torch.cat([mask, keep.long()[:, None]], dim=1)
            pos = pos + 1
            out = decoder(inputs_embeds=e[:, None], attention_mask=mask, position_ids=pos[:, None],
                          use_cache=True, **{cache_kw: cache})
            cache = _cache_of(out)
            h_last = out.last_hidden_state[:, -1]
            hids.append(h_last)  # hidden state *of* token nxt
        hidden = torch.stack(hids, 1) if need_hidden else None
        return torch.stack(ids, 1), torch.stack(keeps, 1), torch.stack(embs, 1), hidden

    # -- step 4: reverse diffusion
    @torch.no_grad()
    def sample(self, cond: Tensor, keys: Tensor | np.ndarray, seed: int | None = None) -> Tensor:
        """x0_hat [B, d_c] in the diffusion (scaled) space; noise keyed by (seed, key, step)."""
        m = self.model
        head = m.head
        seed = self.cfg.seed if seed is None else int(seed)
        keys = torch.as_tensor(np.asarray(keys, dtype=np.int64))
        d_c, dev = head.cfg.d_c, m.device
        x = keyed_normal(seed, keys, stream=0, dim=d_c).to(dev)
        return head.reverse(x, cond.to(dev), self.cfg.sampler, self.cfg.steps, self.cfg.guidance_w, self.cfg.eta,
                            noise=lambda step: keyed_normal(seed, keys, stream=step + 1, dim=d_c).to(dev))

    # -- step 5: scores
    @torch.no_grad()
    def scores(self, x0: Tensor) -> Tensor:
        """Scores [B, n_items] of x0_hat (scaled space) against E in the original space."""
        m = self.model
        x = x0.float() / m.x0_scale
        E = m.item_emb
        if self.cfg.score == "ip":
            return x @ E.T
        # -||x - E_i||^2 = 2 <x, E_i> - ||E_i||^2 - ||x||^2
        return 2.0 * (x @ E.T) - E.pow(2).sum(1)[None, :] - x.pow(2).sum(1, keepdim=True)

    def _keys(self, n: int, users) -> np.ndarray:
        return np.arange(n, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64).reshape(-1)

    @torch.no_grad()
    def score_users(self, histories: Histories, users: Sequence[int] | np.ndarray | None = None,
                    seed: int | None = None, batch_size: int | None = None) -> np.ndarray:
        """Full score matrix [len(histories), n_items] (float32), computed ``batch_size`` users at a time.

        Noise is keyed by ``users`` (positions when None). Suitable as ``score_fn`` of
        :func:`deftrec.metrics.evaluate_in_chunks` (through a closure over the histories).
        """
        n = len(histories)
        keys = self._keys(n, users)
        if keys.size != n:
            raise ValueError(f"got {keys.size} users for {n} histories")
        bs = batch_size or self.cfg.batch_size
        was_training = self.model.training
        self.model.eval()
        try:
            out = np.empty((n, self.model.n_items), dtype=np.float32)
            for s in range(0, n, bs):
                e = min(s + bs, n)
                u = None if users is None else keys[s:e]
                cond, _ = self.conditions(histories[s:e], users=u)
                out[s:e] = self.scores(self.sample(cond, keys[s:e], seed)).cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def recommend(self, histories: Histories, users: Sequence[int] | np.ndarray | None = None, k: int = 10,
                  exclude_history: bool | None = None, explain: bool = False, seed: int | None = None,
                  batch_size: int | None = None) -> Recommendations:
        """Top-``k`` items per user (history items removed when ``exclude_history``, default from
        the config). ``explain=True`` also returns the generated reasoning text."""
        n = len(histories)
        keys = self._keys(n, users)
        if keys.size != n:
            raise ValueError(f"got {keys.size} users for {n} histories")
        if not 1 <= k <= self.model.n_items:
            raise ValueError(f"k must be in [1, {self.model.n_items}], got {k}")
        excl = self.cfg.exclude_history if exclude_history is None else exclude_history
        bs = batch_size or self.cfg.batch_size
        items, scores, texts = [], [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, n, bs):
                e = min(s + bs, n)
                chunk = histories[s:e]
                u = None if users is None else keys[s:e]
                cond, text = self.conditions(chunk, users=u, explain=explain)
                sc = self.scores(self.sample(cond, keys[s:e], seed))
                if excl:
                    rows, cols = _flat_pairs(chunk)
                    sc[torch.as_tensor(rows, device=sc.device), torch.as_tensor(cols, device=sc.device)] = float("-inf")
                it, v = _topk(sc.cpu().numpy(), k)
                items.append(it), scores.append(v)
                if text is not None:
                    texts.extend(text)
        finally:
            self.model.train(was_training)
        return Recommendations(np.concatenate(items), np.concatenate(scores), texts if explain else None)


def _flat_pairs(histories: Histories) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) of every history entry, vectorised where the container allows it."""
    if hasattr(histories, "flat"):
        return histories.flat()
    arrays = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    if lengths.sum() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.repeat(np.arange(len(arrays)), lengths), np.concatenate(arrays)
