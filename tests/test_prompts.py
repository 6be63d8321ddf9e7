"""Prompt rendering, batch building and continuous-token splicing (method.md section 3)."""

from __future__ import annotations

import pytest
import torch

from deftrec.config.components import PromptConfig
from deftrec.model.llm import (
    PlaceholderIds,
    add_placeholder_tokens,
    item_placeholder,
    user_placeholder,
)
from deftrec.model.prompts import (
    DATASET_DOMAINS,
    build_generation_batch,
    build_inputs_embeds,
    build_training_batch,
    clean_title,
    domain_for_dataset,
    gather_placeholder_values,
    render_history_item,
    render_prompt,
    render_response,
    splice_continuous_tokens,
)

torch.set_num_threads(1)

# Different lengths, an empty history, a title longer than max_title_chars, a title carrying a marker.
HISTORIES = [
    ["Morcheeba", "Air", "Massive Attack"],
    [],
    ["A very long title that certainly goes past the forty character limit"],
    ["Zero 7 <collab_1> live", "Bonobo"],
]
HISTORY_ITEMS = [[10, 11, 12], [], [7], [3, 4]]
TARGETS = ["Portishead", "Blur", "Daft Punk", "Moby"]
CATEGORIES = ["Electronic", "Rock|Pop", None, "Trip-Hop"]


class _Embedding(torch.nn.Module):
    """Stand-in for model.get_input_embeddings(): only the lookup matters here."""

    def __init__(self, n: int, h: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, h, generator=torch.Generator().manual_seed(0)))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]

    def resize_token_embeddings(self, n: int) -> None:
        with torch.no_grad():
            extra = torch.zeros(n - self.weight.shape[0], self.weight.shape[1])
            self.weight = torch.nn.Parameter(torch.cat([self.weight.data, extra]))

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]


@pytest.fixture(scope="module")
def tok_ph(tmp_path_factory):
    from deftrec.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(tmp_path_factory.mktemp("cache"))
    emb = _Embedding(len(tokenizer), 8)
    ph = add_placeholder_tokens(emb, tokenizer, K=3, user_tokens=True)
    return tokenizer, ph, emb


# ------------------------------------------------------------------------------------------------ rendering


def test_config_validation():
    for bad in ({"K": 0}, {"max_title_chars": -1}, {"max_history": 0}, {"domain": " "}):
        with pytest.raises(ValueError):
            PromptConfig(**bad)
    assert PromptConfig(K=3, combine_sum=True).slots == 1
    assert PromptConfig(K=3).slots == 3


def test_prompts_without_titles_hold_the_continuous_tokens_only():
    cfg = PromptConfig(domain="music", K=2, max_title_chars=0)
    assert render_history_item("Air", cfg) == " <diff><collab_0><collab_1></diff>,"
    assert "Air" not in render_prompt(["Air", "Morcheeba"], cfg)
    assert render_response("Air", "Electronic", cfg) == "The user may prefer (Electronic) music."


def test_prompts_without_item_markers_hold_the_bare_placeholders():
    """item_markers=false: each item is its K placeholders, nothing else (K tokens instead of K + 4)."""
    bare = PromptConfig(domain="music", K=2, max_title_chars=0, item_markers=False)
    assert render_history_item("Air", bare) == "<collab_0><collab_1>"
    assert "History:<collab_0><collab_1><collab_0><collab_1>\n" in render_prompt(["Air", "Morcheeba"], bare)
    titled = PromptConfig(domain="music", K=2, max_title_chars=3, item_markers=False)
    assert render_history_item("Morcheeba", titled) == " Mor<collab_0><collab_1>"


def test_title_cleaning_and_truncation():
    assert clean_title("abcdefghij", 5) == "abcde"
    assert clean_title("  Zero 7 <collab_1>\n live </diff>", 40) == "Zero 7 live"
    assert clean_title("abcd efgh", 5) == "abcd"  # trailing space of the cut removed
    long = HISTORIES[2][0]
    assert render_history_item(long, PromptConfig(K=2)) == f" {long[:40]} <diff><collab_0><collab_1></diff>,"


def test_prompt_has_k_placeholders_per_item_and_keeps_last_items():
    cfg = PromptConfig(domain="music", K=3, max_history=2)
    text = render_prompt(["first", "second", "third"], cfg)
    assert text.startswith("You are a music recommender. Given the user's history, describe the user's preference.")
    assert text.endswith("\nAnswer:")
    assert "first" not in text and "second <diff>" in text and "third <diff>" in text
    for k in range(3):
        assert text.count(item_placeholder(k)) == 2
    assert text.count("<diff>") == 2 and text.count("</diff>") == 2
    assert "<user_collab_0>" not in text
    assert render_prompt([], cfg).endswith("History: none\nAnswer:")


def test_combine_sum_uses_one_placeholder_per_item():
    text = render_prompt(["a", "b"], PromptConfig(K=3, combine_sum=True, user_tokens=True))
    assert text.count("<collab_0>") == 2 and "<collab_1>" not in text
    assert text.count("<user_collab_0>") == 1 and "<user_collab_1>" not in text


def test_response_wording():
    assert render_response("Morcheeba", "Electronic", PromptConfig(domain="music")) == (
        "The user may prefer (Electronic) music, such as Morcheeba."
    )
    assert render_response("Heat (1995)", "Action|Crime|Thriller", PromptConfig(domain="movie")) == (
        "The user may prefer (Action, Crime, Thriller) movies, such as Heat (1995)."
    )
    assert render_response("X", None, PromptConfig(domain="software")) == "The user may prefer software, such as X."
    # unknown domain: generic wording naming it verbatim
    assert render_prompt([], PromptConfig(domain="podcast")).startswith("You are a podcast recommender.")
    podcast = PromptConfig(domain="podcast")
    assert render_response("Y", "News", podcast) == "The user may prefer (News) podcast, such as Y."
    assert domain_for_dataset("lastfm") == "music" and domain_for_dataset("ml1m") == "movie"
    assert domain_for_dataset("unknown-set") == "unknown-set" and set(DATASET_DOMAINS) >= {"software", "beauty"}


# ------------------------------------------------------------------------------------------- batch building


def _reference_slots(input_ids, attention_mask, slot_ids, entity_offsets):
    """Plain-Python scan: (flat position, entity index, branch) of every placeholder, in order."""
    out = []
    width = input_ids.shape[1]
    for b in range(input_ids.shape[0]):
        seen = 0
        for j in range(width):
            tid = int(input_ids[b, j])
            if attention_mask[b, j] and tid in slot_ids:
                out.append((b * width + j, entity_offsets[b] + seen // len(slot_ids), slot_ids.index(tid)))
                seen += 1
    return out


@pytest.mark.parametrize("combine_sum,item_markers", [(False, True), (True, True), (False, False)])
def test_training_batch_labels_and_bookkeeping(tok_ph, combine_sum, item_markers):
    tokenizer, ph, _ = tok_ph
    cfg = PromptConfig(domain="music", K=3, combine_sum=combine_sum, max_history=20, item_markers=item_markers)
    batch = build_training_batch(tokenizer, ph, HISTORIES, TARGETS, CATEGORIES, cfg, histories_items=HISTORY_ITEMS)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert ids.shape == labels.shape == mask.shape == batch["response_mask"].shape
    for b in range(len(HISTORIES)):
        prompt = tokenizer(render_prompt(HISTORIES[b], cfg))["input_ids"]
        response = tokenizer(" " + render_response(TARGETS[b], CATEGORIES[b], cfg), add_special_tokens=False)[
            "input_ids"
        ]
        n_p, n = len(prompt), len(prompt) + len(response) + 1
        # right padding: tokens first, then pad
        assert ids[b, :n].tolist() == prompt + response + [eos]
        assert mask[b].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert (ids[b, n:] == pad).all()
        # labels: -100 exactly on prompt and padding, response + eos kept
        assert (labels[b, :n_p] == -100).all() and (labels[b, n:] == -100).all()
        kept = labels[b][labels[b] != -100].tolist()
        assert kept == response + [eos]
        assert tokenizer.decode(kept) == " " + render_response(TARGETS[b], CATEGORIES[b], cfg) + tokenizer.eos_token
        # response_mask: response text only, eos excluded
        assert batch["response_mask"][b].nonzero().squeeze(1).tolist() == list(range(n_p, n - 1))
        assert batch["prompt_last_index"][b] == n_p - 1
    # bookkeeping matches an explicit scan of input_ids
    hist_len = [min(len(h), cfg.max_history) for h in HISTORIES]
    offsets = [sum(hist_len[:b]) for b in range(len(HISTORIES))]
    ref = _reference_slots(ids, mask, list(ph.item[: cfg.slots]), offsets)
    got = list(
        zip(
            batch["placeholder_positions"].tolist(),
            batch["placeholder_item_index"].tolist(),
            batch["placeholder_branch"].tolist(),
        )
    )
    assert got == ref and len(ref) == sum(hist_len) * cfg.slots
    assert batch["history_lengths"].tolist() == hist_len
    assert batch["item_sample_index"].tolist() == [0, 0, 0, 2, 3, 3]
    assert batch["history_item_ids"].tolist() == [10, 11, 12, 7, 3, 4]
    # the marker inside a title was stripped, so item 3 ("Zero 7 ...") still has exactly `slots` placeholders
    assert (batch["placeholder_item_index"] == 4).sum() == cfg.slots


def test_history_truncation_bookkeeping(tok_ph):
    tokenizer, ph, _ = tok_ph
    cfg = PromptConfig(K=2, max_history=2)
    batch = build_training_batch(
        tokenizer, ph, HISTORIES, TARGETS, CATEGORIES, cfg, histories_items=HISTORY_ITEMS
    )
    assert batch["history_lengths"].tolist() == [2, 0, 1, 2]
    assert batch["history_item_ids"].tolist() == [11, 12, 7, 3, 4]
    assert batch["placeholder_item_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch["placeholder_branch"].tolist() == [0, 1] * 5


def test_user_placeholders(tok_ph):
    tokenizer, ph, _ = tok_ph
    cfg = PromptConfig(K=2, user_tokens=True)
    batch = build_training_batch(tokenizer, ph, HISTORIES, TARGETS, CATEGORIES, cfg)
    ref = _reference_slots(batch["input_ids"], batch["attention_mask"], list(ph.user[:2]), list(range(4)))
    got = list(
        zip(
            batch["user_placeholder_positions"].tolist(),
            batch["user_placeholder_index"].tolist(),
            batch["user_placeholder_branch"].tolist(),
        )
    )
    assert got == ref and len(ref) == 4 * 2
    assert "history_item_ids" not in batch


def test_generation_batch_left_padding(tok_ph):
    tokenizer, ph, _ = tok_ph
    cfg = PromptConfig(domain="movie", K=3)
    batch = build_generation_batch(tokenizer, ph, HISTORIES, cfg, histories_items=HISTORY_ITEMS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    width = ids.shape[1]
    assert "labels" not in batch
    for b, hist in enumerate(HISTORIES):
        prompt = tokenizer(render_prompt(hist, cfg))["input_ids"]
        n = len(prompt)
        assert ids[b, width - n :].tolist() == prompt  # prompt flush right
        assert mask[b].tolist() == [0] * (width - n) + [1] * n
        assert (ids[b, : width - n] == tokenizer.pad_token_id).all()
        assert batch["position_ids"][b, width - n :].tolist() == list(range(n))
        assert batch["prompt_lengths"][b] == n
    assert (batch["prompt_last_index"] == width - 1).all()
    hist_len = [len(h) for h in HISTORIES]
    ref = _reference_slots(ids, mask, list(ph.item[:3]), [sum(hist_len[:b]) for b in range(4)])
    got = list(
        zip(
            batch["placeholder_positions"].tolist(),
            batch["placeholder_item_index"].tolist(),
            batch["placeholder_branch"].tolist(),
        )
    )
    assert got == ref


def test_builders_reject_inconsistent_inputs(tok_ph):
    tokenizer, ph, _ = tok_ph
    with pytest.raises(ValueError):  # more slots than placeholder ids
        build_generation_batch(tokenizer, ph, HISTORIES, PromptConfig(K=4))
    with pytest.raises(ValueError):  # user slots requested, none registered
        small = PlaceholderIds(diff_open=ph.diff_open, diff_close=ph.diff_close, item=ph.item)
        build_generation_batch(tokenizer, small, HISTORIES, PromptConfig(K=2, user_tokens=True))
    with pytest.raises(ValueError):  # one target missing
        build_training_batch(tokenizer, ph, HISTORIES, TARGETS[:-1], CATEGORIES, PromptConfig(K=2))
    with pytest.raises(ValueError):  # item ids not aligned with titles
        build_generation_batch(tokenizer, ph, HISTORIES, PromptConfig(K=2), histories_items=[[1], [], [7], [3, 4]])


# ------------------------------------------------------------------------------------------------ splicing


def test_splice_matches_loop_and_gradients_flow():
    gen = torch.Generator().manual_seed(1)
    B, L, H = 3, 7, 5
    base = torch.randn(B, L, H, generator=gen, requires_grad=True)
    positions = torch.tensor([0, 3, 8, 20, 15])
    values = torch.randn(len(positions), H, generator=gen, requires_grad=True)
    out = splice_continuous_tokens(base, positions, values)
    ref = base.detach().clone()
    for m, p in enumerate(positions.tolist()):
        ref[p // L, p % L] = values.detach()[m]
    assert torch.equal(out.detach(), ref)
    weight = torch.randn(B, L, H, generator=gen)
    (out * weight).sum().backward()
    flat_w = weight.reshape(B * L, H)
    # d/d values[m] of sum(out * W) = W at the spliced position; replaced base rows get no gradient
    assert torch.allclose(values.grad, flat_w[positions])
    expected_base_grad = flat_w.clone()
    expected_base_grad[positions] = 0
    assert torch.allclose(base.grad.reshape(B * L, H), expected_base_grad)
    with pytest.raises(ValueError):
        splice_continuous_tokens(base, positions, values[:-1])


def test_build_inputs_embeds_with_items_and_users(tok_ph):
    tokenizer, ph, emb = tok_ph
    cfg = PromptConfig(K=2, user_tokens=True)
    batch = build_training_batch(tokenizer, ph, HISTORIES, TARGETS, CATEGORIES, cfg)
    n_items = int(batch["history_lengths"].sum())
    gen = torch.Generator().manual_seed(2)
    items = torch.randn(n_items, 2, 8, generator=gen, requires_grad=True)
    users = torch.randn(len(HISTORIES), 2, 8, generator=gen, requires_grad=True)
    out = build_inputs_embeds(emb, batch, items, users)
    # reference: look up ids, then overwrite slot by slot with a loop
    ref = emb.weight.detach()[batch["input_ids"]].clone()
    width = batch["input_ids"].shape[1]
    for p, i, k in zip(*(batch[f"placeholder_{n}"].tolist() for n in ("positions", "item_index", "branch"))):
        ref[p // width, p % width] = items.detach()[i, k]
    for p, u, k in zip(*(batch[f"user_placeholder_{n}"].tolist() for n in ("positions", "index", "branch"))):
        ref[p // width, p % width] = users.detach()[u, k]
    assert torch.equal(out.detach(), ref)
    out.sum().backward()
    # every item/user token is used exactly once, so each gets a gradient of all ones
    assert torch.equal(items.grad, torch.ones_like(items)) and torch.equal(users.grad, torch.ones_like(users))
    with pytest.raises(ValueError):
        build_inputs_embeds(emb, batch, items.detach())  # user slots but no user tokens


def test_gather_combine_sum_shape():
    tokens = torch.arange(12.0).reshape(4, 3)  # [N, H] (combine_sum)
    got = gather_placeholder_values(tokens, torch.tensor([2, 0]), torch.tensor([0, 0]))
    assert torch.equal(got, tokens[[2, 0]])
    three = torch.arange(24.0).reshape(2, 3, 4)
    got = gather_placeholder_values(three, torch.tensor([1, 0]), torch.tensor([2, 1]))
    assert torch.equal(got, three[[1, 0], [2, 1]])


def test_placeholder_strings():
    assert item_placeholder(3) == "<collab_3>" and user_placeholder(0) == "<user_collab_0>"
