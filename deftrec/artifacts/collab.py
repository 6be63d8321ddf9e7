"""The collaborative-embedding artifact (method.md section 1): save, load and its fingerprint.

Artifact layout (``RUN_DIR/collab``), written atomically with :func:`deftrec.core.artifacts.atomic_directory`
and a manifest written last, so an interrupted job never leaves a directory that looks finished::

    user_emb.npy      U [n_users, d_c] float32
    item_emb.npy      E [n_items, d_c] float32 (DeftRec's diffusion target and retrieval space)
    config.json       the LightGCNConfig used
    history.json      one record per epoch: loss, and HR@10 on evaluated epochs
    manifest.json     status, fingerprint (config + data), shapes, best HR@10, checksums

The LightGCN Ray Train job that writes it is :mod:`deftrec.training.collab_job`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deftrec.config.components import LightGCNConfig
from deftrec.core.artifacts import (
    ArtifactError,
    artifact_id,
    atomic_directory,
    finish_manifest,
    read_manifest,
    stage_fingerprint,
)
from deftrec.core.config import from_dict, to_dict

__all__ = ["CollabArtifact", "collab_fingerprint", "load_collab", "save_collab"]

_FILES = ("user_emb.npy", "item_emb.npy", "config.json", "history.json")


@dataclass(frozen=True, eq=False)
class CollabArtifact:
    """A loaded collaborative-embedding artifact."""

    user_emb: np.ndarray  # U [n_users, d_c]
    item_emb: np.ndarray  # E [n_items, d_c]
    config: LightGCNConfig
    history: list[dict]
    manifest: dict

    @property
    def best_hr10(self) -> float | None:
        hrs = [h["hr@10"] for h in self.history if "hr@10" in h]
        return max(hrs) if hrs else None


def collab_fingerprint(cfg: LightGCNConfig, data_dir: str | Path) -> str:
    """The collab stage's identity: the LightGCN config (device excluded) and the preprocessed data."""
    c = to_dict(cfg)
    c.pop("device", None)
    return stage_fingerprint(c, {"data": artifact_id(data_dir)})


def save_collab(out_dir: str | Path, user_emb: np.ndarray, item_emb: np.ndarray, cfg: LightGCNConfig,
                history: list[dict], extra: dict[str, Any] | None = None, overwrite: bool = True) -> dict:
    """Write the artifact atomically; returns the manifest."""
    U = np.ascontiguousarray(user_emb, dtype=np.float32)
    E = np.ascontiguousarray(item_emb, dtype=np.float32)
    if U.ndim != 2 or E.ndim != 2 or U.shape[1] != E.shape[1]:
        raise ValueError(f"need U [n_users, d] and E [n_items, d], got {U.shape} and {E.shape}")
    if U.shape[1] != cfg.dim:
        raise ValueError(f"embeddings have d={U.shape[1]}, the config dim={cfg.dim}")
    if not (np.isfinite(U).all() and np.isfinite(E).all()):
        raise ValueError("embeddings contain non-finite values")
    hrs = [h["hr@10"] for h in history if "hr@10" in h]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        np.save(tmp / "user_emb.npy", U)
        np.save(tmp / "item_emb.npy", E)
        (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        (tmp / "history.json").write_text(json.dumps(history, indent=2))
        manifest = finish_manifest(tmp, {"artifact": "collab", "n_users": U.shape[0], "n_items": E.shape[0],
                                         "dim": U.shape[1], "epochs_run": len(history),
                                         "best_hr@10": max(hrs) if hrs else None, **(extra or {})})
    return manifest


def load_collab(path: str | Path) -> CollabArtifact:
    """Load a finished artifact; raises ArtifactError if it is missing, unfinished or inconsistent."""
    root = Path(path)
    manifest = read_manifest(root, files=_FILES)  # raises unless complete with every file
    U = np.load(root / "user_emb.npy")
    E = np.load(root / "item_emb.npy")
    if U.shape != (manifest["n_users"], manifest["dim"]) or E.shape != (manifest["n_items"], manifest["dim"]):
        raise ArtifactError(f"{root}: embedding shapes {U.shape}, {E.shape} disagree with the manifest")
    cfg = from_dict(LightGCNConfig, json.loads((root / "config.json").read_text()), "collab")
    history = json.loads((root / "history.json").read_text())
    return CollabArtifact(U, E, cfg, history, manifest)
