"""A servable version: one model export and the FAISS index built for it, loaded together.

Batch evaluation and serving both load their recommender through :func:`load_version`, so they
run the same retrieval path (:mod:`deftrec.retrieval.recommender`) with the same index, the same
inference overrides and the same version pinning (an index built for another model is refused).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deftrec.config.jobs import IndexConfig
from deftrec.core.config import from_dict
from deftrec.core.artifacts import (
    ArtifactError,
    artifact_version,
    is_complete,
    read_manifest,
)
from deftrec.retrieval.index import load_index
from deftrec.retrieval.recommender import (
    DeftRecRecommender,
    IndexSearch,
    inference_overrides,
)

__all__ = ["LoadedVersion", "load_version"]


def _load_model(model_dir: str) -> Any:
    """The export on this process's GPU when Ray gave it one (an actor or replica with ``num_gpus``;
    Ray hides the GPUs from the others), else on the CPU."""
    import torch

    from deftrec.artifacts.model import load_model

    return load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedVersion:
    """Model + index of one version, ready to answer queries."""

    model: Any  # deftrec.model.deftrec.DeftRec, in eval mode
    recommender: DeftRecRecommender
    searcher: IndexSearch
    model_version: str
    index_version: str
    load_seconds: float

    @property
    def needs_user_ids(self) -> bool:
        """Whether every query must name a known user (user tokens from LightGCN's user vectors)."""
        return self.model.cfg.tokenizer.needs_user_ids


def load_version(model_dir: str | Path, index_dir: str | Path, *, loader: Callable[[str], Any] | None = None,
                 sampler: str | None = None, steps: int | None = None, seed: int | None = None) -> LoadedVersion:
    """Load the export in ``model_dir`` and the index in ``index_dir`` (raises ArtifactError when either
    is incomplete or the index was built for another model). ``sampler``/``steps``/``seed`` override
    the trained inference settings (:func:`~deftrec.retrieval.recommender.inference_overrides`)."""
    t0 = time.time()
    for d, what in ((model_dir, "model export (pipelines.train)"), (index_dir, "index (pipelines.index)")):
        if not is_complete(d):
            raise ArtifactError(f"{d}: no complete {what}; run that stage first")
    version = artifact_version(model_dir)
    im = read_manifest(index_dir)
    if im.get("model_version") not in (None, version):
        raise ArtifactError(f"{index_dir} was built for model {im.get('model_version')}, not {version}; "
                            "rebuild it (pipelines.index)")
    model = (loader or _load_model)(str(model_dir))
    model.eval()
    rec = DeftRecRecommender(model, inference_overrides(model.cfg.eval, sampler, steps, seed))
    searcher = IndexSearch(load_index(index_dir, from_dict(IndexConfig, im["config"], "index")), im["metric"])
    return LoadedVersion(model, rec, searcher, version, str(im.get("version")), time.time() - t0)
