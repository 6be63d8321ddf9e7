"""A tiny, fully offline causal LM for tests and CPU smoke runs.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a fixed corpus shipped in
``deftrec/assets/tiny_corpus.txt``: byte-level means every string (any script, emoji, HTML entities)
encodes without ``<unk>`` and decodes back exactly, and the fixed corpus plus fixed trainer settings make
it deterministic. It is cached on disk (atomically) under a key derived from the corpus and settings.
The model is a randomly initialised ``LlamaForCausalLM`` with the ``tiny_*`` sizes of ``LLMConfig``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deftrec.core.artifacts import fingerprint
from deftrec.core.cache import MANIFEST_NAME, materialize_cache_dir

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from deftrec.config.components import LLMConfig

__all__ = ["TINY_SPECIAL_TOKENS", "build_tiny_llm", "build_tiny_tokenizer", "tiny_corpus", "train_tiny_tokenizer"]

# Fixed order: ids 0..3. pad first so that an all-zero tensor is all padding.
TINY_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_TOKENIZER_FORMAT = 1  # bump when the training recipe below changes, to invalidate caches


def tiny_corpus() -> list[str]:
    """Lines of the shipped corpus, comments (``#``) and blank lines dropped."""
    text = resources.files("deftrec").joinpath("assets", "tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def train_tiny_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE in memory (deterministic: fixed corpus, fixed settings)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = list(TINY_SPECIAL_TOKENS.values())
    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: " Title" and "Title" stay distinct, as in GPT-2/Llama-3 style tokenizers.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        # the full byte alphabet, so bytes absent from the corpus still have a symbol (no unk, exact round trip)
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_corpus(), trainer=trainer)
    bos = TINY_SPECIAL_TOKENS["bos_token"]
    # Llama convention: bos in front of every encoded sequence when add_special_tokens=True.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **TINY_SPECIAL_TOKENS)


def _cache_key(vocab_size: int) -> str:
    """The tokenizer cache's identity, by the project's one fingerprint rule."""
    return fingerprint(
        {
            "format": _TOKENIZER_FORMAT,
            "vocab_size": vocab_size,
            "corpus": tiny_corpus(),
            "specials": TINY_SPECIAL_TOKENS,
        }
    )


def build_tiny_tokenizer(cache_dir: str | Path, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """The tiny tokenizer, trained once and cached in ``cache_dir/tiny-tokenizer-<key>`` (atomic write)."""
    from transformers import PreTrainedTokenizerFast

    key = _cache_key(vocab_size)

    def build(tmp: Path) -> dict[str, Any]:
        train_tiny_tokenizer(vocab_size).save_pretrained(tmp)
        return {"source": "tiny", "cache_key": key, "vocab_size": vocab_size, "format": _TOKENIZER_FORMAT}

    folder = materialize_cache_dir(Path(cache_dir) / f"tiny-tokenizer-{key}", build)
    assert (folder / MANIFEST_NAME).is_file()
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def build_tiny_llm(cfg: LLMConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by ``cfg.tiny_*``, seeded by ``cfg.seed`` (global RNG untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.tiny_hidden,
        intermediate_size=cfg.tiny_intermediate,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads,
        max_position_embeddings=cfg.tiny_max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    return model.float()
