"""deftrec.batch.index_job."""

from __future__ import annotations
import time
from pathlib import Path
from typing import Callable, Optional
import numpy as np
import pyarrow.parquet as pq
from deftrec.core.config import to_dict
from deftrec.config.jobs import IndexConfig
from deftrec.retrieval.index import build_index, describe, save_index
from deftrec.core.artifacts import ArtifactError, atomic_directory, finish_manifest, is_complete, read_manifest
from deftrec.batch.evaluate import _load_model
from deftrec.core.artifacts import model_version


class ItemKeyEmbedder:
    """Ray Data actor: loads the model once; maps item indices to keys in the retrieval space."""

    def __init__(self, model_dir: str, loader: Optional[Callable] = None):
        model = (loader or _load_model)(model_dir)
        # DeftRec retrieves by -||x0_hat - E_i||^2 against the collaborative item matrix E.
        self.keys = model.item_emb.detach().float().cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        items = np.asarray(batch["item"], dtype=np.int64)
        return {"item": items, "key": list(self.keys[items])}


def run_index_job(run_dir: str | Path, cfg: IndexConfig, force: bool = False, log: Callable = print,
                  loader: Optional[Callable] = None, actors: int = 1, model_dir: str | Path | None = None,
                  out_dir: str | Path | None = None) -> dict:
    """Index ``run_dir/data/items.parquet`` with the keys of ``model_dir`` (default ``run_dir/model``)
    into ``out_dir`` (default ``run_dir/index``)."""
    import ray

    from deftrec.core.artifacts import fingerprint
    from deftrec.core.cluster import ensure_ray

    run_dir = Path(run_dir)
    data_dir = run_dir / "data"
    model_dir = Path(model_dir) if model_dir is not None else run_dir / "model"
    out = Path(out_dir) if out_dir is not None else run_dir / "index"
    version = model_version(model_dir)
    fp = fingerprint({"model": version, "index": to_dict(cfg)})
    if is_complete(out) and not force and read_manifest(out).get("fingerprint") == fp:
        log(f"[index] {out} is up to date for model {version} and {cfg.factory}; nothing to do (--force rebuilds)")
        return read_manifest(out)
    ensure_ray()
    t0 = time.time()
    with atomic_directory(out, overwrite=True) as tmp:
        ds = ray.data.read_parquet(str(data_dir / "items.parquet"), columns=["item"])
        ds = ds.map_batches(ItemKeyEmbedder, fn_constructor_kwargs={"model_dir": str(model_dir), "loader": loader},
                            batch_size=4096, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                            batch_format="numpy")
        ds.write_parquet(str(tmp / "item_keys.parquet"))
        t = pq.read_table(tmp / "item_keys.parquet").sort_by("item")
        items = t.column("item").to_numpy()
        if not np.array_equal(items, np.arange(len(items))):
            raise ArtifactError(f"{data_dir}/items.parquet: item indices are not 0..N-1")
        keys = np.stack(t.column("key").to_numpy(zero_copy_only=False)).astype(np.float32)
        t_embed = time.time() - t0
        log(f"[index] {len(keys):,} item keys of dim {keys.shape[1]} ({t_embed:.1f}s); building {cfg.factory}")
        t1 = time.time()
        index = build_index(keys, cfg, ids=items)
        save_index(index, tmp)
        info = describe(index, cfg, keys)
        manifest = {"kind": "index", "schema_version": 1, "config": to_dict(cfg), "model_version": version,
                    "version": f"{version}-{fp[:8]}", "fingerprint": fp, **info,
                    "seconds": {"embed": round(t_embed, 3), "build": round(time.time() - t1, 3)}}
        manifest = finish_manifest(tmp, manifest)
    log(f"[index] wrote {out}: {cfg.factory}, recall@10 vs exact {manifest['recall@10']:.3f}")
    return manifest
