"""deftrec.config.pipeline."""

from __future__ import annotations
import dataclasses
from pathlib import Path
from typing import Literal, Optional
from deftrec.config.model import DeftRecConfig, DiffusionSettings, InferenceConfig, TokenizerSettings
from deftrec.config.training import TrainConfig
from deftrec.core.config import ConfigError, apply_overrides, from_dict, load_yaml
from deftrec.config.data import SynthConfig
from deftrec.config.training import DistributedConfig
from deftrec.config.jobs import EvaluateJobConfig
from deftrec.config.jobs import IndexConfig
from deftrec.config.components import LightGCNConfig
from deftrec.config.components import LLMConfig
from deftrec.config.components import PromptConfig


STAGES = ("synth", "preprocess", "collab", "train", "index", "evaluate")


@dataclasses.dataclass
class DataSourceConfig:
    """Where the interactions come from: a synthetic log (``synth``) or files (``preprocess.input``)."""

    synth: Optional[SynthConfig] = None
    preprocess: dict = dataclasses.field(default_factory=dict)  # PreprocessConfig fields; input/output filled in

    def __post_init__(self):
        if self.synth is None and not self.preprocess.get("input"):
            raise ConfigError("data: give either data.synth (synthetic log) or data.preprocess.input (files)")


@dataclasses.dataclass
class PipelineConfig:
    name: str = "deftrec"
    data: DataSourceConfig = dataclasses.field(default_factory=lambda: DataSourceConfig(synth=SynthConfig()))
    stages: list[str] = dataclasses.field(default_factory=lambda: ["synth", "preprocess"])
    # Model sections: the fields of deftrec.config.DeftRecConfig, flat at the top level of a preset.
    collab: LightGCNConfig = dataclasses.field(default_factory=LightGCNConfig)
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    tokenizer: TokenizerSettings = dataclasses.field(default_factory=TokenizerSettings)
    diffusion: DiffusionSettings = dataclasses.field(default_factory=DiffusionSettings)
    condition: Literal["prompt_state", "response_embeddings", "hidden_states"] = "prompt_state"
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)
    # Ray Train / DeepSpeed settings of the collab and train jobs (not part of the model config).
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    evaluate: EvaluateJobConfig = dataclasses.field(default_factory=EvaluateJobConfig)

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


def load_deftrec_config(path: str | Path | None, overrides: list[str] | None = None) -> DeftRecConfig:
    """Read a preset (``pipelines/configs/*.yaml``) through the pipeline loader and return its model part.

    ``overrides`` are ``a.b=value`` strings, e.g. ``["train.max_steps=100", "condition=hidden_states"]``.
    Raises :class:`~deftrec.config_utils.ConfigError` naming the offending field.
    """
    pass  # (import moved into this module)

    return load_pipeline_config(path, overrides).deftrec_config()
