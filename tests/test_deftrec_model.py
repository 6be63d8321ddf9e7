"""DeftRec module, training task and inference path (tiny preset), plus a real learning check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deftrec.config.pipeline import load_deftrec_config
from deftrec.data.samples import ItemCatalog, Ragged
from deftrec.model.deftrec import DeftRec, DeftRecTask, keyed_normal
from deftrec.model.prompts import IGNORE_INDEX
from deftrec.retrieval.metrics import mask_history, topk
from deftrec.retrieval.recommender import DeftRecRecommender
from deftrec.training.optim import build_optimizer, build_scheduler, lr_factor

torch.set_num_threads(1)

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "tiny.yaml"
N_ITEMS, D_C = 30, 32
HISTORIES = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [2, 12, 13, 2], [14, 15]]
TARGETS = [4, 16, 17, 18, 19]
USERS = [10, 11, 12, 13, 14]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def catalog() -> ItemCatalog:
    ids = np.array([str(i) for i in range(N_ITEMS)], dtype=object)
    titles = np.array([f"Song {i}" for i in range(N_ITEMS)], dtype=object)
    cats = np.array(["Jazz" if i % 2 else "Rock" for i in range(N_ITEMS)], dtype=object)
    return ItemCatalog(ids, titles, cats)


@pytest.fixture(scope="module")
def item_emb() -> np.ndarray:
    return np.random.default_rng(0).normal(scale=0.1, size=(N_ITEMS, D_C)).astype(np.float32)


@pytest.fixture(scope="module")
def build(cache, catalog, item_emb):
    def _build(*overrides: str, user_emb=None) -> DeftRec:
        cfg = load_deftrec_config(TINY, [f"llm.cache_dir={cache}", f"collab.dim={D_C}", "eval.steps=5",
                                         "eval.max_gen_tokens=6", "prompt.max_title_chars=12", *overrides])
        torch.manual_seed(0)
        return DeftRec.from_config(cfg, item_emb, user_emb, catalog)

    return _build


@pytest.fixture(scope="module")
def model(build) -> DeftRec:
    return build("condition=prompt_state", "train.positions=last", "train.lambda_lm=0.1")


# --------------------------------------------------------------------------------------------- training


def test_task_loss_parts_shapes_and_gradients(model):
    model.train()
    batch = model.make_batch(HISTORIES, TARGETS, USERS)
    seen = {}
    orig = model.head.loss

    def spy(x0, cond, neg_x0=None, **kw):
        seen.update(x0=tuple(x0.shape), cond=tuple(cond.shape), neg=None if neg_x0 is None else tuple(neg_x0.shape))
        return orig(x0, cond, neg_x0, **kw)

    model.head.loss = spy
    try:
        parts = DeftRecTask(model)(batch, generator=torch.Generator().manual_seed(0))
    finally:
        del model.head.loss
    R = model.cfg.diffusion.batch_mul
    B = len(HISTORIES)
    # per-sample shapes: one x0 row per (sample, draw), never broadcast across the batch
    assert seen == {"x0": (B * R, D_C), "cond": (B * R, model.cfg.d_llm), "neg": (B * R, D_C)}
    assert set(parts) == {"lm", "pos", "neg", "ce", "total"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in parts.values())
    assert parts["lm"] > 0 and parts["pos"] > 0
    lam = model.cfg.train.lambda_lm
    lneg, lce = model.cfg.diffusion.lambda_neg, model.cfg.diffusion.lambda_ce
    assert torch.allclose(parts["total"], lam * parts["lm"] + parts["pos"] + lneg * parts["neg"] + lce * parts["ce"],
                          atol=1e-6)
    model.zero_grad()
    parts["total"].backward()
    for name in ("item_tokenizer.w_out", "head.denoiser.out.weight", "head.denoiser.cond_proj.0.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.llm.parameters())
    model.zero_grad()


def test_lm_loss_only_on_response_tokens(model):
    model.eval()
    batch = model.make_batch(HISTORIES, TARGETS)
    labels = batch["labels"]
    with torch.no_grad():
        embeds, hidden = model.encode(batch)
        ours = model.lm_loss(hidden, labels)
        # independent: full-vocabulary logits from the HF model and a hand-rolled masked mean
        logits = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    sel = tgt != IGNORE_INDEX
    expected = -logp[sel].gather(1, tgt[sel][:, None]).mean()
    assert torch.allclose(ours, expected, atol=1e-5)
    # the supervised positions are exactly the response tokens (+ eos) of each sample
    tok = model.text_tokenizer
    for b in range(len(HISTORIES)):
        n_resp = int(batch["response_mask"][b].sum())
        sup = labels[b][labels[b] != IGNORE_INDEX]
        assert sup.numel() == n_resp + 1 and int(sup[-1]) == tok.eos_token_id
        assert (labels[b, : int(batch["prompt_lengths"][b])] == IGNORE_INDEX).all()  # no prompt token
        cat = "Jazz" if TARGETS[b] % 2 else "Rock"
        assert tok.decode(sup[:-1]).strip() == f"The user may prefer ({cat}) music, such as Song {TARGETS[b]}."


def test_splicing_puts_the_right_item_tokens_at_placeholders(model):
    model.eval()  # no feature masking: tokenizer outputs are deterministic
    batch = model.make_batch(HISTORIES, TARGETS)
    with torch.no_grad():
        embeds = model.embed(batch)
        plain = model.llm.get_input_embeddings()(batch["input_ids"])
    ph = model.placeholders
    K = model.cfg.tokenizer.K
    for b, full_hist in enumerate(HISTORIES):
        hist = full_hist[-model.cfg.prompt.max_history:]  # the prompt shows the newest items only
        ids = batch["input_ids"][b].tolist()
        slots = [i for i, t in enumerate(ids) if t in ph.item]
        assert len(slots) == K * len(hist)
        with torch.no_grad():
            want = model.item_tokenizer(model.x0_table[torch.tensor(hist)])  # [len(hist), K, H]
        for j, pos in enumerate(slots):
            item, k = divmod(j, K)
            assert ids[pos] == ph.item[k]  # branch order inside each <diff> group
            assert torch.allclose(embeds[b, pos], want[item, k], atol=1e-6)
        others = [i for i in range(len(ids)) if i not in set(slots)]
        assert torch.equal(embeds[b, others], plain[b, others])  # everything else is the word embedding


def test_conditions_match_independent_pooling(build, model):
    model.eval()
    batch = model.make_batch(HISTORIES, TARGETS)
    mask = batch["response_mask"].bool()
    with torch.no_grad():
        embeds = model.embed(batch)
        hidden = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], output_hidden_states=True).hidden_states[-1]
        conds = {k: model.condition(batch, kind=k) for k in ("prompt_state", "response_embeddings", "hidden_states")}
    for b in range(len(HISTORIES)):
        assert torch.allclose(conds["response_embeddings"][b], embeds[b][mask[b]].mean(0), atol=1e-5)
        assert torch.allclose(conds["hidden_states"][b], hidden[b][mask[b]].mean(0), atol=1e-5)
        last = int(batch["prompt_lengths"][b]) - 1
        assert torch.allclose(conds["prompt_state"][b], hidden[b, last], atol=1e-5)
    for c in conds.values():
        assert c.shape == (len(HISTORIES), model.cfg.d_llm) and c.dtype == torch.float32


def test_prompt_state_does_not_see_the_target(model):
    model.eval()
    other = [(t + 7) % N_ITEMS for t in TARGETS]
    a, b = model.make_batch(HISTORIES, TARGETS), model.make_batch(HISTORIES, other)
    with torch.no_grad():
        pa, pb = model.condition(a, kind="prompt_state"), model.condition(b, kind="prompt_state")
        ra, rb = model.condition(a, kind="response_embeddings"), model.condition(b, kind="response_embeddings")
    assert torch.allclose(pa, pb, atol=1e-5)
    assert not torch.allclose(ra, rb, atol=1e-3)  # the response-based conditions do see it (by design)


def test_user_tokens_are_spliced(build, item_emb):
    U = np.random.default_rng(1).normal(size=(20, D_C)).astype(np.float32)
    m = build("tokenizer.user_tokens=true", user_emb=U).eval()
    batch = m.make_batch(HISTORIES, TARGETS, USERS)
    with torch.no_grad():
        embeds = m.embed(batch)
        want = m.user_tokenizer(m.user_emb[torch.tensor(USERS)] * m.user_scale)
    for b in range(len(HISTORIES)):
        ids = batch["input_ids"][b].tolist()
        for k, tid in enumerate(m.placeholders.user):
            assert torch.allclose(embeds[b, ids.index(tid)], want[b, k], atol=1e-6)
    with pytest.raises(ValueError, match="users"):
        m.make_batch(HISTORIES, TARGETS)


# --------------------------------------------------------------------------------------------- inference


def test_keyed_normal_is_batch_independent_and_normal():
    keys = torch.arange(2000)
    z = keyed_normal(3, keys, stream=0, dim=64)
    assert z.shape == (2000, 64)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01
    assert torch.equal(keyed_normal(3, keys[[5, 17]], 0, 64), z[[5, 17]])  # rows depend on the key only
    assert not torch.equal(keyed_normal(4, keys[:2], 0, 64), z[:2])
    assert not torch.equal(keyed_normal(3, keys[:2], 1, 64), z[:2])
    # neighbouring keys / columns are uncorrelated
    c = torch.corrcoef(torch.stack([z[:-1].reshape(-1), z[1:].reshape(-1)]))[0, 1]
    assert abs(float(c)) < 0.02


def test_scores_are_negative_squared_distances(model):
    rec = DeftRecRecommender(model)
    x0 = torch.randn(4, D_C)
    s = rec.scores(x0)
    want = -torch.cdist(x0 / model.x0_scale, model.item_emb).pow(2)
    assert torch.allclose(s, want, atol=1e-4)


@pytest.mark.parametrize("condition", ["prompt_state", "response_embeddings", "hidden_states"])
def test_batched_equals_one_at_a_time_and_seeded(build, condition):
    m = build(f"condition={condition}", "train.positions=last", "train.lambda_lm=0.1").eval()
    rec = DeftRecRecommender(m)
    together = rec.recommend(HISTORIES, USERS, k=5, seed=1, batch_size=len(HISTORIES), explain=True)
    for i, (h, u) in enumerate(zip(HISTORIES, USERS)):
        alone = rec.recommend([h], [u], k=5, seed=1, explain=True)
        assert alone.items[0].tolist() == together.items[i].tolist()
        assert np.allclose(alone.scores[0], together.scores[i], atol=1e-4)
        assert alone.reasoning[0] == together.reasoning[i]
    again = rec.recommend(HISTORIES, USERS, k=5, seed=1, batch_size=2)
    assert np.array_equal(again.items, together.items) and again.reasoning is None
    other = rec.score_users(HISTORIES, USERS, seed=2)
    assert not np.allclose(other, rec.score_users(HISTORIES, USERS, seed=1))


def test_generation_loop_matches_teacher_forcing(build):
    """The KV-cached greedy loop gives the condition a full pass over prompt + generated text gives."""
    m = build("condition=hidden_states", "train.positions=last", "train.lambda_lm=0.1", "eval.max_gen_tokens=5").eval()
    rec = DeftRecRecommender(m)
    cond, text = rec.conditions(HISTORIES, explain=True)
    batch = m.make_batch(HISTORIES, generation=True)
    with torch.no_grad():
        embeds = m.embed(batch)
        out = m.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=True)
        from deftrec.model.deftrec import _cache_of

        ids, keep, _, _ = rec._greedy(batch, out.last_hidden_state[:, -1], _cache_of(out), need_hidden=False)
        emb = m.llm.get_input_embeddings()
        for b in range(len(HISTORIES)):
            n_prompt = int(batch["attention_mask"][b].sum())
            gen = ids[b][keep[b]]
            prompt_ids = batch["input_ids"][b, -n_prompt:]
            full = torch.cat([prompt_ids, gen])[None]
            item_tok = m.item_tokenizer(m.x0_table[torch.tensor(HISTORIES[b][-m.cfg.prompt.max_history:])])
            e = emb(full)
            K = m.cfg.tokenizer.K
            slots = [i for i in range(n_prompt) if int(full[0, i]) in m.placeholders.item]
            for j, pos in enumerate(slots):  # splice by hand, prompt only (generated ids are plain tokens)
                e[0, pos] = item_tok[j // K, j % K]
            h = m.decoder(inputs_embeds=e).last_hidden_state[0]
            want = h[n_prompt:].mean(0) if gen.numel() else torch.zeros_like(cond[b])
            assert torch.allclose(cond[b], want, atol=1e-4)
            assert text[b] == m.text_tokenizer.decode(gen, skip_special_tokens=True).strip()


def test_history_exclusion_and_score_matrix_agree(model):
    rec = DeftRecRecommender(model)
    hist = Ragged.from_lists(HISTORIES)
    full = rec.score_users(hist, USERS, seed=3)
    assert full.shape == (len(HISTORIES), N_ITEMS)
    excl = rec.recommend(hist, USERS, k=10, seed=3, exclude_history=True)
    kept = rec.recommend(hist, USERS, k=10, seed=3, exclude_history=False)
    for i, h in enumerate(HISTORIES):
        assert not set(excl.items[i].tolist()) & set(h)
    # same as masking the full score matrix and ranking it with the metrics' tie rule
    assert np.array_equal(excl.items, topk(mask_history(full, HISTORIES), 10)[0])
    assert np.array_equal(kept.items, topk(full, 10)[0])


# --------------------------------------------------------------------------------------------- optimisation


def test_lr_schedule_closed_form():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(100, 10, 100, min_ratio=0.2) == pytest.approx(0.2)


def test_optimizer_groups_and_the_task_overfits_one_batch(build):
    m = build("train.lr=0.003", "train.llm_lr=0.001", "train.warmup_steps=1", "train.max_steps=40")
    opt = build_optimizer(m, m.cfg)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"heads": 0.003, "llm": 0.001}
    sched = build_scheduler(opt, m.cfg, total_steps=40)
    task = DeftRecTask(m)
    m.train()
    batch = m.make_batch(HISTORIES, TARGETS, USERS)
    first = last = None
    for step in range(40):
        # the same noise every step: the loss must fall on this fixed problem
        parts = task(batch, generator=torch.Generator().manual_seed(0))
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        first = float(parts["total"]) if first is None else first
        last = float(parts["total"])
    assert last < 0.7 * first
    assert lr_factor(100, 10, 100, min_ratio=0.2) == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------- learning


def test_learns_beyond_popularity_and_ease(ray_session, tmp_path, cache):
    """The pipeline's training job (one worker) on the tiny preset and a synthetic log beats popularity
    (2x) and EASE on test NDCG@10: full catalog, the whole history excluded, the same test users for
    every model.

    (The last-item Markov chain, the generator's own structure, still wins here: see the quality
    issue's closing note for the measured gap.)
    """
    from deftrec.batch.baselines import EASE, Popularity, run_baselines
    from deftrec.config.data import PreprocessConfig, SynthConfig
    from deftrec.data.preprocess import run_preprocess
    from deftrec.data.samples import load_dataset
    from deftrec.data.synth import generate
    from deftrec.training.validation import evaluate
    from tests.helpers import train_and_export

    generate(SynthConfig(users=600, items=150, mean_length=20, seed=7), tmp_path / "synth", log=lambda s: None)
    run_preprocess(PreprocessConfig(input=[str(tmp_path / "synth" / "interactions.csv")],
                                    items=str(tmp_path / "synth" / "items.csv"), format="csv",
                                    output=str(tmp_path / "data")), log=lambda s: None)
    data = load_dataset(tmp_path / "data")
    cfg = load_deftrec_config(TINY, [f"llm.cache_dir={cache}", "train.max_steps=300", "train.valid_users=300",
                                     "train.validate_every=100"])
    model, res = train_and_export(tmp_path, cfg)
    test = data.test
    ours = evaluate(model, test)["history_excluded"]
    base = run_baselines(data.sequences_before("test"), list(test.exclusions), test.targets, data.n_items,
                         models={"popularity": Popularity(), "ease": EASE()})
    pop, ease = (base[name]["history_excluded"] for name in ("popularity", "ease"))
    assert ours["ndcg@10"] >= 2 * pop["ndcg@10"], (ours, pop)
    assert ours["ndcg@10"] > ease["ndcg@10"], (ours, ease)
    # the export is the best validated state of the run
    st = res.state
    assert st.validations and st.best_step in [v["step"] for v in st.validations]
    assert st.best_score == max(v["history_excluded"]["ndcg@10"] for v in st.validations)
