"""The pipeline config: one preset file = the data source, the stages, the model and the jobs.

A preset (``pipelines/configs/*.yaml``) keeps the model's sections (``collab``, ``llm``,
``prompt``, ``tokenizer``, ``diffusion``, ``condition``, ``train``, ``eval``) flat at its top
level; :func:`load_pipeline_config` gathers them into the composed :class:`DeftRecConfig`
(``PipelineConfig.model``) instead of re-declaring them here, so a model field is declared once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from deftrec.config.data import PreprocessConfig, SynthConfig
from deftrec.config.jobs import EvaluateJobConfig, IndexConfig, TuneConfig
from deftrec.config.model import DeftRecConfig
from deftrec.config.training import DistributedConfig
from deftrec.core.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

STAGES = ("synth", "preprocess", "collab", "tune", "train", "index", "evaluate")
_PREPROCESS_MAX_HISTORY = next(f.default for f in dataclasses.fields(PreprocessConfig) if f.name == "max_history")


@dataclasses.dataclass
class DataSourceConfig:
    """Where the interactions come from: a synthetic log (``synth``) or files (``preprocess.input``)."""

    synth: Optional[SynthConfig] = None
    preprocess: dict = dataclasses.field(default_factory=dict)  # PreprocessConfig fields; input/output filled in

    def __post_init__(self):
        if self.synth is None and not self.preprocess.get("input"):
            raise ConfigError("data: give either data.synth (synthetic log) or data.preprocess.input (files)")


#: Top-level preset keys that belong to the model (the fields of DeftRecConfig a preset may set).
MODEL_SECTIONS = tuple(f.name for f in dataclasses.fields(DeftRecConfig) if f.name != "d_llm")


@dataclasses.dataclass
class PipelineConfig:
    """A whole run: where the data comes from, which stages run, the model, and the jobs' settings."""

    name: str = "deftrec"
    data: DataSourceConfig = dataclasses.field(default_factory=lambda: DataSourceConfig(synth=SynthConfig()))
    stages: list[str] = dataclasses.field(default_factory=lambda: ["synth", "preprocess"])
    model: DeftRecConfig = dataclasses.field(default_factory=DeftRecConfig)
    # Ray Train / DeepSpeed settings of the collab and train jobs (not part of the model config).
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    evaluate: EvaluateJobConfig = dataclasses.field(default_factory=EvaluateJobConfig)
    # the search whose best trial the train stage exports (stage "tune")
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad}; available: {list(STAGES)}")
        if "synth" in self.stages and self.data.synth is None:
            raise ConfigError("stages includes 'synth' but data.synth is not set")
        self.validate_sections()

    def validate_sections(self) -> None:
        """The rules that span sections, checked where the whole config is known; each names both fields.

        The ranking rule has one setting, ``eval.score``: training's cross-entropy, validation, the
        FAISS index (which reads it from the model export), batch evaluation and serving all use it.
        """
        data_window = self.data.preprocess.get("max_history", _PREPROCESS_MAX_HISTORY)
        prompt_window = self.model.prompt.max_history
        if isinstance(data_window, int) and data_window < prompt_window:
            raise ConfigError(f"data.preprocess.max_history ({data_window}) must be >= prompt.max_history "
                              f"({prompt_window}): the evaluation splits keep only data.preprocess.max_history "
                              "items of each history, so the prompt would read a shorter window than it trains on")
        if "tune" in self.stages:
            if not self.tune.space:
                raise ConfigError("stages includes 'tune' but tune.space is empty: name the model fields to search")
            for overrides in self.tune.trials(self.model.train.seed):  # every trial's config is valid now
                try:
                    model_with_overrides(self.model, overrides)
                except ConfigError as e:
                    raise ConfigError(f"tune.space: the trial {overrides} is not a valid config: {e}") from None
        if self.distributed.zero_stage == 3 and self.model.needs_generation:
            # greedy decoding stops at data-dependent lengths; under ZeRO-3 every forward is a collective
            raise ConfigError(f"condition={self.model.condition!r} generates text during validation, which "
                              "distributed.zero_stage=3 cannot run in lockstep on every rank; use "
                              "distributed.zero_stage 0 or 2, or condition=prompt_state")
        if self.model.collab.device != "cpu" and not self.distributed.use_gpu:
            raise ConfigError(f"collab.device={self.model.collab.device!r} needs distributed.use_gpu=true: LightGCN "
                              "trains on Ray Train workers, which reserve a GPU only with distributed.use_gpu")


def model_with_overrides(model: DeftRecConfig, overrides: list[str]) -> DeftRecConfig:
    """``model`` with ``section.field=value`` overrides applied (validated like a preset's)."""
    return from_dict(DeftRecConfig, apply_overrides(_model_dict(model), overrides), "config")


def _model_dict(model: DeftRecConfig) -> dict:
    """The model's sections as a preset writes them: the derived fields left unset (``d_llm``, and
    prompt.K / user_tokens / combine_sum, which follow the tokenizer section), so a ``tokenizer.*``
    override on top re-derives them instead of contradicting recorded values."""
    d = to_dict(model)
    d.pop("d_llm", None)
    for name in ("K", "user_tokens", "combine_sum"):
        d["prompt"].pop(name, None)
    return d


def pipeline_config_from_dict(data: dict) -> PipelineConfig:
    """A PipelineConfig from a preset's dict: the model sections at the top level go to ``model``."""
    data = dict(data or {})
    if "model" in data:
        raise ConfigError("config: the model sections (collab, llm, prompt, tokenizer, diffusion, condition, train, "
                          "eval) go at the top level of a preset, not under 'model'")
    own = {f.name for f in dataclasses.fields(PipelineConfig)} - {"model"}
    unknown = sorted(set(data) - own - set(MODEL_SECTIONS))
    if unknown:
        raise ConfigError(f"config: unknown field(s) {unknown}; valid fields are {sorted(own | set(MODEL_SECTIONS))}")
    model = {k: data.pop(k) for k in MODEL_SECTIONS if k in data}
    data["model"] = from_dict(DeftRecConfig, model, "config")
    return from_dict(PipelineConfig, data, "config")


def load_pipeline_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a preset (or the defaults when ``path`` is None) with ``a.b=value`` overrides.

    Raises :class:`~deftrec.core.config.ConfigError` naming the offending field."""
    data = load_yaml(path) if path else {}
    return pipeline_config_from_dict(apply_overrides(data, overrides or []))


def load_deftrec_config(path: str | Path | None, overrides: list[str] | None = None) -> DeftRecConfig:
    """Read a preset (``pipelines/configs/*.yaml``) through the pipeline loader and return its model part.

    ``overrides`` are ``a.b=value`` strings, e.g. ``["train.max_steps=100", "condition=hidden_states"]``.
    Raises :class:`~deftrec.core.config.ConfigError` naming the offending field.
    """
    return load_pipeline_config(path, overrides).model


#: The resolved config of a run, written into the run directory by ``pipelines.end_to_end``.
RUN_CONFIG_FILE = "pipeline_config.json"


def preset_dict(cfg: PipelineConfig) -> dict:
    """``cfg`` in a preset's layout (model sections at the top level): what :func:`pipeline_config_from_dict`
    reads back into an equal config."""
    d = to_dict(cfg)
    d.pop("model")
    return {**d, **_model_dict(cfg.model)}


def save_run_config(cfg: PipelineConfig, run_dir: str | Path) -> Path:
    """Record the resolved config in ``RUN_DIR/pipeline_config.json`` (atomic), for the standalone stages."""
    from deftrec.core.artifacts import write_json_atomic

    path = Path(run_dir) / RUN_CONFIG_FILE
    write_json_atomic(path, preset_dict(cfg))
    return path


def load_run_config(run_dir: str | Path | None, path: str | Path | None,
                    overrides: list[str] | None = None) -> PipelineConfig:
    """The config a standalone stage runs with: the preset ``path`` when given, otherwise the config
    recorded in ``run_dir`` by ``pipelines.end_to_end`` (so the stage reproduces that run's settings and
    fingerprints), otherwise the built-in defaults; ``overrides`` apply on top of each."""
    if path is not None:
        return load_pipeline_config(path, overrides)
    recorded = Path(run_dir) / RUN_CONFIG_FILE if run_dir is not None else None
    if recorded is not None and recorded.is_file():
        import json

        try:
            data = json.loads(recorded.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{recorded}: not valid JSON ({e}); pass --config") from None
        return pipeline_config_from_dict(apply_overrides(data, overrides or []))
    return load_pipeline_config(None, overrides)
