"""The index job (Ray Data): the item keys of a model export and the FAISS index over them.

``items.parquet`` -> ``map_batches`` over an actor pool whose actors read the export's item matrix
E once (``collab.safetensors``: no LLM is loaded) and emit each item's key in the retrieval space
-> ``index/item_keys.parquet`` -> a FAISS index from the configured factory string ->
``index/manifest.json`` (factory, search parameters, items, dim, model version, recall@10 against
exact search, fingerprint). A complete index with the same fingerprint (index config + model
export) is left alone unless forced.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from deftrec.artifacts.model import load_item_keys, retrieval_metric
from deftrec.config.jobs import IndexConfig
from deftrec.core.artifacts import (
    ArtifactError,
    artifact_id,
    artifact_version,
    atomic_directory,
    finish_manifest,
    read_manifest,
    stage_fingerprint,
    up_to_date,
)
from deftrec.core.config import to_dict
from deftrec.retrieval.index import build_index, describe, save_index


class ItemKeyEmbedder:
    """Ray Data actor: reads the export's item matrix once; maps item indices to their keys."""

    def __init__(self, model_dir: str):
        # DeftRec retrieves by -||x0_hat - E_i||^2 (or <x0_hat, E_i>) against the collaborative item matrix E.
        self.keys = load_item_keys(model_dir)

    def __call__(self, batch: dict) -> dict:
        items = np.asarray(batch["item"], dtype=np.int64)
        return {"item": items, "key": list(self.keys[items])}


def index_fingerprint(cfg: IndexConfig, model_dir: str | Path) -> str:
    """The index stage's identity: its config and the model export it indexes."""
    return stage_fingerprint(to_dict(cfg), {"model": artifact_id(model_dir)})


def _embed_items(data_dir: Path, model_dir: Path, out: Path, actors: int) -> tuple[np.ndarray, np.ndarray]:
    import ray

    ds = ray.data.read_parquet(str(data_dir / "items.parquet")).select_columns(["item"])
    ds = ds.map_batches(ItemKeyEmbedder, fn_constructor_kwargs={"model_dir": str(model_dir)}, batch_size=4096,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, batch_format="numpy")
    ds.write_parquet(str(out / "item_keys.parquet"))
    t = pq.read_table(out / "item_keys.parquet").sort_by("item")
    items = t.column("item").to_numpy()
    if not np.array_equal(items, np.arange(len(items))):
        raise ArtifactError(f"{data_dir}/items.parquet: item indices are not 0..N-1")
    return items, np.stack(t.column("key").to_numpy(zero_copy_only=False)).astype(np.float32)


def run_index_job(run_dir: str | Path, cfg: IndexConfig, force: bool = False, log: Callable = print,
                  actors: int = 1, model_dir: str | Path | None = None, out_dir: str | Path | None = None) -> dict:
    """Index ``run_dir/data/items.parquet`` with the keys of ``model_dir`` (default ``run_dir/model``)
    into ``out_dir`` (default ``run_dir/index``)."""
    from deftrec.core.cluster import ensure_ray

    run_dir = Path(run_dir)
    data_dir = run_dir / "data"
    model_dir = Path(model_dir) if model_dir is not None else run_dir / "model"
    out = Path(out_dir) if out_dir is not None else run_dir / "index"
    version = artifact_version(model_dir)
    fp = index_fingerprint(cfg, model_dir)
    if not force and up_to_date(out, fp):
        log(f"[index] {out} is up to date for model {version} and {cfg.factory}; nothing to do (--force rebuilds)")
        return read_manifest(out)
    ensure_ray()
    t0 = time.time()
    with atomic_directory(out, overwrite=True) as tmp:
        items, keys = _embed_items(data_dir, model_dir, tmp, actors)
        t_embed = time.time() - t0
        log(f"[index] {len(keys):,} item keys of dim {keys.shape[1]} ({t_embed:.1f}s); building {cfg.factory}")
        t1 = time.time()
        metric = retrieval_metric(model_dir)
        index = build_index(keys, cfg, metric, ids=items)
        save_index(index, tmp)
        info = describe(index, cfg, keys, metric)
        manifest = {"kind": "index", "schema_version": 1, "config": to_dict(cfg), "model_version": version,
                    "version": f"{version}-{fp[:8]}", "fingerprint": fp, **info,
                    "seconds": {"embed": round(t_embed, 3), "build": round(time.time() - t1, 3)}}
        manifest = finish_manifest(tmp, manifest)
    log(f"[index] wrote {out}: {cfg.factory}, recall@10 vs exact {manifest['recall@10']:.3f}")
    return manifest
