"""deftrec.training.collab_job: LightGCN as a Ray Train job (TorchTrainer, DDP) -> RUN_DIR/collab.

Console: rank 0 writes LightGCN's progress lines; the other ranks are silent, and Ray Train's
per-report log records are quieted (:func:`deftrec.core.log.quiet_worker_logs`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deftrec.config.components import LightGCNConfig

if TYPE_CHECKING:
    from deftrec.config.model import DeftRecConfig
    from deftrec.config.training import DistributedConfig
    from deftrec.data.samples import PreprocessedData
from deftrec.artifacts.collab import (
    CollabArtifact,
    collab_fingerprint,
    load_collab,
    save_collab,
)
from deftrec.core.log import Log, quiet_worker_logs, rank_zero, writer
from deftrec.training.ray_job import storage_path as default_storage, torch_trainer


@dataclass
class _CollabContext:
    cfg: LightGCNConfig
    users: np.ndarray
    items: np.ndarray
    n_users: int
    n_items: int
    valid: tuple[np.ndarray, Any, np.ndarray]  # (users, exclusions, targets), see lightgcn.Valid
    threads: int
    use_gpu: bool


def _collab_worker(config: dict) -> None:
    """Ray Train worker: train_lightgcn under the process group, rank 0 reports U/E as a checkpoint."""
    import ray
    import ray.train
    import torch

    from deftrec.training.lightgcn import train_lightgcn

    quiet_worker_logs()
    ctx: _CollabContext = config["context"]
    if isinstance(ctx, ray.ObjectRef):
        ctx = ray.get(ctx)
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(ctx.threads)
    cfg = ctx.cfg
    if ctx.use_gpu:
        cfg = dataclasses.replace(cfg, device=str(ray.train.torch.get_device()))
    U, E, history = train_lightgcn(ctx.users, ctx.items, ctx.n_users, ctx.n_items, cfg, valid=ctx.valid,
                                   log=rank_zero(rank))
    hrs = [h["hr@10"] for h in history if "hr@10" in h]
    metrics = {"epochs": len(history), "hr@10": max(hrs) if hrs else -1.0}
    with tempfile.TemporaryDirectory(prefix="deftrec-collab-") as tmp:
        checkpoint = None
        if rank == 0:  # every rank holds the same (DDP-synchronised) embeddings
            np.save(Path(tmp) / "user_emb.npy", U)
            np.save(Path(tmp) / "item_emb.npy", E)
            (Path(tmp) / "history.json").write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def fit_collab(cfg: DeftRecConfig, data: PreprocessedData, log: Log | None = print
               ) -> tuple[np.ndarray, np.ndarray, list]:
    """(U, E, history): LightGCN in this process, on the training sequences only (s[:-2]), with the
    validation the Ray Train job's workers run (:func:`_collab_worker` calls the same
    :func:`~deftrec.training.lightgcn.train_lightgcn` with the same exclusions). For tests and
    notebooks on one machine."""
    from deftrec.data.samples import training_pairs
    from deftrec.training.lightgcn import train_lightgcn

    users, items = training_pairs(data)
    v = data.valid.sample(cfg.collab.valid_users, cfg.collab.seed)
    return train_lightgcn(users, items, data.n_users, data.n_items, cfg.collab,
                          valid=(v.users, v.exclusions, v.targets), log=log)


def train_collab_distributed(
    cfg: LightGCNConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    dist: DistributedConfig | None = None,
    *,
    run_name: str = "deftrec-collab",
    storage_path: str | None = None,
    log: Log | None = print,
) -> CollabArtifact:
    """LightGCN as a Ray Train job (TorchTrainer; DDP over ``dist.num_workers`` workers) -> ``out_dir``.

    Trains on the training sequences s[:-2] only; early stopping and the returned embeddings follow
    validation HR@10 with each user's whole sequence before the target excluded, as every model is
    measured (see :func:`~deftrec.training.lightgcn.train_lightgcn`). The Ray Train run is
    ``{storage}/{dist.name}-collab``, or ``{storage}/{run_name}`` when ``dist.name`` is unset (default
    storage ``out_dir/../ray_results``). LightGCN trains in
    minutes, so a restarted worker group starts it over (``dist.max_failures`` restarts).
    """
    import ray
    import ray.train

    from deftrec.config.training import DistributedConfig
    from deftrec.core.cluster import ensure_ray
    from deftrec.data.samples import load_dataset, training_pairs

    dist = dist or DistributedConfig()
    say = writer(log)
    out_dir = Path(out_dir)
    data = load_dataset(data_dir)
    users, items = training_pairs(data)
    v = data.valid.sample(cfg.valid_users, cfg.seed)
    storage = storage_path or default_storage(dist, out_dir.parent)
    # dist.name is shared with the training job, which must not resume this run: suffix it.
    name = f"{dist.name}-collab" if dist.name else run_name
    ensure_ray()
    context = _CollabContext(cfg=cfg, users=users, items=items, n_users=data.n_users, n_items=data.n_items,
                             valid=(v.users, v.exclusions, v.targets), threads=dist.threads, use_gpu=dist.use_gpu)
    trainer = torch_trainer(_collab_worker, {"context": ray.put(context)}, dist, name=name, storage=storage)
    say(f"[collab] LightGCN on {dist.num_workers} worker(s): {users.size:,} training interactions, "
        f"{data.n_users:,} users, {data.n_items:,} items; validation on {len(v.users):,} users")
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the collab run {storage}/{name} finished without embeddings")
    with result.checkpoint.as_directory() as d:
        U = np.load(Path(d) / "user_emb.npy")
        E = np.load(Path(d) / "item_emb.npy")
        history = json.loads((Path(d) / "history.json").read_text())
    save_collab(out_dir, U, E, cfg, history, extra={
        "fingerprint": collab_fingerprint(cfg, data_dir), "data_dir": str(Path(data_dir).resolve()),
        "workers": dist.num_workers, "ray_run": f"{storage}/{name}"})
    art = load_collab(out_dir)
    say(f"[collab] wrote {out_dir} (best validation HR@10 {art.best_hr10})")
    return art
