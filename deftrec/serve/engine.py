"""Serving logic without Serve: the catalog lookups and the batched recommender.

Kept apart from the Ray Serve deployments so it can be tested directly and reused; the
deployments in :mod:`deftrec.serve.app` only add HTTP, batching and lifecycle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from deftrec.artifacts.served import load_version
from deftrec.core.artifacts import read_manifest


class UnknownId(KeyError):
    """A user or item id that the catalog does not know (HTTP 404)."""

    def __init__(self, kind: str, value):
        super().__init__(f"unknown {kind} {value!r}")
        self.kind, self.value = kind, value

    def __str__(self) -> str:
        return self.args[0]


class NeedsKnownUser(ValueError):
    """An anonymous request (a history, no user_id) to a model that conditions on user tokens
    (``tokenizer.user_tokens``): there is no user embedding to condition on (HTTP 422)."""


def _id_key(kind: str, value) -> str:
    """The catalog key of an id: strings and integers only. A boolean or a float is never an id
    (``True`` would otherwise match user ``"True"``, ``1.0`` item ``"1.0"``): it is unknown."""
    if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
        raise UnknownId(kind, value)
    return str(value)


class ServingCatalog:
    """Item metadata, id maps and stored user histories of one preprocessed data directory."""

    def __init__(self, data_dir: str | Path, max_history: Optional[int] = None):
        """``max_history`` defaults to the preprocessing's: the history length the model was trained
        and batch-evaluated on (its prompt then reads its own last ``prompt.max_history`` of them)."""
        data_dir = Path(data_dir)
        manifest = read_manifest(data_dir)  # refuses an incomplete directory
        if max_history is None:
            max_history = int(manifest.get("config", {}).get("max_history", 20))
        items = pq.read_table(data_dir / "items.parquet").sort_by("item")
        self.item_ids = [str(x) for x in items.column("item_id").to_pylist()]
        self.titles = items.column("title").to_pylist()
        self.categories = items.column("category").to_pylist()
        self.item_index = {iid: i for i, iid in enumerate(self.item_ids)}
        users = pq.read_table(data_dir / "users.parquet")
        self.user_index = {str(u): int(i) for u, i in zip(users.column("user_id").to_pylist(),
                                                          users.column("user").to_pylist())}
        seq = pq.read_table(data_dir / "sequences.parquet", columns=["user", "items"]).sort_by("user")
        self._seq_users = seq.column("user").to_numpy()
        col = seq.column("items").combine_chunks()
        self._offsets = col.offsets.to_numpy()
        self._values = col.values.to_numpy()
        self.max_history = max_history

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user(self, user_id) -> int:
        key = _id_key("user_id", user_id)
        if key not in self.user_index:
            raise UnknownId("user_id", user_id)
        return self.user_index[key]

    def items(self, item_ids: Sequence) -> np.ndarray:
        out = np.empty(len(item_ids), dtype=np.int64)
        for j, iid in enumerate(item_ids):
            idx = self.item_index.get(_id_key("item_id", iid))
            if idx is None:
                raise UnknownId("item_id", iid)
            out[j] = idx
        return out

    def seen_items(self, user: int) -> np.ndarray:
        """Every stored interaction of the user, oldest first (test item included): what a request
        with ``exclude_history`` leaves out, however long."""
        pos = int(np.searchsorted(self._seq_users, user))
        if pos >= len(self._seq_users) or self._seq_users[pos] != user:
            raise UnknownId("user_id", user)
        s, e = self._offsets[pos], self._offsets[pos + 1]
        return self._values[s:e].astype(np.int64)

    def stored_history(self, user: int) -> np.ndarray:
        """The user's most recent ``max_history`` interactions: what the prompt reads."""
        return self.seen_items(user)[-self.max_history:]

    def describe(self, idx: int) -> dict:
        return {"item_id": self.item_ids[idx], "title": self.titles[idx], "category": self.categories[idx]}


@dataclasses.dataclass
class Query:
    history: np.ndarray  # item indices, oldest first: the whole history (the prompt reads the newest)
    key: int  # noise key: the user index for known users (as in batch evaluation), else a history hash
    user: Optional[int]
    k: int
    exclude_history: bool
    explain: bool
    exclude: Optional[np.ndarray] = None  # items left out with exclude_history (None: the history itself)

    @property
    def excluded(self) -> np.ndarray:
        """What this query's ranking leaves out: nothing, or every item the user is known to have."""
        if not self.exclude_history:
            return np.zeros(0, dtype=np.int64)
        return self.history if self.exclude is None else self.exclude


def history_key(history: np.ndarray, offset: int) -> int:
    """Deterministic noise key for an anonymous history (never collides with user indices)."""
    digest = hashlib.blake2b(np.asarray(history, dtype=np.int64).tobytes(), digest_size=4).digest()
    return offset + int.from_bytes(digest, "little") % (2**30)


class RecommenderEngine:
    """One loaded version (model + index). ``recommend`` serves a whole batch through the shared
    retrieval path (:mod:`deftrec.retrieval.recommender`), one pass per stage."""

    def __init__(self, model_dir: str | Path, index_dir: str | Path, loader: Optional[Callable] = None,
                 ddim_steps: Optional[int] = None):
        # serving may trade quality for latency with fewer DDIM steps (see benchmarks/inference.py)
        self.version = load_version(model_dir, index_dir, loader=loader,
                                    sampler="ddim" if ddim_steps is not None else None, steps=ddim_steps)
        self.model = self.version.model
        self.model_version = self.version.model_version
        self.index_version = self.version.index_version

    def refusal(self, query: Query) -> Optional[str]:
        """Why this version cannot answer ``query`` (None when it can).

        A model trained with user tokens conditions every query on a LightGCN user embedding; an
        anonymous history has none, and no neutral one was trained, so it is refused rather than
        answered as some stored user (the ingress answers 422 with this text).
        """
        if query.user is None and self.version.needs_user_ids:
            return (f"model {self.model_version} conditions on user tokens (tokenizer.user_tokens), so it cannot "
                    "serve an anonymous history: send the user_id of a known user (a history may come with it)")
        return None

    def recommend(self, queries: Sequence[Query]) -> tuple[list[dict], dict]:
        """-> (per query {"items": [(idx, score)], "reasoning"}, stage timings in ms for the batch).

        Raises :class:`NeedsKnownUser` when a query is one this version refuses (:meth:`refusal`);
        callers that batch unrelated requests drop those first."""
        for q in queries:
            if (why := self.refusal(q)) is not None:
                raise NeedsKnownUser(why)
        with torch.inference_mode():  # a little less per-op bookkeeping than no_grad
            return self._recommend(queries)

    def _recommend(self, queries: Sequence[Query]) -> tuple[list[dict], dict]:
        v = self.version
        keys = np.array([q.key for q in queries], dtype=np.int64)
        # read only with user tokens, and then every query has a user (refusal)
        users = np.array([q.user if q.user is not None else -1 for q in queries], dtype=np.int64)
        qs = v.recommender.queries([q.history for q in queries], users=users if v.needs_user_ids else None,
                                   keys=keys, explain=any(q.explain for q in queries))
        t0 = time.perf_counter()
        ids, scores = v.searcher.search(qs.vectors, max(q.k for q in queries),
                                        exclude=[q.excluded for q in queries])
        t_search = time.perf_counter() - t0
        text = qs.reasoning
        out = []
        for r, q in enumerate(queries):
            keep = ids[r, : q.k] >= 0
            out.append({"items": list(zip(ids[r, : q.k][keep].tolist(), scores[r, : q.k][keep].tolist())),
                        "reasoning": text[r] if (text is not None and q.explain) else None})
        # texts_generated: what this batch paid for text generation (0 unless explained or the
        # condition is read from the generated text)
        timings = {"condition": qs.seconds["condition"] * 1e3, "sample": qs.seconds["sample"] * 1e3,
                   "search": t_search * 1e3, "batch_size": float(len(queries)),
                   "texts_generated": float(len(text) if text is not None else 0)}
        return out, timings

    def check(self) -> None:
        """A real end-to-end pass on one short history; raises if anything is wrong."""
        res, _ = self.recommend([Query(np.array([0]), key=0, user=0, k=1, exclude_history=False, explain=False)])
        items = res[0]["items"]
        if len(items) != 1 or not np.isfinite(items[0][1]):
            raise RuntimeError(f"health check returned {items}")
