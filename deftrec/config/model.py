"""Typed configuration of a DeftRec model, its training and its evaluation.

One validated dataclass per concern, composed into :class:`DeftRecConfig`:

==============  =====================================================================
``collab``      :class:`~deftrec.config.components.LightGCNConfig` (d_c = ``collab.dim``)
``llm``         :class:`~deftrec.config.components.LLMConfig`
``prompt``      :class:`~deftrec.config.components.PromptConfig` (K / combine / user slots
                are derived from ``tokenizer``)
``tokenizer``   :class:`~deftrec.config.components.ContinuousTokenizerConfig` (K, mask_ratio,
                combine, user_tokens, hidden)
``diffusion``   :class:`~deftrec.config.components.DiffusionConfig` (schedule, denoiser, loss)
``condition``   ``"prompt_state"`` | ``"response_embeddings"`` | ``"hidden_states"`` |
                ``"item_states"``
``item_space``  ``"fixed"`` (retrieve against LightGCN's E) | ``"trainable"`` (W, from E)
``train``       :class:`TrainConfig`
``eval``        :class:`InferenceConfig`
==============  =====================================================================

Derived fields are filled after init, like Hugging Face configs: ``d_c`` comes from
``collab.dim``; ``d_llm`` (the LLM hidden size, also the diffusion condition size) is unknown
until the LLM is loaded and is set by :meth:`DeftRecConfig.with_d_llm`.
:meth:`DeftRecConfig.tokenizer_config` / :meth:`DeftRecConfig.diffusion_config` then return the
``tokenizer`` / ``diffusion`` sections with their derived fields filled (d_c, d_llm / cond_dim, and
the sampling defaults from ``eval``); the sections themselves, and so the serialised config, never
hold derived values.

Presets live in ``pipelines/configs/*.yaml`` next to the pipeline's ``data`` and ``stages``
sections; :func:`load_deftrec_config` reads one (with ``a.b=value`` overrides).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from deftrec.config.components import (
    SAMPLERS,
    ContinuousTokenizerConfig,
    DiffusionConfig,
    LightGCNConfig,
    LLMConfig,
    PromptConfig,
)
from deftrec.config.training import TrainConfig
from deftrec.core.config import _nonneg_float, _pos_int

__all__ = [
    "CONDITIONS",
    "GENERATIVE_CONDITIONS",
    "DeftRecConfig",
    "InferenceConfig",
    "TrainConfig",
]

#: Condition types (method.md section 4; ``item_states``: section 6, all-position training).
CONDITIONS = ("prompt_state", "response_embeddings", "hidden_states", "item_states")
#: Item spaces: the LightGCN matrix as is, or a trainable copy (method.md section 6).
ITEM_SPACES = ("fixed", "trainable")
#: Conditions computed from generated reasoning text at inference.
GENERATIVE_CONDITIONS = ("response_embeddings", "hidden_states")


# --------------------------------------------------------------------------------------------- sections


@dataclass
class InferenceConfig:
    """Inference and evaluation (method.md section 5)."""

    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int | None = 50  # DDIM steps S (<= diffusion.T); ddpm: null or diffusion.T
    eta: float = 0.0  # DDIM stochasticity (0: deterministic given x_T)
    guidance_w: float = 0.0  # classifier-free guidance weight (needs diffusion.cond_dropout > 0)
    max_gen_tokens: int = 32  # greedy reasoning length
    score: Literal["l2", "ip"] = "l2"  # -||x0_hat - E_i||^2 or <x0_hat, E_i>
    k: list[int] = field(default_factory=lambda: [5, 10, 20])
    exclude_history: bool = True  # primary protocol (both are always reported)
    batch_size: int = 64  # users per inference batch
    seed: int = 0  # noise seed of evaluation runs
    # reverse-diffusion draws per user whose x0 estimates are averaged into the query (one query
    # vector, so FAISS still serves it); 1 is the method: rank around one generated token
    samples: int = 1

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"eval.sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        _pos_int("eval", "steps", self.steps, allow_none=True)
        if self.sampler == "ddim" and self.steps is None:
            raise ValueError("eval.steps must be set for the ddim sampler")
        _nonneg_float("eval", "eta", self.eta)
        _nonneg_float("eval", "guidance_w", self.guidance_w)
        _pos_int("eval", "max_gen_tokens", self.max_gen_tokens)
        _pos_int("eval", "batch_size", self.batch_size)
        _pos_int("eval", "samples", self.samples)
        if self.score not in ("l2", "ip"):
            raise ValueError(f"eval.score must be 'l2' or 'ip', got {self.score!r}")
        if not self.k:
            raise ValueError("eval.k must list at least one cutoff")
        for k in self.k:
            _pos_int("eval", "k", k)
        self.k = sorted(set(self.k))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"eval.seed must be an int >= 0, got {self.seed!r}")


# --------------------------------------------------------------------------------------------- composite


@dataclass
class DeftRecConfig:
    """The whole model: sections above plus cross-field validation.

    ``d_llm`` is derived (the LLM hidden size) and normally left unset; :meth:`with_d_llm` fills it.
    """

    collab: LightGCNConfig = field(default_factory=LightGCNConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    tokenizer: ContinuousTokenizerConfig = field(default_factory=ContinuousTokenizerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    condition: Literal["prompt_state", "response_embeddings", "hidden_states", "item_states"] = "prompt_state"
    # "fixed": the continuous tokens, the diffusion targets and the retrieval keys are LightGCN's E.
    # "trainable": one item matrix W initialised from E (in the diffusion space) is all three; the
    # diffusion targets are W without gradient (so the MSE cannot shrink the space), the LLM and the
    # cross-entropy train it.
    item_space: Literal["fixed", "trainable"] = "fixed"
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: InferenceConfig = field(default_factory=InferenceConfig)
    d_llm: int | None = None

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        _pos_int("config", "d_llm", self.d_llm, allow_none=True)
        if self.item_space not in ITEM_SPACES:
            raise ValueError(f"item_space must be one of {ITEM_SPACES}, got {self.item_space!r}")
        if self.train.positions == "all" and self.condition != "item_states":
            raise ValueError("train.positions=all reads a condition after every history item: it needs "
                             f"condition=item_states (got {self.condition!r})")
        if (self.tokenizer.d_c, self.tokenizer.d_llm, self.diffusion.d_c, self.diffusion.cond_dim) != (None,) * 4:
            raise ValueError("tokenizer / diffusion sections must leave d_c, d_llm and cond_dim unset: they are "
                             "derived (collab.dim, the LLM hidden size) by tokenizer_config() / diffusion_config()")
        self._sync_prompt()
        if self.condition in GENERATIVE_CONDITIONS and self.train.lambda_lm == 0:
            # The condition is pooled from generated text at inference; without the LM loss the LLM
            # never learns to write it, so training and inference conditions would be unrelated.
            raise ValueError(f"condition={self.condition!r} is computed from generated text at inference "
                             "and needs train.lambda_lm > 0; use condition=prompt_state to train without L_lm")
        T = self.diffusion.T
        if self.eval.sampler == "ddim" and self.eval.steps > T:
            raise ValueError(f"eval.steps ({self.eval.steps}) must be <= diffusion.T ({T}) for the ddim sampler")
        if self.eval.sampler == "ddpm" and self.eval.steps not in (None, T):
            raise ValueError(f"eval.steps ({self.eval.steps}) must be null or diffusion.T ({T}) for ddpm, "
                             "which runs every step; use eval.sampler=ddim for fewer steps")
        if self.eval.guidance_w > 0 and self.diffusion.cond_dropout == 0:
            raise ValueError(f"eval.guidance_w={self.eval.guidance_w} needs diffusion.cond_dropout > 0: "
                             "the null condition of classifier-free guidance is never trained otherwise")

    def _sync_prompt(self) -> None:
        """prompt.K / combine_sum / user_tokens follow ``tokenizer``: unset ones are filled, an explicit
        value that differs is an error (whatever it is: a default-valued one is not taken for unset)."""
        derived = {"K": self.tokenizer.K, "combine_sum": self.tokenizer.combine == "sum",
                   "user_tokens": self.tokenizer.user_tokens}
        for name, value in derived.items():
            current = getattr(self.prompt, name)
            if current is not None and current != value:
                src = {"K": "tokenizer.K", "combine_sum": "tokenizer.combine", "user_tokens": "tokenizer.user_tokens"}
                raise ValueError(f"prompt.{name}={current!r} contradicts {src[name]}; set it in the tokenizer "
                                 "section only (the prompt layout is derived from it)")
            setattr(self.prompt, name, value)

    # -- derived values
    @property
    def d_c(self) -> int:
        return self.collab.dim

    @property
    def needs_generation(self) -> bool:
        """Whether inference must generate reasoning text to get the condition."""
        return self.condition in GENERATIVE_CONDITIONS

    def with_d_llm(self, d_llm: int) -> DeftRecConfig:
        """Copy with the LLM hidden size filled in (validated)."""
        return dataclasses.replace(self, d_llm=int(d_llm))

    def _require_d_llm(self) -> int:
        if self.d_llm is None:
            raise ValueError("d_llm is not known yet: it is filled from the LLM once loaded (with_d_llm)")
        return self.d_llm

    def tokenizer_config(self) -> ContinuousTokenizerConfig:
        """The ``tokenizer`` section with its derived d_c / d_llm filled (needs d_llm)."""
        return dataclasses.replace(self.tokenizer, d_c=self.d_c, d_llm=self._require_d_llm())

    def diffusion_config(self) -> DiffusionConfig:
        """The ``diffusion`` section with d_c / cond_dim and the sampling defaults (from ``eval``) filled."""
        e = self.eval
        steps = e.steps if e.steps is not None else self.diffusion.T
        return dataclasses.replace(self.diffusion, d_c=self.d_c, cond_dim=self._require_d_llm(), sampler=e.sampler,
                                   ddim_steps=steps, ddim_eta=e.eta, guidance_w=e.guidance_w)
