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
from deftrec.io import is_complete, read_manifest
from deftrec.model.lightgcn import LightGCNConfig
from deftrec.model.llm import LLMConfig
from deftrec.model.prompts import PromptConfig


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

    def __post_init__(self):
        known = ("synth", "preprocess")
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


def run_pipeline(cfg: PipelineConfig, run_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {"run_dir": str(run_dir), "stages": {}}
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

    if "synth" in cfg.stages:
        from deftrec.data.synth import generate

        fp = fingerprint(to_dict(cfg.data.synth))
        out = run_dir / "synth"

        def build():
            generate(cfg.data.synth, out, overwrite=True, log=log)
            return _set_fingerprint(out, fp)

        m, skipped, secs = _stage("synth", out, fp, build, log)
        summary["stages"]["synth"] = {"path": str(out), "skipped": skipped, "seconds": round(secs, 2),
                                      "rows": m.get("rows")}
    if "preprocess" in cfg.stages:
        from deftrec.data.preprocess import run_preprocess

        inputs = [p for p in pp_cfg.input] + ([pp_cfg.items] if pp_cfg.items else [])
        upstream = {}
        for p in inputs:  # fingerprint the inputs by their producer's manifest where there is one
            parent = Path(p).parent
            upstream[p] = read_manifest(parent).get("outputs", {}).get(Path(p).name) if is_complete(parent) \
                else {"mtime": Path(p).stat().st_mtime if Path(p).exists() else None}
        fp = fingerprint({"config": to_dict(pp_cfg), "inputs": upstream})
        out = run_dir / "data"

        def build():
            run_preprocess(pp_cfg, log=log)
            return _set_fingerprint(out, fp)

        m, skipped, secs = _stage("preprocess", out, fp, build, log)
        summary["stages"]["preprocess"] = {"path": str(out), "skipped": skipped, "seconds": round(secs, 2),
                                           "counts": m["counts"]}
    return summary
