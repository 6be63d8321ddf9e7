"""The end-to-end pipeline: stages with fingerprinted, resumable artifacts.

A stage is skipped when its artifact's manifest is complete and carries the fingerprint of the
stage's config and inputs; otherwise it is (re)built. Re-running after a crash therefore resumes
at the first incomplete stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Literal, Optional

from deftrec.config import DeftRecConfig, DiffusionSettings, EvalConfig, TokenizerSettings, TrainConfig
from deftrec.config_utils import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from deftrec.data.config import PreprocessConfig
from deftrec.data.synth import SynthConfig
from deftrec.distributed import DistributedConfig
from deftrec.evaluation import EvalJobConfig
from deftrec.index import IndexConfig
from deftrec.io import is_complete, read_manifest
from deftrec.model.lightgcn import LightGCNConfig
from deftrec.model.llm import LLMConfig
from deftrec.model.prompts import PromptConfig


STAGES = ("synth", "preprocess", "collab", "train", "index", "evaluate")


@dataclasses.dataclass
class DataConfig:
    """Where the interactions come from: a synthetic log (``synth``) or files (``preprocess.input``)."""

    synth: Optional[SynthConfig] = None
    preprocess: dict = dataclasses.field(default_factory=dict)  # PreprocessConfig fields; input/output filled in

    def __post_init__(self):
        if self.synth is None and not self.preprocess.get("input"):
            raise ConfigError("data: give either data.synth (synthetic log) or data.preprocess.input (files)")


@dataclasses.dataclass
class PipelineConfig:
    name: str = "deftrec"
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(synth=SynthConfig()))
    stages: list[str] = dataclasses.field(default_factory=lambda: ["synth", "preprocess"])
    # Model sections: the fields of deftrec.config.DeftRecConfig, flat at the top level of a preset.
    collab: LightGCNConfig = dataclasses.field(default_factory=LightGCNConfig)
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    tokenizer: TokenizerSettings = dataclasses.field(default_factory=TokenizerSettings)
    diffusion: DiffusionSettings = dataclasses.field(default_factory=DiffusionSettings)
    condition: Literal["prompt_state", "response_embeddings", "hidden_states"] = "prompt_state"
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    # Ray Train / DeepSpeed settings of the collab and train jobs (not part of the model config).
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    evaluate: EvalJobConfig = dataclasses.field(default_factory=EvalJobConfig)

    def __post_init__(self):
        known = STAGES
        bad = [s for s in self.stages if s not in known]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad}; available: {list(known)}")
        if "synth" in self.stages and self.data.synth is None:
            raise ConfigError("stages includes 'synth' but data.synth is not set")
        self.deftrec_config()  # cross-section checks fail at load time, not at the training stage

    def deftrec_config(self) -> DeftRecConfig:
        """The model sections composed (and cross-validated) into a DeftRecConfig."""
        names = [f.name for f in dataclasses.fields(DeftRecConfig) if f.name != "d_llm"]
        try:
            return DeftRecConfig(**{n: getattr(self, n) for n in names})
        except ValueError as e:
            raise ConfigError(f"config: {e}") from e


def load_pipeline_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(PipelineConfig, data, "config")


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    from deftrec.io import write_json_atomic

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
            from deftrec.collab import train_collab_distributed

            run_stage("collab", {"collab": to_dict(model_cfg.collab), "data": _artifact_id(dirs["preprocess"]),
                                 "workers": cfg.distributed.num_workers},
                      lambda: train_collab_distributed(model_cfg.collab, dirs["preprocess"], dirs["collab"],
                                                       cfg.distributed, run_name=f"{cfg.name}-collab", log=log))
        elif name == "train":
            from deftrec.distributed import train_distributed

            run_stage("train", {"model": to_dict(model_cfg), "distributed": to_dict(cfg.distributed),
                                "data": _artifact_id(dirs["preprocess"]), "collab": _artifact_id(dirs["collab"])},
                      lambda: train_distributed(model_cfg, cfg.distributed, run_dir, run_name=cfg.name,
                                                data_dir=dirs["preprocess"], collab_dir=dirs["collab"], log=log))
        elif name == "index":
            from deftrec.evaluation import run_index_job

            run_stage("index", {"index": to_dict(cfg.index), "model": _artifact_id(dirs["train"])},
                      lambda: run_index_job(run_dir, cfg.index, force=True, log=log))
        elif name == "evaluate":
            from deftrec.evaluation import run_evaluation

            run_stage("evaluate", {"evaluate": to_dict(cfg.evaluate), "model": _artifact_id(dirs["train"]),
                                   "index": _artifact_id(dirs["index"])},
                      lambda: run_evaluation(run_dir, cfg.evaluate, log=log))
            summary["metrics"] = json.loads((dirs["evaluate"] / "metrics.json").read_text())
    return summary
