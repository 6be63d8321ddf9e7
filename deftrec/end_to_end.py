"""The end-to-end pipeline: the stage table, the only module that imports every stage.

Each stage writes one directory of the run (``synth/``, ``data/``, ``collab/``, ``model/``,
``index/``, ``eval/``) and is identified by the project's one fingerprint rule
(:func:`deftrec.core.artifacts.stage_fingerprint`: the settings it reads plus the identities of
its inputs), computed by the same function its standalone job uses. A stage whose directory
holds a complete artifact with that fingerprint is skipped, so re-running after a crash resumes
at the first incomplete stage, and an artifact made by ``python -m pipelines.<stage>`` is
recognised here (and the other way round).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deftrec.config.data import PreprocessConfig
from deftrec.config.model import DeftRecConfig
from deftrec.config.pipeline import PipelineConfig, preset_dict, save_run_config
from deftrec.core.artifacts import read_manifest, up_to_date
from deftrec.core.config import from_dict
from deftrec.core.errors import UserError
from deftrec.core.log import Log

__all__ = ["STAGE_DIRS", "plan_pipeline", "run_pipeline", "preprocess_config"]

#: Stage -> its directory inside the run directory.
STAGE_DIRS = {"synth": "synth", "preprocess": "data", "collab": "collab", "tune": "tune", "train": "model",
              "index": "index", "evaluate": "eval"}


@dataclass
class _Run:
    """What every stage of one pipeline run reads."""

    cfg: PipelineConfig
    run_dir: Path
    preprocess: PreprocessConfig
    model: DeftRecConfig
    log: Log

    def dir(self, stage: str) -> Path:
        return self.run_dir / STAGE_DIRS[stage]


def preprocess_config(cfg: PipelineConfig, run_dir: str | Path) -> PreprocessConfig:
    """The preprocessing config of a run: ``data.preprocess`` with the synthetic log as input when the
    run generates one, and ``RUN_DIR/data`` as output."""
    run_dir = Path(run_dir)
    fields = dict(cfg.data.preprocess)
    if cfg.data.synth is not None and "synth" in cfg.stages:
        syn_dir = run_dir / STAGE_DIRS["synth"]
        fields.setdefault("input", [str(syn_dir / "interactions.csv")])
        fields.setdefault("items", str(syn_dir / "items.csv"))
        fields.setdefault("format", "csv")
    fields["output"] = str(run_dir / STAGE_DIRS["preprocess"])
    fields["overwrite"] = True
    return from_dict(PreprocessConfig, fields, "data.preprocess")


# --------------------------------------------------------------------------------------------- stages
# Each stage: (fingerprint of its current config and inputs, build). Imports stay inside the
# functions: a run that stops after preprocessing never imports torch or DeepSpeed.


def _synth(r: _Run) -> tuple[str, Callable[[], object]]:
    from deftrec.data.synth import generate, synth_fingerprint

    fp = synth_fingerprint(r.cfg.data.synth)
    return fp, lambda: generate(r.cfg.data.synth, r.dir("synth"), overwrite=True, log=r.log)


def _preprocess(r: _Run) -> tuple[str, Callable[[], object]]:
    from deftrec.data.preprocess import preprocess_fingerprint, run_preprocess

    fp = preprocess_fingerprint(r.preprocess)
    return fp, lambda: run_preprocess(r.preprocess, log=r.log)


def _collab(r: _Run) -> tuple[str, Callable[[], object]]:
    from deftrec.artifacts.collab import collab_fingerprint
    from deftrec.training.collab_job import train_collab_distributed

    fp = collab_fingerprint(r.model.collab, r.dir("preprocess"))
    return fp, lambda: train_collab_distributed(r.model.collab, r.dir("preprocess"), r.dir("collab"),
                                                r.cfg.distributed, run_name=f"{r.cfg.name}-collab", log=r.log)


def _tune(r: _Run) -> tuple[str, Callable[[], object]]:
    from deftrec.training.tune_job import run_tune, tune_fingerprint

    fp = tune_fingerprint(r.model, r.cfg.distributed, r.cfg.tune, r.dir("preprocess"), r.dir("collab"))
    return fp, lambda: run_tune(r.model, r.cfg.distributed, r.cfg.tune, r.run_dir, run_name=r.cfg.name,
                                data_dir=r.dir("preprocess"), collab_dir=r.dir("collab"), log=r.log)


def _train(r: _Run) -> tuple[str, Callable[[], object]]:
    """The preset's model, or with a tune stage the best trial's (whose run it exports)."""
    from deftrec.training.driver import train_distributed, train_fingerprint

    model, dist = r.model, r.cfg.distributed
    if "tune" in r.cfg.stages:
        from deftrec.training.tune_job import tuned_training

        model, dist = tuned_training(model, dist, r.run_dir)
    fp = train_fingerprint(model, dist, r.dir("preprocess"), r.dir("collab"))
    return fp, lambda: train_distributed(model, dist, r.run_dir, run_name=r.cfg.name,
                                         data_dir=r.dir("preprocess"), collab_dir=r.dir("collab"), log=r.log)


def _index(r: _Run) -> tuple[str, Callable[[], object]]:
    from deftrec.batch.index_job import index_fingerprint, run_index_job

    fp = index_fingerprint(r.cfg.index, r.dir("train"))
    return fp, lambda: run_index_job(r.run_dir, r.cfg.index, force=True, log=r.log)


def _evaluate(r: _Run) -> tuple[str, Callable[[], object]]:
    from deftrec.batch.evaluate import evaluation_fingerprint, run_evaluation

    fp = evaluation_fingerprint(r.run_dir, r.cfg.evaluate)
    return fp, lambda: run_evaluation(r.run_dir, r.cfg.evaluate, log=r.log, force=True)


STAGE_TABLE: dict[str, Callable[[_Run], tuple[str, Callable[[], object]]]] = {
    "synth": _synth, "preprocess": _preprocess, "collab": _collab, "tune": _tune, "train": _train, "index": _index,
    "evaluate": _evaluate,
}


def _run_stage(name: str, r: _Run) -> dict:
    """Build stage ``name`` unless its directory is up to date; returns its summary entry."""
    out = r.dir(name)
    r.log(f"[pipeline] == {name} ==")
    fp, build = STAGE_TABLE[name](r)
    if up_to_date(out, fp):
        r.log(f"[pipeline] {name}: up to date ({out}), skipped")
        return {"path": str(out), "skipped": True, "seconds": 0.0}
    t0 = time.time()
    build()
    if read_manifest(out).get("fingerprint") != fp:  # every job stamps its manifest with its fingerprint
        raise RuntimeError(f"{out}: the {name} job wrote fingerprint {read_manifest(out).get('fingerprint')!r}, "
                           f"the pipeline expected {fp} (internal error)")
    return {"path": str(out), "skipped": False, "seconds": round(time.time() - t0, 2)}


def run_pipeline(cfg: PipelineConfig, run_dir: str | Path, log: Log = print) -> dict:
    """Run the configured stages in order; each is skipped when its artifact is up to date.

    The resolved config is recorded in ``RUN_DIR/pipeline_config.json`` first: the standalone stages
    (``python -m pipelines.index --run-dir DIR`` ...) read it and so reproduce this run."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Build every typed config first: a bad value fails now, not an hour into the run.
    r = _Run(cfg=cfg, run_dir=run_dir, preprocess=preprocess_config(cfg, run_dir), model=cfg.model,
             log=log)
    save_run_config(cfg, run_dir)
    summary: dict = {"run_dir": str(run_dir), "stages": {}}
    for name in cfg.stages:
        summary["stages"][name] = _run_stage(name, r)
        if name == "synth":
            summary["stages"][name]["rows"] = read_manifest(r.dir(name)).get("rows")
        elif name == "preprocess":
            summary["stages"][name]["counts"] = read_manifest(r.dir(name))["counts"]
        elif name == "evaluate":
            summary["metrics"] = json.loads((r.dir(name) / "metrics.json").read_text())
    return summary


# --------------------------------------------------------------------------------------------- plan


def _stage_resources(name: str, cfg: PipelineConfig) -> dict:
    """What stage ``name`` asks Ray for: the same values its job passes to Ray."""
    from deftrec.training.ray_job import worker_resources

    if name == "collab":
        return {"kind": "ray_train", **worker_resources(cfg.distributed)}
    if name == "tune":
        t = cfg.tune
        return {"kind": "ray_tune", "trials": len(t.trials(cfg.model.train.seed)),
                "max_concurrent_trials": t.max_concurrent_trials, "scheduler": "ASHA",
                "per_trial": {"kind": "ray_train", **worker_resources(cfg.distributed)}}
    if name == "train":
        d = cfg.distributed
        return {"kind": "ray_train", **worker_resources(d), "zero_stage": d.zero_stage, "precision": d.precision}
    if name == "preprocess":
        return {"kind": "ray_data_tasks", "cpus_per_task": 1, "gpus_per_task": 0}
    if name == "index":
        return {"kind": "ray_data_actor_pool", "actors": 1, "cpus_per_actor": 1, "gpus_per_actor": 0}
    if name == "evaluate":
        e = cfg.evaluate
        actors = e.actors if e.actors is not None else "auto: the cluster's GPUs / gpus_per_actor, else CPUs - 1"
        return {"kind": "ray_data_actor_pool", "actors": actors, "cpus_per_actor": e.cpus_per_actor,
                "gpus_per_actor": e.gpus_per_actor, "baselines": "one Ray task each (1 CPU; SASRec gpus_per_actor GPUs)",
                "sasrec_device": e.sasrec.device}
    return {"kind": "driver"}


def plan_pipeline(cfg: PipelineConfig, run_dir: str | Path) -> dict:
    """What :func:`run_pipeline` would do, without doing it (``--dry-run``): the resolved config and, per
    stage, whether it runs or is skipped (its fingerprint against the artifact in the run directory)
    and the Ray resources it requests. Reads manifests only; starts nothing and writes nothing."""
    run_dir = Path(run_dir)
    r = _Run(cfg=cfg, run_dir=run_dir, preprocess=preprocess_config(cfg, run_dir), model=cfg.model,
             log=lambda line: None)
    stages, reruns = {}, None
    for name in cfg.stages:
        entry: dict = {"directory": str(r.dir(name)), "resources": _stage_resources(name, cfg)}
        if reruns is not None:
            entry.update(action="run", fingerprint=None, reason=f"its input stage {reruns!r} runs first")
        else:
            try:
                fp, _ = STAGE_TABLE[name](r)
            except UserError as e:  # an input this stage reads is not there (yet)
                entry.update(action="run", fingerprint=None, reason=str(e))
            else:
                fresh = up_to_date(r.dir(name), fp)
                entry.update(action="skip" if fresh else "run", fingerprint=fp,
                             reason="up to date" if fresh else "no complete artifact with this fingerprint")
        if entry["action"] == "run" and reruns is None:
            reruns = name
        stages[name] = entry
    def gpus(res: dict) -> float:  # a tune stage's trials request what its per-trial job does
        return res.get("gpus_per_worker", res.get("gpus_per_actor", gpus(res.get("per_trial", {})) if res else 0))
    return {"run_dir": str(run_dir), "config": preset_dict(cfg), "stages": stages,
            "uses_gpu": any(gpus(s["resources"]) > 0 for s in stages.values())}
