"""Distributed DeftRec fine-tuning: Ray Train (TorchTrainer) + DeepSpeed ZeRO.

One training job scales from one CPU process to multi-node GPU clusters with the same code:

- :class:`DistributedConfig`: workers, devices, ZeRO stage / offload, precision, checkpointing
  and fault tolerance (the ``distributed`` section of a preset).
- :func:`build_deepspeed_config`: the DeepSpeed config with concrete values (no ``"auto"``)::

      train_batch_size = train.batch_size (micro) x train.grad_accum x world_size

- :func:`build_train_dataset`: the training samples as a Ray Dataset, derived from the
  preprocessed ``sequences.parquet`` by :func:`samples_table` (every prefix of s[:-2], method.md)
  and streamed to the workers through ``get_dataset_shard("train")`` (equal split; an all-reduced
  "every rank still has a batch" flag keeps the ranks in lockstep). No worker reads the files.
- :func:`train_loop_per_worker`: the per-worker loop (restore first, stream batches, DeepSpeed
  step, validation on an equal slice per rank with all-reduced metrics, checkpoint + report on
  every rank), and :func:`train_distributed`, the driver (Ray Data, TorchTrainer, export of the
  best checkpoint to ``DIR/model``).

Checkpoint layout (one directory per report, merged across ranks by Ray Train)::

    trainer_state.json        rank 0: step, epoch, samples consumed in the epoch, best score,
                              world size, ZeRO stage, validation history, config
    model.safetensors         rank 0: consolidated trainable weights + E/U buffers + the rows of
                              the placeholder tokens in frozen embedding matrices (gathered with
                              deepspeed.zero.GatheredParameters under ZeRO-3)
    deepspeed/state/...       every rank: DeepSpeed's sharded model/optimizer states

Resume. The same world size and ZeRO stage restore the DeepSpeed states (optimizer moments
included). A different worker count (or stage) loads the consolidated weights *before*
``deepspeed.initialize`` (so ZeRO partitions them, and ZeRO-2's fp32 master copy starts from
them), keeps the step counter and the learning-rate schedule, and resets the Adam moments (it is
logged). That works for ZeRO-0/2/3 alike; ZeRO-3 moments can only be carried over to another
world size through DeepSpeed's universal checkpoint (``python -m deepspeed.checkpoint.ds_to_universal``
on ``deepspeed/`` and ``checkpoint: {load_universal: true}``), which this job does not automate.
Within an epoch, the data position is restored by skipping the number of batches already
consumed (Ray Data's streaming split does not replay the exact same rows per rank). Re-running
a finished run (same storage and name, same step budget) starts no worker and only re-exports.

A run's identity is its config (:func:`~deftrec.training.checkpoint.config_fingerprint`) and the
data and collab artifacts it trains on (:func:`~deftrec.training.checkpoint.run_inputs`), both
recorded in every ``trainer_state.json``: an earlier run under the same storage/name with another
config, other data (say another synth seed) or other LightGCN embeddings is neither resumed nor
re-exported; the driver refuses before any work, naming what changed (and every worker checks
the checkpoint it restores again).
Ray's controller collects reports by polling the workers (every 2 s): a worker lost within that
window after a report can lose that checkpoint, and the run resumes from the one before.

Everything that needs Ray or DeepSpeed is imported inside functions: importing this module is
cheap, and serving code never imports them (see :mod:`deftrec.artifacts.model`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deftrec.config.model import DeftRecConfig

if TYPE_CHECKING:
    import numpy as np

    from deftrec.artifacts.collab import CollabArtifact
    from deftrec.data.samples import ItemCatalog
from deftrec.config.training import DistributedConfig
from deftrec.core.log import Log, writer
from deftrec.training.checkpoint import (
    SCORE_KEY,
    TrainerState,
    check_run_identity,
    config_fingerprint,
    read_trainer_state,
    run_inputs,
)
from deftrec.training.dataset import build_train_dataset, plan_steps
from deftrec.training.ray_job import storage_path, torch_trainer
from deftrec.training.worker import _WorkerContext, train_loop_per_worker

__all__ = ["DistributedResult", "train_distributed", "train_fingerprint"]


@dataclass
class DistributedResult:
    """What :func:`train_distributed` returns."""

    model_dir: Path | None  # DIR/model (None when export=False)
    best_checkpoint: str | None  # path (or URI) of the exported checkpoint
    latest_checkpoint: str | None
    state: TrainerState | None  # trainer state of the best checkpoint
    metrics: dict  # metrics reported with the latest checkpoint
    storage: str  # storage_path/name of the Ray Train run


def train_fingerprint(cfg: DeftRecConfig, dist: DistributedConfig, data_dir: str | Path,
                      collab_dir: str | Path) -> str:
    """The train stage's identity (``RUN_DIR/model``): the model and distributed configs and the
    data and collab artifacts it reads (:func:`deftrec.core.artifacts.stage_fingerprint`).

    Not the run's resume identity: that is :func:`deftrec.training.checkpoint.config_fingerprint`
    (which leaves out run-length fields) together with the same input identities
    (:func:`deftrec.training.checkpoint.run_inputs`).
    """
    from deftrec.core.artifacts import stage_fingerprint
    from deftrec.core.config import to_dict

    return stage_fingerprint({"model": to_dict(cfg), "distributed": to_dict(dist)}, run_inputs(data_dir, collab_dir))


def _item_counts(data) -> "np.ndarray":
    """Each item's count in the training sequences s[:-2] (what the mixed negative sampler draws by)."""
    import numpy as np

    from deftrec.data.samples import training_pairs

    return np.bincount(training_pairs(data)[1], minlength=data.n_items)


def _storage(run_dir: Path, cfg_name: str, dist: DistributedConfig) -> tuple[str, str]:
    return storage_path(dist, run_dir), dist.name or cfg_name


def previous_run(storage: str, name: str) -> tuple[Any, TrainerState] | None:
    """(Result, trainer state of its latest checkpoint) of an earlier run with this storage/name, if any."""
    try:
        from ray.train import Result

        res = Result.from_path(f"{storage.rstrip('/')}/{name}")
    except Exception:  # noqa: BLE001 - no earlier run (or no snapshot yet): nothing to resume
        return None
    if res.checkpoint is None:
        return None
    try:
        with res.checkpoint.as_directory() as d:
            return res, read_trainer_state(d)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def train_distributed(
    cfg: DeftRecConfig,
    dist: DistributedConfig,
    run_dir: str | Path,
    *,
    run_name: str = "deftrec",
    data_dir: str | Path | None = None,
    collab_dir: str | Path | None = None,
    export: bool = True,
    step_callback: Callable[[int, int], None] | None = None,
    callbacks: list | None = None,
    log: Log | None = print,
) -> DistributedResult:
    """Train DeftRec on Ray Train with DeepSpeed and export the best checkpoint to ``RUN_DIR/model``.

    Args:
        cfg: the model/training config (``train`` drives the loop, ``eval`` the validations).
        dist: scaling, ZeRO, checkpointing and fault tolerance.
        run_dir: the run directory (``data/`` and ``collab/`` inside unless given explicitly).
        run_name: Ray Train run name unless ``dist.name`` is set (resume = same storage and name).
        export: write ``RUN_DIR/model`` (atomic, with manifest) from the best checkpoint.
        step_callback: ``f(step, rank)`` run on every worker after each optimizer step.
        callbacks: Ray Train callbacks of the run (e.g. forwarding reports to a Tune trial).

    Raises:
        deftrec.core.artifacts.ArtifactError when the data or the collaborative embeddings are missing;
        deftrec.training.checkpoint.RunIdentityError (an ArtifactError and a ValueError) when an earlier
        run with the same storage/name used another configuration, other data or other collab
        embeddings (the message names which); deftrec.core.config.ConfigError when the settings
        cannot run on this data or with these workers.
    """
    import ray
    import ray.train

    from deftrec.artifacts.collab import load_collab
    from deftrec.core.artifacts import ArtifactError
    from deftrec.core.cluster import ensure_ray
    from deftrec.core.config import ConfigError
    from deftrec.data.samples import build_training_samples, sample_options, load_dataset

    say = writer(log)
    run_dir = Path(run_dir)
    data_dir = Path(data_dir) if data_dir is not None else run_dir / "data"
    collab_dir = Path(collab_dir) if collab_dir is not None else run_dir / "collab"
    collab = load_collab(collab_dir)
    stage_fp = train_fingerprint(cfg, dist, data_dir, collab_dir)
    if cfg.tokenizer.needs_user_ids and collab.user_emb is None:
        raise ArtifactError("tokenizer.user_tokens needs the LightGCN user matrix in the collab artifact")
    if dist.zero_stage == 3 and cfg.needs_generation:
        # Greedy decoding stops at data-dependent lengths; under ZeRO-3 every forward is a
        # collective, so ranks would fall out of lockstep during validation.
        raise ConfigError(f"condition={cfg.condition!r} generates text during validation, which ZeRO-3 cannot "
                          "run in lockstep; use zero_stage 0/2 or condition=prompt_state")
    if collab.item_emb.shape[1] != cfg.d_c:
        raise ArtifactError(f"the collab artifact has d_c={collab.item_emb.shape[1]}, the config collab.dim={cfg.d_c}")
    data = load_dataset(data_dir)
    if collab.item_emb.shape[0] != data.n_items:
        raise ArtifactError(f"the collab artifact has {collab.item_emb.shape[0]} items, the data {data.n_items}")
    t = cfg.train
    n_samples = len(build_training_samples(data.train_sequences, data.users, **sample_options(cfg)))
    valid = data.valid.sample(t.valid_users, t.seed)
    if len(valid) < dist.num_workers:
        raise ConfigError(f"{len(valid)} validation users cannot be split over {dist.num_workers} workers")
    fp, inputs = config_fingerprint(cfg), run_inputs(data_dir, collab_dir)
    storage, name = _storage(run_dir, run_name, dist)
    prev = previous_run(storage, name)
    if prev is not None:  # neither resume nor re-export a run of another config, data or collab
        check_run_identity(prev[1], fp, inputs, f"{storage}/{name}")
    _, total = plan_steps(n_samples, t, dist.num_workers, dist.debug_steps)
    if prev is not None and (prev[1].stopped_early or prev[1].step >= total or prev[1].epoch >= t.epochs):
        # Finished under this budget: nothing to train (no workers started), export its best checkpoint.
        say(f"[deftrec] {storage}/{name} already finished at step {prev[1].step}; nothing to train")
        return _finish(prev[0], data.catalog, collab, run_dir, storage, name, export, say, (stage_fp, fp, inputs))

    ensure_ray()
    ds = build_train_dataset(data_dir, cfg, source=dist.samples, num_blocks=max(16, 4 * dist.num_workers))
    context = _WorkerContext(cfg=cfg, dist=dist, catalog=data.catalog, item_emb=collab.item_emb,
                             user_emb=collab.user_emb if cfg.tokenizer.needs_user_ids else None,
                             valid=valid, n_samples=n_samples, fingerprint=fp, inputs=inputs,
                             item_counts=_item_counts(data) if cfg.diffusion.ce_negative_sampler == "mixed" else None)
    ref = ray.put(context)
    trainer = torch_trainer(
        train_loop_per_worker, {"context": ref, "step_callback": step_callback}, dist, name=name, storage=storage,
        datasets={"train": ds}, callbacks=callbacks,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=dist.num_to_keep,
                                                     checkpoint_score_attribute=SCORE_KEY,
                                                     checkpoint_score_order="max"))
    say(f"[deftrec] training on {dist.num_workers} worker(s) (ZeRO-{dist.zero_stage}); checkpoints in {storage}/{name}")
    result = trainer.fit()
    return _finish(result, data.catalog, collab, run_dir, storage, name, export, say, (stage_fp, fp, inputs))


def _finish(result: Any, catalog: ItemCatalog, collab: CollabArtifact, run_dir: Path, storage: str, name: str,
            export: bool, say: Log, identity: tuple[str, str, dict[str, str]]) -> DistributedResult:
    """Pick the best checkpoint (validation NDCG@10) of a Ray Train result and export it.

    ``identity``: (train stage fingerprint for the manifest, config fingerprint, run inputs); the
    checkpoint must belong to that config and those inputs (:func:`check_run_identity`)."""
    stage_fp, fp, inputs = identity
    latest = result.checkpoint
    best = None
    if result.best_checkpoints:
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get(SCORE_KEY, -1.0))[0]
    best = best or latest
    if best is None:
        raise RuntimeError(f"the run {storage}/{name} finished without a checkpoint")
    model_dir = None
    with best.as_directory() as d:
        state = read_trainer_state(d)
        check_run_identity(state, fp, inputs, f"checkpoint {best.path}")
        if export:
            from deftrec.artifacts.model import export_checkpoint

            model_dir = run_dir / "model"
            export_checkpoint(d, model_dir, catalog, item_emb=collab.item_emb, user_emb=collab.user_emb, extra={
                "run": f"{storage}/{name}", "checkpoint": best.path, "best_step": state.best_step,
                "step": state.step, "valid_ndcg@10": state.best_score, "fingerprint": stage_fp,
                "inputs": dict(inputs)})
            say(f"[deftrec] exported step {state.step} (valid NDCG@10 {state.best_score:.4f}) to {model_dir}")
    return DistributedResult(model_dir=model_dir, best_checkpoint=best.path,
                             latest_checkpoint=latest.path if latest is not None else None, state=state,
                             metrics=dict(result.metrics or {}), storage=f"{storage}/{name}")
