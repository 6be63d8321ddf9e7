"""The quality levers of method.md section 6, each a config switch: what each one computes, and that
every switch trains and evaluates both ways at toy size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deftrec.config.model import DeftRecConfig
from deftrec.config.pipeline import load_deftrec_config
from deftrec.data.samples import ItemCatalog, Ragged, build_training_samples, sample_options
from deftrec.model.deftrec import DeftRec, DeftRecTask
from deftrec.model.diffusion import DiffusionConfig, DiffusionHead
from deftrec.retrieval.recommender import DeftRecRecommender

torch.set_num_threads(1)

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "tiny.yaml"
N_ITEMS, D_C = 30, 16
HISTORIES = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [2, 12, 13, 2]]
TARGETS = [4, 16, 17, 18]
USERS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def build(cache):
    catalog = ItemCatalog(np.array([str(i) for i in range(N_ITEMS)], dtype=object),
                          np.array([f"Song {i}" for i in range(N_ITEMS)], dtype=object),
                          np.array(["Jazz"] * N_ITEMS, dtype=object))
    E = np.random.default_rng(0).normal(scale=0.2, size=(N_ITEMS, D_C)).astype(np.float32)

    def _build(*overrides: str) -> DeftRec:
        cfg = load_deftrec_config(TINY, [f"llm.cache_dir={cache}", f"collab.dim={D_C}", "prompt.max_history=8",
                                         *overrides])
        torch.manual_seed(0)
        return DeftRec.from_config(cfg, E, None, catalog)

    return _build


def _head(**kw) -> DiffusionHead:
    torch.manual_seed(0)
    return DiffusionHead(DiffusionConfig(T=50, hidden=32, time_dim=16, d_c=6, cond_dim=4, dropout=0.0, **kw))


# --------------------------------------------------------------------------------------------- diffusion


def test_x0_prediction_targets_x0_and_samples_its_output():
    """prediction=x0: the loss compares the output with x0, and a one-step DDIM sample from t = T-1
    returns the denoiser's output itself (no 1/sqrt(abar) amplification)."""
    head = _head(prediction="x0", lambda_neg=0.0)
    x0, cond = torch.randn(5, 6), torch.randn(5, 4)
    g = torch.Generator().manual_seed(3)
    out = head.loss(x0, cond, None, generator=g, reduction="none")
    # replay the draws: t, then eps
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 50, (5,), generator=g)
    eps = torch.randn(5, 6, generator=g)
    pred = head.denoiser(head.schedule.q_sample(x0, t, eps), cond, t)
    torch.testing.assert_close(out["pos"], (pred - x0).pow(2).mean(1))
    torch.testing.assert_close(out["x0_hat"], pred)
    x_T = torch.randn(5, 6)
    one = head.sample(cond, sampler="ddim", steps=1, x_T=x_T)
    direct = head.denoiser(x_T, cond, torch.full((5,), 49, dtype=torch.long))
    torch.testing.assert_close(one, direct, rtol=1e-4, atol=1e-4)


def test_no_diffusion_ablation_never_sees_the_target():
    """noise=false: the output depends on the condition only (x_t = 0, t = T-1), in training and at
    inference, so it cannot copy x0."""
    head = _head(prediction="x0", noise=False, lambda_neg=0.0)
    cond = torch.randn(3, 4)
    a = head.loss(torch.randn(3, 6), cond, None)["x0_hat"]
    b = head.loss(torch.randn(3, 6), cond, None)["x0_hat"]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(head.direct_x0(cond), a)
    with pytest.raises(ValueError, match="prediction=x0"):
        DiffusionConfig(noise=False, prediction="eps")


def test_eps_prediction_x0_hat_inverts_the_forward_process():
    head = _head(prediction="eps", lambda_neg=0.0)
    x0, cond = torch.randn(4, 6), torch.randn(4, 4)
    g = torch.Generator().manual_seed(1)
    out = head.loss(x0, cond, None, generator=g)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 50, (4,), generator=g)
    eps = torch.randn(4, 6, generator=g)
    x_t = head.schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(out["x0_hat"], head.schedule.predict_x0(x_t, t, head.denoiser(x_t, cond, t)))


def test_neg_scale_sum_multiplies_the_margin_by_d_c():
    x0, cond, neg = torch.randn(8, 6), torch.randn(8, 4), torch.randn(8, 6)
    res = {}
    for scale in ("mean", "sum"):
        head = _head(neg_scale=scale, lambda_neg=1.0)
        res[scale] = head.loss(x0, cond, neg, generator=torch.Generator().manual_seed(5), reduction="none")
    torch.testing.assert_close(res["mean"]["pos"], res["sum"]["pos"])
    margin = torch.log(torch.expm1(res["mean"]["neg"]))  # softplus^-1: e_pos - e_neg on the mean scale
    torch.testing.assert_close(torch.nn.functional.softplus(6 * margin), res["sum"]["neg"], rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------- samples


@pytest.mark.parametrize("window,min_history", [(3, 1), (4, 2), (1, 1)])
def test_windows_predict_every_position_exactly_once(window, min_history):
    rng = np.random.default_rng(window)
    seqs = Ragged.from_lists([list(rng.integers(0, 50, size=n)) for n in (1, 2, 3, 7, 12, 20)])
    users = np.arange(len(seqs))
    s = build_training_samples(seqs, users, min_history, None, window, stride=window)
    covered = {}
    for u, h_start, h_stop in zip(s.users, s.histories.starts, s.histories.stops):
        start = seqs.starts[u]
        # positions j of the window predict t[j + 1] (the window's last item predicts the target)
        for p in range(h_start, h_stop):
            covered[(u, p + 1 - start)] = covered.get((u, p + 1 - start), 0) + 1
    assert all(c == 1 for c in covered.values())
    for u, n in enumerate(seqs.lengths):
        wanted = {(u, j) for j in range(min_history, n)}
        assert wanted <= set(covered), (u, wanted - set(covered))


def test_sample_options_follow_the_positions_switch():
    last = DeftRecConfig()
    assert sample_options(last)["stride"] == 1
    cfg = load_deftrec_config(TINY, ["condition=item_states", "train.positions=all", "prompt.max_history=7"])
    assert sample_options(cfg) == {"min_history": cfg.train.min_history,
                                   "max_samples_per_user": cfg.train.max_samples_per_user,
                                   "max_history": 7, "stride": 7, "whole_prefix": False}
    earlier = load_deftrec_config(TINY, ["tokenizer.user_tokens=true", "tokenizer.user_vector=earlier_items"])
    assert sample_options(earlier)["whole_prefix"] is True
    with pytest.raises(ValueError, match="item_states"):
        load_deftrec_config(TINY, ["condition=prompt_state", "train.positions=all"])


# --------------------------------------------------------------------------------------------- model


def test_item_states_are_causal_and_next_items_follow_the_window(build):
    """The state after history item j ignores everything after it; the last one is the condition."""
    m = build("condition=item_states").eval()
    batch = m.make_batch(HISTORIES, TARGETS, USERS)
    _, hidden = m.encode(batch)
    states = m.item_states(batch, hidden)
    assert states.shape == (sum(map(len, HISTORIES)), m.cfg.d_llm)
    changed = [h[:] for h in HISTORIES]
    changed[1][4] = 29  # after item 3 of user 1: items 0..3 keep their states
    other = m.make_batch(changed, TARGETS, USERS)
    _, hidden2 = m.encode(other)
    states2 = m.item_states(other, hidden2)
    first = len(HISTORIES[0])
    torch.testing.assert_close(states[first:first + 4], states2[first:first + 4])
    assert not torch.allclose(states[first + 4], states2[first + 4])
    # the condition of a sample = the state after its newest item
    last = np.cumsum([len(h) for h in HISTORIES]) - 1
    torch.testing.assert_close(m.condition(batch, None, hidden), states[last])
    nxt = DeftRecTask.next_items(batch)
    expected = sum(([*h[1:], t] for h, t in zip(HISTORIES, TARGETS)), [])
    assert nxt.tolist() == expected


def test_item_states_recommender_matches_the_training_condition(build):
    """Inference (left-padded prompt) reads the same state as training (right-padded + response)."""
    m = build("condition=item_states").eval()
    rec = DeftRecRecommender(m)
    cond, _ = rec.conditions(HISTORIES, users=USERS)
    batch = m.make_batch(HISTORIES, TARGETS, USERS)
    torch.testing.assert_close(cond, m.condition(batch), rtol=1e-4, atol=1e-4)


EARLIER = ("tokenizer.user_tokens=true", "tokenizer.user_vector=earlier_items")


def test_earlier_items_fill_the_user_slot_with_the_mean_of_the_items_before_the_window(build):
    """The user slot reads the mean of the item space's rows of the items before the prompt window
    (prompt.max_history=8 here): zero when the history fits."""
    m = build("item_space=trainable", *EARLIER).eval()
    long = list(range(1, 13))  # 12 items: 4 before the window of 8
    batch = m.make_batch([long, [1, 2, 3]], [20, 21])
    assert batch["earlier_item_ids"].tolist() == [1, 2, 3, 4] and batch["earlier_offsets"].tolist() == [0, 4]
    seen = {}
    hook = m.user_tokenizer.register_forward_hook(lambda mod, args, out: seen.update(vectors=args[0]))
    m.encode(batch)
    hook.remove()
    W = m.x0_table.detach()
    torch.testing.assert_close(seen["vectors"], torch.stack([W[[1, 2, 3, 4]].mean(0), torch.zeros(W.shape[1])]))
    assert "users" not in batch  # no user ids needed: the model serves anonymous histories


def test_only_the_earlier_items_switch_reads_beyond_the_prompt_window(build):
    """The same window after other earlier items: another query with the switch, the same one without
    (validation, batch evaluation and serving give the model the whole history; the prompt reads 8)."""
    long, other = list(range(1, 13)), [25, 26, 27, 28, *range(5, 13)]
    for overrides, differs in ((EARLIER, True), ((), False)):
        m = build(*overrides).eval()
        cond, _ = DeftRecRecommender(m).conditions([long, other])
        assert (not torch.allclose(cond[0], cond[1], atol=1e-5)) == differs, overrides


def test_earlier_items_train_on_whole_prefixes_with_the_same_windows_and_targets():
    seqs = Ragged.from_lists([list(range(30)), list(range(5))])
    users = np.array([0, 1])
    windows = build_training_samples(seqs, users, 1, None, 8, stride=8)
    whole = build_training_samples(seqs, users, 1, None, 8, stride=8, whole_prefix=True)
    assert whole.targets.tolist() == windows.targets.tolist()
    for w, h in zip(windows.histories, whole.histories):
        assert h.tolist() == list(range(h.size))  # the whole prefix of its sequence
        assert h[-8:].tolist() == w.tolist()


def test_earlier_items_need_the_user_slot():
    with pytest.raises(ValueError, match="tokenizer.user_vector='earlier_items'.*user_tokens"):
        load_deftrec_config(TINY, ["tokenizer.user_vector=earlier_items"])
    with pytest.raises(ValueError, match="user_vector"):
        load_deftrec_config(TINY, ["tokenizer.user_tokens=true", "tokenizer.user_vector=users"])


def test_trainable_item_space_is_trained_and_is_what_retrieval_ranks(build):
    m = build("item_space=trainable", "diffusion.lambda_ce=1.0", "diffusion.x0_norm=std")
    W = m.item_keys.weight
    torch.testing.assert_close(m.retrieval_keys, m.item_emb)  # initialised from E
    parts = DeftRecTask(m)(m.make_batch(HISTORIES, TARGETS, USERS), generator=torch.Generator().manual_seed(0))
    assert parts["ce"] > 0
    parts["total"].backward()
    assert W.grad is not None and W.grad.abs().sum() > 0
    with torch.no_grad():
        W.add_(torch.randn_like(W))
    rec = DeftRecRecommender(m)
    torch.testing.assert_close(rec.exact.E, W.detach() / m.x0_scale)
    fixed = build("item_space=fixed")
    assert fixed.item_keys is None and fixed.retrieval_keys is fixed.item_emb


def test_catalog_ce_is_softmax_cross_entropy_of_the_scores(build):
    m = build("item_space=trainable", "diffusion.lambda_ce=1.0", "diffusion.ce_temperature=0.5", "eval.score=ip")
    task = DeftRecTask(m)
    q, table = torch.randn(3, D_C), torch.randn(N_ITEMS, D_C)
    targets = torch.tensor([1, 5, 7])
    logp = torch.log_softmax(q @ table.T / 0.5, dim=1)
    torch.testing.assert_close(task.catalog_ce(q, table, targets), -logp[torch.arange(3), targets].mean())
    m2 = build("diffusion.lambda_ce=1.0", "eval.score=l2")
    d2 = -torch.cdist(q, table).pow(2)
    logp2 = torch.log_softmax(d2, dim=1)
    torch.testing.assert_close(DeftRecTask(m2).catalog_ce(q, table, targets), -logp2[torch.arange(3), targets].mean(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("score", ["l2", "ip"])
def test_normalised_catalog_ce_starts_near_log_n_items_whatever_the_item_space_scale(build, score):
    """ce_scale=normalised: the same logits at any global scale of the item space, so the loss of an
    untrained query starts near log(n_items); the raw scores' loss grows with the scale."""
    raw = DeftRecTask(build("diffusion.lambda_ce=1.0", f"eval.score={score}"))
    norm = DeftRecTask(build("diffusion.lambda_ce=1.0", "diffusion.ce_scale=normalised", f"eval.score={score}"))
    g = torch.Generator().manual_seed(0)
    q, table = torch.randn(256, D_C, generator=g), torch.randn(N_ITEMS, D_C, generator=g)
    targets = torch.randint(0, N_ITEMS, (256,), generator=g)
    losses = {c: float(norm.catalog_ce(c * q, c * table, targets)) for c in (0.01, 1.0, 100.0)}
    for c, loss in losses.items():
        assert loss == pytest.approx(losses[1.0], rel=1e-4), c
        assert abs(loss - np.log(N_ITEMS)) < 1.0, losses
    assert float(raw.catalog_ce(100 * q, 100 * table, targets)) > 100 * np.log(N_ITEMS)
    # the learned gain sharpens the same logits
    with torch.no_grad():
        norm.model.head.ce_log_gain.fill_(np.log(2.0))
    sharper = norm.catalog_ce(q, table, targets)
    assert sharper.requires_grad and float(sharper) != pytest.approx(losses[1.0])


def test_every_parameter_has_a_dimension_deepspeed_can_broadcast(build):
    """DeepSpeed broadcasts each parameter as a byte view at start-up, which a 0-dim tensor cannot
    give: with every lever that adds parameters on, none is a scalar."""
    m = build("diffusion.ce_scale=normalised", "diffusion.lambda_ce=1.0", "diffusion.cond_dropout=0.1",
              "item_space=trainable", "diffusion.cond_norm=true")
    scalars = [n for n, p in m.named_parameters() if p.dim() == 0]
    assert not scalars, scalars


def test_ce_on_generated_scores_the_one_step_generation_from_pure_noise(build):
    """ce_on=generated: the cross-entropy scores the query a one-step sampler retrieves with (the
    denoiser's output from x_T ~ N(0, I) at t = T-1), not the estimate from the noised target."""
    m = build("diffusion.lambda_ce=1.0", "diffusion.lambda_neg=0.0", "diffusion.ce_on=generated",
              "diffusion.dropout=0.0", "diffusion.batch_mul=1", "train.positions=last", "condition=item_states")
    m.eval()  # no dropout: the same draws give the same outputs
    batch = m.make_batch(HISTORIES, TARGETS, USERS)
    task = DeftRecTask(m)
    parts = task(batch, generator=torch.Generator().manual_seed(0))
    embeds, hidden = m.encode(batch)
    cond = m.condition(batch, embeds, hidden)
    g = torch.Generator().manual_seed(0)
    m.head.loss(m.x0_table.detach()[batch["targets"]], cond, None, generator=g)  # the same draws, in order
    x0_gen = m.head.generated_x0(cond, g)
    torch.testing.assert_close(parts["ce"], task.catalog_ce(x0_gen, m.x0_table, batch["targets"]))
    # and that generation is what the one-step sampler returns from the same x_T
    x_T = torch.randn(len(USERS), D_C, generator=torch.Generator().manual_seed(1))
    t = torch.full((len(USERS),), m.head.cfg.T - 1, dtype=torch.long)
    torch.testing.assert_close(m.head.sample(cond, sampler="ddim", steps=1, x_T=x_T), m.head.denoiser(x_T, cond, t),
                               rtol=1e-4, atol=1e-4)
    sampled = build("diffusion.lambda_ce=1.0", "diffusion.lambda_neg=0.0", "diffusion.ce_on=sampled",
                    "diffusion.dropout=0.0", "diffusion.batch_mul=1", "train.positions=last", "condition=item_states")
    sampled.eval()
    embeds, hidden = sampled.encode(batch)
    d = sampled.head.loss(sampled.x0_table.detach()[batch["targets"]], sampled.condition(batch, embeds, hidden), None,
                          generator=torch.Generator().manual_seed(0))
    out = DeftRecTask(sampled)(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["ce"], DeftRecTask(sampled).catalog_ce(d["x0_hat"], sampled.x0_table,
                                                                           batch["targets"]), rtol=1e-4, atol=1e-4)


def test_llm_dropout_acts_inside_the_decoder_in_training_only(build):
    """llm.dropout: two training-mode passes over the same batch differ (embeddings, attention and
    residual branches drop out), evaluation-mode passes are identical, and 0 changes nothing."""
    for p, differs in ((0.3, True), (0.0, False)):
        m = build(f"llm.dropout={p}", "tokenizer.mask_ratio=0")  # the tokenizer's masking is random too
        batch = m.make_batch(HISTORIES, TARGETS, USERS)
        m.train()
        a, b = m.encode(batch)[1], m.encode(batch)[1]
        assert (not torch.equal(a, b)) == differs, p
        m.eval()
        torch.testing.assert_close(m.encode(batch)[1], m.encode(batch)[1])
    attn = build("llm.dropout=0.3").llm.get_decoder().layers[0].self_attn
    assert attn.attention_dropout == 0.3


def test_cond_norm_makes_the_head_blind_to_the_condition_scale():
    """cond_norm: the condition is layer-normalised first, so a pretrained LLM's large states reach the
    head at the scale a from-scratch one has; without it the scale changes the output."""
    x_t, cond, t = torch.randn(3, 6), torch.randn(3, 4), torch.tensor([0, 10, 49])
    normed = _head(cond_norm=True).eval()
    torch.testing.assert_close(normed.denoiser(x_t, 300 * cond, t), normed.denoiser(x_t, cond, t), rtol=1e-4, atol=1e-4)
    plain = _head().eval()
    assert not torch.allclose(plain.denoiser(x_t, 300 * cond, t), plain.denoiser(x_t, cond, t), atol=1e-2)


def test_truncated_llm_keeps_its_first_layers(cache):
    from deftrec.config.components import LLMConfig
    from deftrec.model.llm import load_llm

    full, _ = load_llm(LLMConfig(name_or_path="tiny", cache_dir=cache, tiny_layers=3))
    cut, _ = load_llm(LLMConfig(name_or_path="tiny", cache_dir=cache, tiny_layers=3, num_layers=2))
    assert len(cut.get_decoder().layers) == 2 and cut.config.num_hidden_layers == 2
    for a, b in zip(full.get_decoder().layers[:2].parameters(), cut.get_decoder().layers.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="only 3 layers"):
        load_llm(LLMConfig(name_or_path="tiny", cache_dir=cache, tiny_layers=3, num_layers=4))


# --------------------------------------------------------------------------------------------- switches

LEVERS = {
    "diffusion": ("diffusion.noise=true", "diffusion.noise=false"),
    "prediction": ("diffusion.prediction=x0", "diffusion.prediction=eps"),
    "neg_scale": ("diffusion.neg_scale=sum", "diffusion.neg_scale=mean"),
    "catalog_ce": ("diffusion.lambda_ce=1.0", "diffusion.lambda_ce=0.0"),
    "ce_on": ("diffusion.ce_on=generated", "diffusion.ce_on=sampled"),
    "cond_norm": ("diffusion.cond_norm=true", "diffusion.cond_norm=false"),
    "item_space": ("item_space=trainable", "item_space=fixed"),
    "positions": ("train.positions=all", "condition=item_states train.positions=last"),
    "x0_norm": ("diffusion.x0_norm=std", "diffusion.x0_norm=none"),
    "earlier_items": ("tokenizer.user_tokens=true tokenizer.user_vector=earlier_items", "tokenizer.user_tokens=false"),
}


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory, ray_session):
    from deftrec.config.data import PreprocessConfig, SynthConfig
    from deftrec.data.preprocess import run_preprocess
    from deftrec.data.samples import load_dataset
    from deftrec.data.synth import generate

    root = tmp_path_factory.mktemp("levers")
    generate(SynthConfig(users=80, items=60, mean_length=10, seed=3), root / "synth", log=lambda s: None)
    run_preprocess(PreprocessConfig(input=[str(root / "synth" / "interactions.csv")],
                                    items=str(root / "synth" / "items.csv"), format="csv",
                                    output=str(root / "data")), log=lambda s: None)
    return load_dataset(root / "data")


@pytest.mark.parametrize("lever", sorted(LEVERS))
@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
def test_each_lever_trains_and_evaluates_both_ways(lever, on, toy_data, cache):
    """Each setting reaches the model, its training task takes finite optimiser steps (the model and
    task the training loop steps) and the trained model evaluates through the retrieval path."""
    from deftrec.training.optim import build_optimizer, make_batch
    from deftrec.training.validation import evaluate

    setting = LEVERS[lever][0 if on else 1].split()
    cfg = load_deftrec_config(TINY, [f"llm.cache_dir={cache}", "collab.dim=8", "train.batch_size=8", *setting])
    rng = np.random.default_rng(0)
    model = DeftRec.from_config(cfg, rng.normal(size=(toy_data.n_items, 8)).astype(np.float32),
                                None, toy_data.catalog)
    for s in setting:
        key, value = s.split("=")
        section, _, field = key.rpartition(".")
        obj = getattr(model.cfg, section) if section else model.cfg
        assert str(getattr(obj, field)).lower() == value.lower()
    samples = build_training_samples(toy_data.train_sequences, toy_data.users, **sample_options(model.cfg))
    task, opt, gen = DeftRecTask(model), build_optimizer(model, model.cfg), torch.Generator().manual_seed(0)
    model.train()
    for step in range(3):
        parts = task(make_batch(model, samples, np.arange(step * 8, step * 8 + 8) % len(samples)), generator=gen)
        assert all(np.isfinite(float(v)) for v in parts.values())
        parts["total"].backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    m = evaluate(model, toy_data.test.subset(np.arange(30)))["history_excluded"]
    assert 0.0 <= m["ndcg@10"] <= 1.0 and np.isfinite(m["ndcg@10"])


def test_plateau_decay_anneals_the_lr_after_plateau_patience_validations_without_a_gain(toy_data, cache, tmp_path):
    """train.plateau_decay in the training loop: the learning rate of every later step is the
    schedule's times decay ** (decays so far), one decay per ``plateau_patience`` validations in a
    row without a gain."""
    import shutil

    from deftrec.training.checkpoint import read_trainer_state
    from deftrec.training.optim import lr_factor
    from tests.helpers import train_and_export

    shutil.copytree(toy_data.root, tmp_path / "data")
    cfg = load_deftrec_config(TINY, [f"llm.cache_dir={cache}", "collab.dim=8", "collab.epochs=1",
                                     "train.max_steps=12", "train.warmup_steps=1", "train.valid_users=20",
                                     "train.batch_size=8", "train.log_every=1", "train.validate_every=1",
                                     "train.patience=null", "train.plateau_decay=0.5", "train.plateau_patience=2",
                                     "train.min_lr_ratio=1.0", "diffusion.hidden=32", "eval.steps=1"])
    _, res = train_and_export(tmp_path, cfg)
    validations = read_trainer_state(res.latest_checkpoint).validations  # the run's whole history
    assert [v["step"] for v in validations] == list(range(1, 13))
    best, in_a_row, decays, decays_after = -1.0, 0, 0, []
    for v in validations:
        score = v["history_excluded"]["ndcg@10"]
        in_a_row = 0 if score > best else in_a_row + 1
        decays += in_a_row > 0 and in_a_row % 2 == 0
        best = max(best, score)
        decays_after.append(decays)
    assert decays > 0, "no two validations in a row without a gain: the test exercises nothing"
    for v in validations[1:]:  # recorded at step s: the lr of step s + 1, before this validation counts
        step = v["step"]
        want = cfg.train.lr * lr_factor(step, 1, 12, 1.0) * 0.5 ** decays_after[step - 2]
        assert v["lr"] == pytest.approx(want), step
