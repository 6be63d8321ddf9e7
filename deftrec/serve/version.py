"""A served version: model, index and catalog, validated together and swapped as one object.

The Serve replicas hold exactly one :class:`ServedVersion` at a time and pin every batch to it:
the ids of a request are resolved, the query answered and the answer described (titles) by the
same version, so a swap can never pair a new index with an old catalog. Its parts must belong
together (:func:`check_version_parts`), otherwise it is refused before it is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow.parquet as pq

from deftrec.core.artifacts import ArtifactError, artifact_id, artifact_version, read_manifest
from deftrec.serve.engine import Query, RecommenderEngine, ServingCatalog, UnknownId, history_key

__all__ = ["ServedVersion", "UnknownId", "VersionMismatch", "check_version_parts", "version_identity"]


class VersionMismatch(ArtifactError):
    """The model, index and catalog of a version do not belong together."""


def check_version_parts(model_dir: str | Path, index_dir: str | Path, data_dir: str | Path,
                        catalog: ServingCatalog) -> None:
    """Raise :class:`VersionMismatch` naming every way the parts disagree.

    The index must be built for this model (its ``model_version``, which pins the model's whole
    content, item keys included) over as many items as the model has; the catalog must hold the
    model's items, by id and in order (the export keeps its own ``catalog.parquet``), and be the
    data artifact the model was trained on when the export records it (``inputs.data``).
    """
    mm, im = read_manifest(model_dir), read_manifest(index_dir)
    version, n = artifact_version(model_dir), mm.get("n_items")
    problems = []
    if im.get("model_version") not in (None, version):
        problems.append(f"the index was built for model {im.get('model_version')}, the model is {version}")
    if n is not None and im.get("items") is not None and int(im["items"]) != int(n):
        problems.append(f"the index holds {im['items']} items, the model {n}")
    if n is not None and catalog.n_items != int(n):
        problems.append(f"the catalog holds {catalog.n_items} items, the model {n}")
    elif (Path(model_dir) / "catalog.parquet").is_file():
        ids = [str(x) for x in pq.read_table(Path(model_dir) / "catalog.parquet").sort_by("item")
               .column("item_id").to_pylist()]
        diff = next((i for i, (a, b) in enumerate(zip(ids, catalog.item_ids)) if a != b), None)
        if diff is not None:
            problems.append(f"item {diff} is {catalog.item_ids[diff]!r} in the catalog, {ids[diff]!r} in the model")
    recorded = (mm.get("inputs") or {}).get("data")
    if recorded and recorded != artifact_id(data_dir):
        problems.append(f"the model was trained on data artifact {recorded}, the catalog is {artifact_id(data_dir)}")
    if problems:
        raise VersionMismatch(f"model {model_dir}, index {index_dir} and data {data_dir} do not belong together: "
                              + "; ".join(problems) + ". Nothing was swapped in.")


class ServedVersion:
    """Model + index (:class:`RecommenderEngine`) + catalog (:class:`ServingCatalog`) of one version."""

    def __init__(self, model_dir: str | Path, index_dir: str | Path, data_dir: str | Path,
                 loader: Optional[Callable] = None, ddim_steps: Optional[int] = None,
                 max_history: Optional[int] = None):
        catalog = ServingCatalog(data_dir, max_history)
        check_version_parts(model_dir, index_dir, data_dir, catalog)  # before the (slow) model load
        self.engine = RecommenderEngine(model_dir, index_dir, loader=loader, ddim_steps=ddim_steps)
        self.catalog = catalog
        self.user_offset = len(catalog.user_index) + 1  # anonymous noise keys never collide with users
        self.identity = version_identity(model_dir, index_dir, data_dir, ddim_steps)

    @property
    def versions(self) -> dict:
        e = self.engine
        return {"model_version": e.model_version, "index_version": e.index_version, "items": self.catalog.n_items}

    def query(self, req: Any) -> Query:
        """The :class:`Query` of a validated request (``user_id``, ``history``, ``k``,
        ``exclude_history``, ``explain``); raises :class:`UnknownId` for an id this catalog lacks."""
        cat = self.catalog
        user = cat.user(req.user_id) if req.user_id is not None else None
        # the prompt reads the newest max_history items; exclusion covers the whole history
        seen = cat.items(req.history) if req.history is not None else cat.seen_items(user)
        history = seen[-cat.max_history:]
        key = user if user is not None else history_key(history, self.user_offset)
        return Query(history=history, key=key, user=user, k=min(req.k, cat.n_items),
                     exclude_history=req.exclude_history, explain=req.explain, exclude=seen)

    def describe(self, items: list[tuple[int, float]]) -> list[dict]:
        return [{**self.catalog.describe(i), "score": s} for i, s in items]

    def check(self) -> None:
        self.engine.check()


def version_identity(model_dir: str | Path, index_dir: str | Path, data_dir: str | Path,
                     ddim_steps: Optional[int]) -> tuple:
    """What makes two versions the same: the contents of the three artifacts (not their paths, so
    a model retrained in place is a new version) and the inference override."""
    return (artifact_version(model_dir), artifact_version(index_dir), artifact_id(data_dir), ddim_steps)
