"""The one retrieval path of DeftRec: validation, batch evaluation and serving all run it.

    history (+ user) --prompt, LLM--> condition c --reverse diffusion--> x0_hat (diffusion space)
        --divide by x0_scale--> query q in the item space --searcher--> top-K items

:meth:`DeftRecRecommender.queries` runs the first three steps for a batch of users. A *searcher*
ranks the catalog for the queries by the configured rule (``eval.score``: -||q - K_i||^2 or
<q, K_i>, K the model's ``retrieval_keys``: LightGCN's E, or the trained W), without the items each
user is to be denied:

- :class:`ExactSearch`: the full score matrix against E in torch (validation, in-process use);
- :class:`IndexSearch`: the FAISS index built by ``pipelines.index`` (batch evaluation, serving).

:func:`inference_overrides` is the one place where a job or a server changes the sampler
settings a model was trained with (sampler, steps, seed).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deftrec.config.model import InferenceConfig
from deftrec.core.config import ConfigError
from deftrec.model.deftrec import (
    DeftRec,
    _cache_kwarg,
    _cache_of,
    _masked_mean,
    _to_device,
    keyed_normal,
)
from deftrec.retrieval.index import search as index_search
from deftrec.retrieval.metrics import Histories
from deftrec.retrieval.metrics import topk as _topk

__all__ = ["DeftRecRecommender", "ExactSearch", "IndexSearch", "Queries", "Recommendations", "inference_overrides"]


@dataclass
class Recommendations:
    """Top-K per user: ``items`` [B, k] (-1 where fewer rankable items), ``scores`` [B, k], and the
    generated reasoning text per user when it was produced."""

    items: np.ndarray
    scores: np.ndarray
    reasoning: list[str] | None = None


@dataclass
class Queries:
    """Retrieval queries of a batch: ``vectors`` [B, d_c] in the item space, the reasoning text
    (when generated) and the seconds spent on the condition and on sampling."""

    vectors: Tensor
    reasoning: list[str] | None
    seconds: dict[str, float]


def inference_overrides(cfg: InferenceConfig, sampler: str | None = None, steps: int | None = None,
                        seed: int | None = None) -> InferenceConfig:
    """``cfg`` with the given sampler settings replaced (None keeps the trained setting). ``ddpm``
    always runs every step; a ``steps`` given alone keeps the sampler."""
    changes: dict[str, Any] = {}
    if sampler is not None:
        changes["sampler"] = sampler
    if sampler == "ddpm":
        changes["steps"] = None
    elif steps is not None:
        changes["steps"] = int(steps)
    if seed is not None:
        changes["seed"] = int(seed)
    try:
        return dataclasses.replace(cfg, **changes) if changes else cfg
    except ValueError as e:  # __post_init__ refused the caller's settings (e.g. ddim without steps)
        raise ConfigError(str(e)) from e


def _exclusion_pairs(exclude: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) of every entry of the per-row exclusion lists, vectorised where the container allows it."""
    if hasattr(exclude, "flat"):
        return exclude.flat()
    arrays = [np.asarray(h, dtype=np.int64).reshape(-1) for h in exclude]
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    if lengths.sum() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.repeat(np.arange(len(arrays)), lengths), np.concatenate(arrays)


class ExactSearch:
    """Exact ranking of the whole catalog against the item matrix E (torch, on the model's device)."""

    def __init__(self, item_emb: Tensor, metric: str = "l2") -> None:
        if metric not in ("l2", "ip"):
            raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
        self.E, self.metric = item_emb, metric

    def scores(self, q: Tensor) -> Tensor:
        """Scores [B, n_items] of queries ``q`` (item space)."""
        q = q.to(self.E.device, torch.float32)
        E = self.E.float()
        if self.metric == "ip":
            return q @ E.T
        # -||q - E_i||^2 = 2 <q, E_i> - ||E_i||^2 - ||q||^2
        return 2.0 * (q @ E.T) - E.pow(2).sum(1)[None, :] - q.pow(2).sum(1, keepdim=True)

    def search(self, q: Tensor, k: int, exclude: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        sc = self.scores(q)
        if exclude is not None:
            rows, cols = _exclusion_pairs(exclude)
            sc[torch.as_tensor(rows, device=sc.device), torch.as_tensor(cols, device=sc.device)] = float("-inf")
        return _topk(sc.cpu().numpy(), k)


class IndexSearch:
    """Ranking through a FAISS index of the item keys (``metric`` as recorded in its manifest)."""

    def __init__(self, index: Any, metric: str) -> None:
        self.index, self.metric = index, metric

    def search(self, q: Tensor, k: int, exclude: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        vectors = q.detach().float().cpu().numpy()
        return index_search(self.index, vectors, k, self.metric,
                            exclude=None if exclude is None else [np.asarray(e, dtype=np.int64) for e in exclude])


class DeftRecRecommender:
    """Batched inference over a trained :class:`DeftRec` (see the module docstring for the steps)."""

    def __init__(self, model: DeftRec, cfg: InferenceConfig | None = None) -> None:
        self.model = model
        self.cfg = cfg if cfg is not None else model.cfg.eval
        T = model.head.cfg.T
        if self.cfg.sampler == "ddim" and self.cfg.steps > T:
            raise ConfigError(f"eval.steps ({self.cfg.steps}) must be <= diffusion.T ({T})")
        if self.cfg.guidance_w > 0 and model.head.cfg.cond_dropout == 0:
            raise ConfigError("guidance_w > 0 needs a model trained with diffusion.cond_dropout > 0")
        with torch.no_grad():
            self.exact = ExactSearch(model.retrieval_keys.detach(), self.cfg.score)

    # -- step 1-3: prompt -> (reasoning) -> condition
    @torch.no_grad()
    def conditions(self, histories: Histories, users: Sequence[int] | np.ndarray | None = None,
                   explain: bool = False) -> tuple[Tensor, list[str] | None]:
        """Condition vectors [B, d_llm] and, if text was generated, the reasoning strings."""
        m = self.model
        batch = _to_device(m.make_batch(histories, users=users, generation=True), m.device)
        embeds = m.embed(batch)
        kind = m.cfg.condition
        generate = kind not in ("prompt_state", "item_states") or explain
        out = m.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=generate)
        h_last = out.last_hidden_state[:, -1]  # left padding: every prompt ends at the last column
        state = m.last_item_states(batch, out.last_hidden_state) if kind == "item_states" else h_last.float()
        if not generate:
            return state, None
        tokens, keep, tok_embeds, tok_hidden = self._greedy(batch, h_last, _cache_of(out),
                                                            need_hidden=kind == "hidden_states")
        if kind in ("prompt_state", "item_states"):
            cond = state
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
        if not head.cfg.noise:  # the no-diffusion ablation: the head's output is the query
            return head.direct_x0(cond.to(m.device))
        keys = torch.as_tensor(np.asarray(keys, dtype=np.int64))
        d_c, dev = head.cfg.d_c, m.device
        total = None
        for draw in range(self.cfg.samples):  # draw d uses seed + d: draw 0 is the single-sample query
            s = seed + draw
            x = keyed_normal(s, keys, stream=0, dim=d_c).to(dev)
            x0 = head.reverse(x, cond.to(dev), self.cfg.sampler, self.cfg.steps, self.cfg.guidance_w, self.cfg.eta,
                              noise=lambda step, s=s: keyed_normal(s, keys, stream=step + 1, dim=d_c).to(dev))
            total = x0 if total is None else total + x0
        return total / self.cfg.samples

    # -- steps 1-4 and the rescale: one batch of queries
    @torch.no_grad()
    def queries(self, histories: Histories, users: Sequence[int] | np.ndarray | None = None,
                keys: Sequence[int] | np.ndarray | None = None, explain: bool = False,
                seed: int | None = None) -> Queries:
        """Queries in the item space for a batch. Noise is keyed by ``keys`` (default: ``users``,
        else positions), so a user gets the same draw alone or in any batch."""
        n = len(histories)
        keys = self._keys(n, users if keys is None else keys)
        t0 = time.perf_counter()
        cond, text = self.conditions(histories, users=users, explain=explain)
        t1 = time.perf_counter()
        x = self.sample(cond, keys, seed).float() / self.model.x0_scale
        t2 = time.perf_counter()
        return Queries(x, text, {"condition": t1 - t0, "sample": t2 - t1})

    @torch.no_grad()
    def scores(self, x0: Tensor) -> Tensor:
        """Scores [B, n_items] of x0_hat (scaled space) against the retrieval keys (item space)."""
        return self.exact.scores(x0.float() / self.model.x0_scale)

    def _keys(self, n: int, users) -> np.ndarray:
        keys = np.arange(n, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64).reshape(-1)
        if keys.size != n:
            raise ValueError(f"got {keys.size} users for {n} histories")
        return keys

    def _chunks(self, n: int, batch_size: int | None):
        bs = batch_size or self.cfg.batch_size
        return ((s, min(s + bs, n)) for s in range(0, n, bs))

    @torch.no_grad()
    def score_users(self, histories: Histories, users: Sequence[int] | np.ndarray | None = None,
                    seed: int | None = None, batch_size: int | None = None) -> np.ndarray:
        """Full score matrix [len(histories), n_items] (float32), computed ``batch_size`` users at a time.

        Noise is keyed by ``users`` (positions when None). Suitable as ``score_fn`` of
        :func:`deftrec.retrieval.metrics.evaluate_in_chunks` (through a closure over the histories).
        """
        n = len(histories)
        keys = self._keys(n, users)
        out = np.empty((n, self.model.n_items), dtype=np.float32)
        with _eval_mode(self.model):
            for s, e in self._chunks(n, batch_size):
                q = self.queries(histories[s:e], users=None if users is None else keys[s:e], keys=keys[s:e], seed=seed)
                out[s:e] = self.exact.scores(q.vectors).cpu().numpy()
        return out

    @torch.no_grad()
    def recommend(self, histories: Histories, users: Sequence[int] | np.ndarray | None = None, k: int = 10,
                  exclude_history: bool | None = None, explain: bool = False, seed: int | None = None,
                  batch_size: int | None = None, searcher: ExactSearch | IndexSearch | None = None,
                  exclude: Sequence[Any] | None = None) -> Recommendations:
        """Top-``k`` items per user. With ``exclude_history`` (default from the config) the ranking
        leaves out ``exclude[i]`` (default: the histories themselves; pass the whole sequence when the
        histories are the prompt's truncated window). ``explain=True`` also returns the generated
        reasoning text. ``searcher``: exact search against E (default) or a FAISS :class:`IndexSearch`."""
        n = len(histories)
        keys = self._keys(n, users)
        if exclude is not None and len(exclude) != n:
            raise ValueError(f"got {len(exclude)} exclusion lists for {n} histories")
        if not 1 <= k <= self.model.n_items:
            raise ValueError(f"k must be in [1, {self.model.n_items}], got {k}")
        excl = self.cfg.exclude_history if exclude_history is None else exclude_history
        searcher = searcher or self.exact
        items, scores, texts = [], [], []
        with _eval_mode(self.model):
            for s, e in self._chunks(n, batch_size):
                chunk = histories[s:e]
                q = self.queries(chunk, users=None if users is None else keys[s:e], keys=keys[s:e],
                                 explain=explain, seed=seed)
                banned = (chunk if exclude is None else exclude[s:e]) if excl else None
                it, v = searcher.search(q.vectors, k, exclude=banned)
                items.append(it), scores.append(v)
                if q.reasoning is not None:
                    texts.extend(q.reasoning)
        return Recommendations(np.concatenate(items), np.concatenate(scores), texts if explain else None)


class _eval_mode:
    """Run a block with the model in eval mode and restore its previous mode afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
