"""The end-to-end pipeline: stages with fingerprinted, resumable artifacts.

A stage is skipped when its artifact's manifest is complete and carries the fingerprint of the
stage's config and inputs; otherwise it is (re)built. Re-running after a crash therefore resumes
at the first incomplete stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from deftrec.core.config import from_dict, to_dict
from deftrec.config.data import PreprocessConfig
from deftrec.core.artifacts import is_complete, read_manifest
from deftrec.config.pipeline import PipelineConfig
from deftrec.core.artifacts import fingerprint


def _stage(name: str, out: Path, fp: str, build: Callable[[], dict], log) -> tuple[dict, bool, float]:
    """Run ``build`` unless ``out`` holds a complete artifact with fingerprint ``fp``."""
    if is_complete(out):
        m = read_manifest(out)
        if m.get("fingerprint") == fp:
            log(f"[pipeline] {name}: up to date ({out}), skipped")
            return m, True, 0.0
        log(f"[pipeline] {name}: config or inputs changed, rebuilding {out}")
    t0 = time.time()
    m = build()
    return m, False, time.time() - t0


def _set_fingerprint(directory: Path, fp: str) -> dict:
    from deftrec.core.artifacts import write_json_atomic

    m = read_manifest(directory)
    m["fingerprint"] = fp
    write_json_atomic(directory / "manifest.json", m)
    return m


def _artifact_id(directory: Path) -> str:
    """Content identity of a finished artifact (its output checksums), for downstream fingerprints."""
    return fingerprint(read_manifest(directory).get("outputs", {}))


def run_pipeline(cfg: PipelineConfig, run_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Run the configured stages in order; each is skipped when its artifact is up to date."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"run_dir": str(run_dir), "stages": {}}
    # Build every typed config first: a bad value fails now, not an hour into the run.
    pp_fields = dict(cfg.data.preprocess)
    if cfg.data.synth is not None and "synth" in cfg.stages:
        syn_dir = run_dir / "synth"
        pp_fields.setdefault("input", [str(syn_dir / "interactions.csv")])
        pp_fields.setdefault("items", str(syn_dir / "items.csv"))
        pp_fields.setdefault("format", "csv")
    pp_fields["output"] = str(run_dir / "data")
    pp_fields["overwrite"] = True
    pp_cfg = from_dict(PreprocessConfig, pp_fields, "data.preprocess")
    model_cfg = cfg.deftrec_config()
    dirs = {"synth": run_dir / "synth", "preprocess": run_dir / "data", "collab": run_dir / "collab",
            "train": run_dir / "model", "index": run_dir / "index", "evaluate": run_dir / "eval"}

    def run_stage(name: str, fp_obj, build: Callable[[], None]) -> dict:
        out = dirs[name]
        fp = fingerprint(fp_obj)
        log(f"[pipeline] == {name} ==")
        m, skipped, secs = _stage(name, out, fp, lambda: (build(), _set_fingerprint(out, fp))[1], log)
        summary["stages"][name] = {"path": str(out), "skipped": skipped, "seconds": round(secs, 2)}
        return m

    for name in cfg.stages:
        if name == "synth":
            from deftrec.data.synth import generate

            m = run_stage("synth", to_dict(cfg.data.synth),
                          lambda: generate(cfg.data.synth, dirs["synth"], overwrite=True, log=log))
            summary["stages"]["synth"]["rows"] = m.get("rows")
        elif name == "preprocess":
            from deftrec.data.preprocess import run_preprocess

            upstream = {}
            for p in list(pp_cfg.input) + ([pp_cfg.items] if pp_cfg.items else []):
                parent = Path(p).parent  # inputs are identified by their producer's manifest where there is one
                upstream[p] = read_manifest(parent).get("outputs", {}).get(Path(p).name) if is_complete(parent) \
                    else {"mtime": Path(p).stat().st_mtime if Path(p).exists() else None}
            m = run_stage("preprocess", {"config": to_dict(pp_cfg), "inputs": upstream},
                          lambda: run_preprocess(pp_cfg, log=log))
            summary["stages"]["preprocess"]["counts"] = m["counts"]
        elif name == "collab":
            from deftrec.training.collab_job import train_collab_distributed

            run_stage("collab", {"collab": to_dict(model_cfg.collab), "data": _artifact_id(dirs["preprocess"]),
                                 "workers": cfg.distributed.num_workers},
                      lambda: train_collab_distributed(model_cfg.collab, dirs["preprocess"], dirs["collab"],
                                                       cfg.distributed, run_name=f"{cfg.name}-collab", log=log))
        elif name == "train":
            from deftrec.training.driver import train_distributed

            run_stage("train", {"model": to_dict(model_cfg), "distributed": to_dict(cfg.distributed),
                                "data": _artifact_id(dirs["preprocess"]), "collab": _artifact_id(dirs["collab"])},
                      lambda: train_distributed(model_cfg, cfg.distributed, run_dir, run_name=cfg.name,
                                                data_dir=dirs["preprocess"], collab_dir=dirs["collab"], log=log))
        elif name == "index":
            from deftrec.batch.index_job import run_index_job

            run_stage("index", {"index": to_dict(cfg.index), "model": _artifact_id(dirs["train"])},
                      lambda: run_index_job(run_dir, cfg.index, force=True, log=log))
        elif name == "evaluate":
            from deftrec.batch.evaluate import run_evaluation

            run_stage("evaluate", {"evaluate": to_dict(cfg.evaluate), "model": _artifact_id(dirs["train"]),
                                   "index": _artifact_id(dirs["index"])},
                      lambda: run_evaluation(run_dir, cfg.evaluate, log=log))
            summary["metrics"] = json.loads((dirs["evaluate"] / "metrics.json").read_text())
    return summary
