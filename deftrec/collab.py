"""The collaborative-embedding artifact (method.md section 1) and the LightGCN Ray Train job.

Artifact layout (``RUN_DIR/collab``), written atomically with :func:`deftrec.io.atomic_directory`
and a manifest written last, so an interrupted job never leaves a directory that looks finished::

    user_emb.npy      U [n_users, d_c] float32
    item_emb.npy      E [n_items, d_c] float32 (DeftRec's diffusion target and retrieval space)
    config.json       the LightGCNConfig used
    history.json      one record per epoch: loss, and HR@10 on evaluated epochs
    manifest.json     status, fingerprint (config + data), shapes, best HR@10, checksums

The job (:func:`train_collab_distributed`) runs :func:`deftrec.model.lightgcn.train_lightgcn` in
every worker of a TorchTrainer: the process group Ray Train sets up makes it wrap the objective
in DDP and shard the (user, item) pairs by rank. Rank 0 hands the embeddings back through a Ray
Train checkpoint; the driver writes the artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deftrec.config_utils import from_dict, to_dict
from deftrec.io import ArtifactError, atomic_directory, finish_manifest, read_manifest
from deftrec.model.lightgcn import LightGCNConfig

if TYPE_CHECKING:
    from deftrec.distributed import DistributedConfig

__all__ = ["CollabArtifact", "collab_fingerprint", "load_collab", "save_collab", "train_collab_distributed"]

Log = Callable[[str], None]
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
    """Hash of the LightGCN config (device excluded) and the preprocessed data's identity."""
    m = read_manifest(data_dir)
    data_id = m.get("fingerprint") or {k: v.get("sha256") for k, v in m.get("outputs", {}).items()}
    c = to_dict(cfg)
    c.pop("device", None)
    return hashlib.sha256(json.dumps({"config": c, "data": data_id}, sort_keys=True).encode()).hexdigest()[:16]


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


# --------------------------------------------------------------------------------------------- Ray job


@dataclass
class _CollabContext:
    cfg: LightGCNConfig
    users: np.ndarray
    items: np.ndarray
    n_users: int
    n_items: int
    valid: tuple[np.ndarray, Any, np.ndarray]
    threads: int
    use_gpu: bool


def _collab_worker(config: dict) -> None:
    """Ray Train worker: train_lightgcn under the process group, rank 0 reports U/E as a checkpoint."""
    import ray
    import ray.train
    import torch

    from deftrec.model.lightgcn import train_lightgcn

    ctx: _CollabContext = config["context"]
    if isinstance(ctx, ray.ObjectRef):
        ctx = ray.get(ctx)
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(ctx.threads)
    cfg = ctx.cfg
    if ctx.use_gpu:
        cfg = dataclasses.replace(cfg, device=str(ray.train.torch.get_device()))
    from deftrec.distributed import _stdout_line

    U, E, history = train_lightgcn(ctx.users, ctx.items, ctx.n_users, ctx.n_items, cfg, valid=ctx.valid,
                                   log=_stdout_line if rank == 0 else None)
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
    validation HR@10 (see :func:`~deftrec.model.lightgcn.train_lightgcn`). The Ray Train run is
    ``{storage}/{dist.name}-collab``, or ``{storage}/{run_name}`` when ``dist.name`` is unset (default
    storage ``out_dir/../ray_results``). LightGCN trains in
    minutes, so a restarted worker group starts it over (``dist.max_failures`` restarts).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from deftrec.data.samples import load_dataset, training_pairs
    from deftrec.distributed import DistributedConfig
    from deftrec.ray_utils import ensure_ray

    dist = dist or DistributedConfig()
    say = log if log is not None else (lambda s: None)
    out_dir = Path(out_dir)
    data = load_dataset(data_dir)
    users, items = training_pairs(data)
    v = data.valid
    storage = storage_path or dist.storage_path or str((out_dir.parent / "ray_results").resolve())
    # dist.name is shared with the training job, which must not resume this run: suffix it.
    name = f"{dist.name}-collab" if dist.name else run_name
    ensure_ray()
    context = _CollabContext(cfg=cfg, users=users, items=items, n_users=data.n_users, n_items=data.n_items,
                             valid=(v.users, v.histories, v.targets), threads=dist.threads, use_gpu=dist.use_gpu)
    trainer = TorchTrainer(
        _collab_worker,
        train_loop_config={"context": ray.put(context)},
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                               resources_per_worker={"CPU": dist.cpus_per_worker},
                                               placement_strategy=dist.placement_strategy),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    say(f"[collab] LightGCN on {dist.num_workers} worker(s): {users.size:,} training interactions, "
        f"{data.n_users:,} users, {data.n_items:,} items")
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
