"""Validation chooses the settings: a Ray Tune search whose trials are the pipeline's training job.

:func:`run_tune` runs one Tune trial per point of the ``tune:`` grid (``TuneConfig.trials``). A trial
is :func:`~deftrec.training.driver.train_distributed` itself, under its own Ray Train run name, with
the validations its workers report forwarded to Tune (:class:`_ValidationsToTune`), so ASHA stops
the trials whose validation NDCG@10 trails. Every trial's outcome, read from its Ray Train run's
latest checkpoint, goes to ``RUN_DIR/tune/trials.json``; the manifest records the best trial's
overrides and run name, which the train stage reads (:func:`tuned_training`): it exports the best
trial's best checkpoint under that name, resuming it first only if ASHA had stopped it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from deftrec.config.jobs import TuneConfig
from deftrec.config.model import DeftRecConfig
from deftrec.config.pipeline import model_with_overrides
from deftrec.config.training import DistributedConfig
from deftrec.core.artifacts import ArtifactError, atomic_directory, finish_manifest, read_manifest, stage_fingerprint
from deftrec.core.config import to_dict
from deftrec.core.log import Log, writer
from deftrec.training.checkpoint import SCORE_KEY, run_inputs

__all__ = ["run_tune", "tune_fingerprint", "tuned_training"]

#: The metric Tune ranks trials by: the primary protocol's validation NDCG@10 of a report.
METRIC = SCORE_KEY


def tune_fingerprint(cfg: DeftRecConfig, dist: DistributedConfig, tune: TuneConfig, data_dir: str | Path,
                     collab_dir: str | Path) -> str:
    """The tune stage's identity: the model it starts from, the workers, the search, and its inputs."""
    return stage_fingerprint({"model": to_dict(cfg), "distributed": to_dict(dist), "tune": to_dict(tune)},
                             run_inputs(data_dir, collab_dir))


def trial_name(run_name: str, index: int) -> str:
    return f"{run_name}-tune-{index:03d}"


def _trainable(config: dict) -> None:
    """One Tune trial: the pipeline's training job (no export) with its validations reported to Tune."""
    from deftrec.training.driver import train_distributed

    train_distributed(config["model"], config["dist"], config["run_dir"],
                      data_dir=config["data_dir"], collab_dir=config["collab_dir"], export=False,
                      callbacks=[_validations_to_tune()], log=print)


def _validations_to_tune() -> Any:
    """A Ray Train callback forwarding the reports that carry a validation to the Tune session."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _ValidationsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "valid_ndcg@10" in metrics[0]:  # log-line reports carry no validation
                super().after_report(run_context, metrics, checkpoint)

    return _ValidationsToTune()


def run_tune(cfg: DeftRecConfig, dist: DistributedConfig, tune: TuneConfig, run_dir: str | Path, *,
             run_name: str, data_dir: str | Path | None = None, collab_dir: str | Path | None = None,
             log: Log | None = print) -> dict:
    """Search ``tune.space`` over the training job; write ``RUN_DIR/tune`` (trials and the choice).

    Returns the manifest: ``best`` = {trial, overrides, run_name, valid_ndcg@10, best_step}."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from deftrec.core.cluster import ensure_ray
    from deftrec.training.driver import previous_run
    from deftrec.training.ray_job import storage_path

    say = writer(log)
    run_dir = Path(run_dir).resolve()
    data_dir = Path(data_dir) if data_dir is not None else run_dir / "data"
    collab_dir = Path(collab_dir) if collab_dir is not None else run_dir / "collab"
    trials = tune.trials(cfg.train.seed)
    models = [model_with_overrides(cfg, t) for t in trials]
    fp = tune_fingerprint(cfg, dist, tune, data_dir, collab_dir)
    ensure_ray()
    storage = storage_path(dist, run_dir)
    names = [trial_name(dist.name or run_name, i) for i in range(len(trials))]
    say(f"[tune] {len(trials)} trial(s) over {sorted(tune.space)}, {tune.max_concurrent_trials} at a time, ASHA "
        f"after {tune.grace_validations} validation(s); runs in {storage}")
    space = {"trial": ray.tune.grid_search(list(range(len(trials))))}
    base = {"run_dir": str(run_dir), "data_dir": str(data_dir), "collab_dir": str(collab_dir)}

    def trainable(config: dict) -> None:
        i = config["trial"]
        _trainable({**base, "model": models[i], "dist": dataclasses.replace(dist, name=names[i])})

    # The trial process only drives its TorchTrainer, whose workers hold the CPUs and GPUs. Tune
    # refuses an empty request, and any share of a CPU, however small, would keep a worker group that
    # fills the cluster's CPUs from starting: the trial holds one byte of memory instead.
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"CPU": 0, "memory": 1}),
        param_space=space,
        tune_config=ray.tune.TuneConfig(
            metric=METRIC, mode="max", max_concurrent_trials=tune.max_concurrent_trials,
            scheduler=ASHAScheduler(time_attr="training_iteration", grace_period=tune.grace_validations,
                                    reduction_factor=tune.reduction_factor, max_t=10**6)),
        run_config=ray.tune.RunConfig(name=f"{dist.name or run_name}-tune", storage_path=str(run_dir / "tune_results"),
                                      verbose=0))
    t0 = time.time()
    grid = tuner.fit()
    rows = []
    for i, (overrides, name) in enumerate(zip(trials, names)):
        prev = previous_run(storage, name)
        state = prev[1] if prev is not None else None
        errors = [str(r.error) for r in grid if r.config.get("trial") == i and r.error is not None]
        rows.append({"trial": i, "overrides": overrides, "run_name": name,
                     "valid_ndcg@10": state.best_score if state else None,
                     "best_step": state.best_step if state else None, "steps": state.step if state else 0,
                     "validations": len(state.validations) if state else 0,
                     "status": "error" if errors else ("stopped early" if state and state.stopped_early else
                                                       "done" if state and state.done else "stopped by ASHA"),
                     "error": errors[0][:2000] if errors else None})
        say(f"[tune] trial {i} {overrides}: valid NDCG@10 {rows[-1]['valid_ndcg@10']} ({rows[-1]['status']})")
    scored = [r for r in rows if r["valid_ndcg@10"] is not None and r["valid_ndcg@10"] >= 0]
    if not scored:
        raise RuntimeError(f"no tune trial finished a validation: {[r['error'] for r in rows]}")
    best = max(scored, key=lambda r: r["valid_ndcg@10"])
    out = run_dir / "tune"
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "trials.json").write_text(json.dumps(rows, indent=2))
        manifest = finish_manifest(tmp, {"kind": "tune", "schema_version": 1, "fingerprint": fp,
                                         "config": to_dict(tune), "best": best, "storage": storage,
                                         "seconds": round(time.time() - t0, 1)})
    say(f"[tune] best: trial {best['trial']} {best['overrides']} (valid NDCG@10 {best['valid_ndcg@10']:.4f}); "
        f"wrote {out}")
    return manifest


def tuned_training(cfg: DeftRecConfig, dist: DistributedConfig, run_dir: str | Path
                   ) -> tuple[DeftRecConfig, DistributedConfig]:
    """The model config and the Ray Train run (``distributed.name``) of the best trial recorded in
    ``RUN_DIR/tune``: training them again finds the trial's run and exports its best checkpoint."""
    tune_dir = Path(run_dir) / "tune"
    try:
        best = read_manifest(tune_dir)["best"]
    except (ArtifactError, KeyError):
        raise ArtifactError(f"{tune_dir}: no complete tune result; run the tune stage first") from None
    return model_with_overrides(cfg, best["overrides"]), dataclasses.replace(dist, name=best["run_name"])
