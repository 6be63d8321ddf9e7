"""Prompts with continuous-token placeholders, and the batch builders that track them (method.md section 3).

A prompt is a role sentence naming the domain, an instruction, the user's history and a response prefix::

    You are a music recommender. Given the user's history, describe the user's preference.
    History: Morcheeba <diff><collab_0><collab_1></diff>, Air <diff><collab_0><collab_1></diff>,
    Answer:

The target response (training only) names the target's category and title:
``" The user may prefer (Electronic) music, such as Morcheeba."`` followed by eos.

Placeholder bookkeeping. Every ``<collab_k>`` position is described by three flat LongTensors of length M:

- ``placeholder_positions``: index into the flattened ``[B * L]`` token grid;
- ``placeholder_item_index``: index into the flat list of the batch's (truncated) history items, sample-major
  and in history order (``history_item_ids`` holds their item ids when the caller passed them);
- ``placeholder_branch``: which of the K tokenizer branches fills it.

With ``item_tokens`` the continuous tokenizer output ``[N_items, K, H]``, the values to splice are
``item_tokens[placeholder_item_index, placeholder_branch]`` (``gather_placeholder_values``) and the splice is
one ``index_put`` on the flattened embeddings (``splice_continuous_tokens``): no per-sample Python loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import torch

from deftrec.model.llm import (
    DIFF_CLOSE,
    DIFF_OPEN,
    PlaceholderIds,
    item_placeholder,
    user_placeholder,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerBase
from deftrec.config.components import PromptConfig

__all__ = [
    "DATASET_DOMAINS",
    "DOMAIN_TEMPLATES",
    "DomainTemplate",
    "PromptConfig",
    "build_generation_batch",
    "build_inputs_embeds",
    "build_training_batch",
    "clean_title",
    "domain_for_dataset",
    "earlier_item_bags",
    "gather_placeholder_values",
    "render_history_item",
    "render_prompt",
    "render_response",
    "splice_continuous_tokens",
    "template_for",
]

IGNORE_INDEX = -100  # torch cross-entropy's ignore_index, HF's convention for masked labels


@dataclass(frozen=True)
class DomainTemplate:
    """Wording for one domain: ``role`` names the domain, ``noun`` is used in the response sentence."""

    role: str
    noun: str
    instruction: str = "Given the user's history, describe the user's preference."


DOMAIN_TEMPLATES: dict[str, DomainTemplate] = {
    "music": DomainTemplate(role="You are a music recommender.", noun="music"),
    "movie": DomainTemplate(role="You are a movie recommender.", noun="movies"),
    "software": DomainTemplate(role="You are a software recommender.", noun="software"),
    "product": DomainTemplate(role="You are a product recommender.", noun="products"),
    "book": DomainTemplate(role="You are a book recommender.", noun="books"),
}

# The authors' five datasets (method.md, "Authors' defaults") and their domains.
DATASET_DOMAINS: dict[str, str] = {
    "lastfm": "music",
    "ml1m": "movie",
    "software": "software",
    "beauty": "product",
    "industrial": "product",
}


def domain_for_dataset(name: str) -> str:
    """Domain of a known dataset name; unknown names are used as the domain themselves."""
    return DATASET_DOMAINS.get(name, name)


def template_for(domain: str) -> DomainTemplate:
    """The domain's template, or a generic one that names ``domain`` verbatim."""
    return DOMAIN_TEMPLATES.get(domain) or DomainTemplate(role=f"You are a {domain} recommender.", noun=domain)


# ------------------------------------------------------------------------------------------------ rendering

# Our own markers must never appear inside a title: the tokenizer would turn them into placeholder ids and
# the bookkeeping (one <collab_k> per item and branch) would break.
_MARKER_RE = re.compile(r"</?diff>|<(?:user_)?collab_\d+>")
_SPACE_RE = re.compile(r"\s+")


def clean_title(title: str, max_chars: int) -> str:
    """Title with placeholder markers removed, whitespace collapsed, cut to ``max_chars`` characters."""
    text = _SPACE_RE.sub(" ", _MARKER_RE.sub("", str(title))).strip()
    return text[:max_chars].rstrip()


def _slot_text(cfg: PromptConfig, placeholder) -> str:
    return DIFF_OPEN + "".join(placeholder(k) for k in range(cfg.slots)) + DIFF_CLOSE


def render_history_item(title: str, cfg: PromptConfig) -> str:
    """`` {title} <diff><collab_0>..<collab_{S-1}></diff>,`` with S = ``cfg.slots`` (no title when
    ``cfg.max_title_chars`` is 0; without ``cfg.item_markers``: `` {title}<collab_0>..<collab_{S-1}>``)."""
    if not cfg.item_markers:
        bare = "".join(item_placeholder(k) for k in range(cfg.slots))
        return bare if cfg.max_title_chars == 0 else f" {clean_title(title, cfg.max_title_chars)}{bare}"
    if cfg.max_title_chars == 0:
        return f" {_slot_text(cfg, item_placeholder)},"
    return f" {clean_title(title, cfg.max_title_chars)} {_slot_text(cfg, item_placeholder)},"


def render_prompt(history_titles: Sequence[str], cfg: PromptConfig) -> str:
    """Prompt text for one user; the history is cut to its last ``cfg.max_history`` items."""
    tpl = template_for(cfg.domain)
    kept = list(history_titles)[-cfg.max_history :]
    history = "".join(render_history_item(t, cfg) for t in kept) if kept else " none"
    user = f"\nUser: {_slot_text(cfg, user_placeholder)}" if cfg.user_tokens else ""
    return f"{tpl.role} {tpl.instruction}{user}\nHistory:{history}\nAnswer:"


def render_response(title: str, category: str | None, cfg: PromptConfig) -> str:
    """Target sentence, e.g. ``The user may prefer (Electronic) music, such as Morcheeba.``

    Genre lists joined by ``|`` (ml1m) read as ``Action, Comedy``; a missing category drops the parentheses.
    """
    tpl = template_for(cfg.domain)
    cat = ", ".join(part.strip() for part in str(category or "").split("|") if part.strip())
    cat = _SPACE_RE.sub(" ", _MARKER_RE.sub("", cat))
    lead = f"({cat}) {tpl.noun}" if cat else tpl.noun
    if cfg.max_title_chars == 0:  # titles are left out of the prompts: the sentence names the category only
        return f"The user may prefer {lead}."
    return f"The user may prefer {lead}, such as {clean_title(title, cfg.max_title_chars)}."


# ------------------------------------------------------------------------------------------- batch building


def _pack(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged id lists -> padded ``[B, L]`` ids, attention mask and lengths, in one masked assignment."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = int(lengths.max()) if len(seqs) else 0
    cols = torch.arange(width)
    mask = cols[None, :] >= (width - lengths)[:, None] if left else cols[None, :] < lengths[:, None]
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    # Row-major boolean indexing visits each row's valid span in order, matching the concatenated ids.
    ids[mask] = torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.long)
    return ids, mask.long(), lengths


def _locate(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, slot_ids: Sequence[int], per_sample: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat positions, branch and within-sample entity index of every placeholder in ``slot_ids``.

    ``per_sample[b]`` is how many entities sample b must show; each entity is ``len(slot_ids)`` consecutive
    placeholders in branch order. Raises if the ids found do not follow that pattern.
    """
    width = input_ids.shape[1]
    slots = torch.tensor(list(slot_ids), dtype=torch.long)
    flat_ids = input_ids.reshape(-1)
    found = torch.isin(flat_ids, slots) & attention_mask.reshape(-1).bool()
    positions = found.nonzero().squeeze(1)
    branch = (flat_ids[positions, None] == slots[None, :]).long().argmax(dim=1)
    sample = positions // width
    counts = torch.bincount(sample, minlength=input_ids.shape[0])
    expected = per_sample * len(slots)
    if not torch.equal(counts, expected):
        raise ValueError(f"{what} placeholders per sample {counts.tolist()} != expected {expected.tolist()}")
    starts = torch.cumsum(counts, 0) - counts
    occurrence = torch.arange(positions.numel()) - starts[sample]
    if not torch.equal(branch, occurrence % len(slots)):
        raise ValueError(f"{what} placeholders are not in branch order 0..{len(slots) - 1} within each entity")
    return positions, branch, occurrence // len(slots)


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    ph: PlaceholderIds,
    histories_titles: Sequence[Sequence[str]],
    cfg: PromptConfig,
    histories_items: Sequence[Sequence[int]] | None,
) -> tuple[list[list[int]], torch.Tensor, dict[str, torch.Tensor]]:
    """Tokenise prompts (one batched tokenizer call) and prepare the per-item bookkeeping that needs no grid."""
    if len(ph.item) < cfg.slots:
        raise ValueError(f"PlaceholderIds has {len(ph.item)} item ids, the prompt needs {cfg.slots}")
    if cfg.user_tokens and len(ph.user) < cfg.slots:
        raise ValueError(f"PromptConfig.user_tokens needs {cfg.slots} user placeholder ids, got {len(ph.user)}")
    if histories_items is not None and len(histories_items) != len(histories_titles):
        raise ValueError("histories_items and histories_titles must have the same batch size")
    prompts = [render_prompt(titles, cfg) for titles in histories_titles]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    hist_len = torch.tensor([min(len(t), cfg.max_history) for t in histories_titles], dtype=torch.long)
    extra = {
        "history_lengths": hist_len,
        "item_sample_index": torch.repeat_interleave(torch.arange(len(histories_titles)), hist_len),
    }
    if histories_items is not None:
        if any(len(i) != len(t) for i, t in zip(histories_items, histories_titles)):
            raise ValueError("every histories_items row must be as long as its histories_titles row")
        kept = [list(items)[-cfg.max_history :] for items in histories_items]
        extra["history_item_ids"] = torch.tensor(list(chain.from_iterable(kept)), dtype=torch.long)
    return prompt_ids, hist_len, extra


def _bookkeeping(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, ph: PlaceholderIds, hist_len: torch.Tensor, cfg: PromptConfig
) -> dict[str, torch.Tensor]:
    positions, branch, item_in_sample = _locate(input_ids, attention_mask, ph.item[: cfg.slots], hist_len, "item")
    item_offset = torch.cumsum(hist_len, 0) - hist_len
    out = {
        "placeholder_positions": positions,
        "placeholder_item_index": item_offset[positions // input_ids.shape[1]] + item_in_sample,
        "placeholder_branch": branch,
    }
    if cfg.user_tokens:
        ones = torch.ones_like(hist_len)
        upos, ubranch, _ = _locate(input_ids, attention_mask, ph.user[: cfg.slots], ones, "user")
        out["user_placeholder_positions"] = upos
        out["user_placeholder_index"] = upos // input_ids.shape[1]
        out["user_placeholder_branch"] = ubranch
    return out


def build_training_batch(
    tokenizer: PreTrainedTokenizerBase,
    ph: PlaceholderIds,
    histories_titles: Sequence[Sequence[str]],
    target_titles: Sequence[str],
    target_categories: Sequence[str | None],
    cfg: PromptConfig,
    histories_items: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded teacher-forcing batch: ``prompt + " " + response + eos``.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` ``[B, L]``; ``labels`` (-100 on prompt and
    padding, the response ids and eos kept, unshifted: HF causal LMs shift inside); ``response_mask`` (the
    response text tokens, eos excluded, for pooling the condition); ``prompt_lengths`` and
    ``prompt_last_index`` ``[B]`` (the last prompt position, for the ``prompt_state`` condition); the
    placeholder bookkeeping of the module docstring; ``history_lengths`` ``[B]``, ``item_sample_index``
    ``[N]`` and, when ``histories_items`` is given, ``history_item_ids`` ``[N]``.
    """
    n = len(histories_titles)
    if n == 0 or len(target_titles) != n or len(target_categories) != n:
        raise ValueError("need a non-empty batch with one target title and category per history")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs eos and pad tokens (load_llm sets pad)")
    prompt_ids, hist_len, extra = _encode(tokenizer, ph, histories_titles, cfg, histories_items)
    responses = [" " + render_response(t, c, cfg) for t, c in zip(target_titles, target_categories)]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    input_ids, attention_mask, lengths = _pack(
        [p + r + eos for p, r in zip(prompt_ids, response_ids)], tokenizer.pad_token_id, left=False
    )
    prompt_len = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    cols = torch.arange(input_ids.shape[1])[None, :]
    in_answer = (cols >= prompt_len[:, None]) & (cols < lengths[:, None])
    labels = input_ids.masked_fill(~in_answer, IGNORE_INDEX)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": cols.expand_as(input_ids).clone(),
        "labels": labels,
        "response_mask": (in_answer & (cols < (lengths - 1)[:, None])).long(),
        "prompt_lengths": prompt_len,
        "prompt_last_index": prompt_len - 1,
    }
    batch.update(_bookkeeping(input_ids, attention_mask, ph, hist_len, cfg))
    batch.update(extra)
    return batch


def build_generation_batch(
    tokenizer: PreTrainedTokenizerBase,
    ph: PlaceholderIds,
    histories_titles: Sequence[Sequence[str]],
    cfg: PromptConfig,
    histories_items: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded prompt-only batch for decoding, so every prompt ends at the last column.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (``cumsum(mask) - 1``, 0 on padding: the
    positions HF ``generate`` derives, needed when calling ``forward`` directly on a left-padded batch),
    ``prompt_lengths``, ``prompt_last_index`` (= L - 1 for all rows) and the same placeholder bookkeeping as
    ``build_training_batch``.
    """
    if len(histories_titles) == 0:
        raise ValueError("need a non-empty batch")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token (load_llm sets it)")
    prompt_ids, hist_len, extra = _encode(tokenizer, ph, histories_titles, cfg, histories_items)
    input_ids, attention_mask, lengths = _pack(prompt_ids, tokenizer.pad_token_id, left=True)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        "prompt_lengths": lengths,
        "prompt_last_index": torch.full_like(lengths, input_ids.shape[1] - 1),
    }
    batch.update(_bookkeeping(input_ids, attention_mask, ph, hist_len, cfg))
    batch.update(extra)
    return batch


# ------------------------------------------------------------------------------------------------ splicing


def gather_placeholder_values(
    entity_tokens: torch.Tensor, entity_index: torch.Tensor, branch: torch.Tensor
) -> torch.Tensor:
    """``[M, H]`` values for the placeholders: ``entity_tokens[entity_index, branch]``.

    ``entity_tokens`` is the continuous tokenizer output ``[N, K, H]``, or ``[N, H]`` with ``combine_sum``.
    """
    if entity_tokens.dim() == 2:
        entity_tokens = entity_tokens.unsqueeze(1)
    if entity_tokens.dim() != 3:
        raise ValueError(f"entity_tokens must be [N, K, H] or [N, H], got shape {tuple(entity_tokens.shape)}")
    return entity_tokens[entity_index, branch]


def splice_continuous_tokens(
    inputs_embeds: torch.Tensor, flat_positions: torch.Tensor, token_values: torch.Tensor
) -> torch.Tensor:
    """Replace rows of ``inputs_embeds`` ``[B, L, H]`` at ``flat_positions`` (indices into ``B * L``).

    out.view(B*L, H)[flat_positions[m]] = token_values[m]; all other rows are copied. One out-of-place
    ``index_put``: gradients reach ``token_values`` and the untouched rows of ``inputs_embeds``, and a leaf
    that requires grad is never written in place. Positions must be unique (the builders guarantee it).
    """
    batch, length, hidden = inputs_embeds.shape
    if token_values.dim() != 2 or token_values.shape != (flat_positions.numel(), hidden):
        raise ValueError(
            f"token_values must be [{flat_positions.numel()}, {hidden}], got {tuple(token_values.shape)}"
        )
    flat = inputs_embeds.reshape(batch * length, hidden)
    out = flat.index_put((flat_positions.to(flat.device),), token_values.to(flat.dtype))
    return out.view(batch, length, hidden)


def build_inputs_embeds(
    embedding: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    item_tokens: torch.Tensor,
    user_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token embeddings of ``batch["input_ids"]`` with the placeholders replaced by continuous tokens.

    ``embedding`` is ``model.get_input_embeddings()``; ``item_tokens`` ``[N, K, H]`` (or ``[N, H]``) follows the
    flat item order of the batch; ``user_tokens`` ``[B, K, H]`` is required when the batch has user slots.
    """
    embeds = embedding(batch["input_ids"].to(item_tokens.device))
    values = gather_placeholder_values(item_tokens, batch["placeholder_item_index"], batch["placeholder_branch"])
    positions = batch["placeholder_positions"]
    if "user_placeholder_positions" in batch:
        if user_tokens is None:
            raise ValueError("the batch has user placeholders: pass user_tokens [B, K, H]")
        user_values = gather_placeholder_values(
            user_tokens, batch["user_placeholder_index"], batch["user_placeholder_branch"]
        )
        values = torch.cat([values, user_values])
        positions = torch.cat([positions, batch["user_placeholder_positions"]])
    return splice_continuous_tokens(embeds, positions.to(embeds.device), values)


def earlier_item_bags(histories, max_history: int) -> dict[str, torch.Tensor]:
    """The items of each history before its prompt window (its newest ``max_history``), as one flat
    id tensor and each history's offset in it: ``F.embedding_bag``'s layout, where a history that fits
    the window is an empty bag."""
    import numpy as np

    earlier = [np.asarray(h, dtype=np.int64).reshape(-1)[:-max_history] for h in histories]
    offsets = np.concatenate([[0], np.cumsum([e.size for e in earlier])[:-1]]).astype(np.int64)
    flat = np.concatenate(earlier) if earlier else np.zeros(0, dtype=np.int64)
    return {"earlier_item_ids": torch.as_tensor(flat), "earlier_offsets": torch.as_tensor(offsets)}
